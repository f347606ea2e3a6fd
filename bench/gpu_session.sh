#!/usr/bin/env bash
# The GPU measurements of the performance issue, in as few device calls as possible.
#
#   bash bench/gpu_session.sh kernel   # CUDA tests of the Triton kernel + bench/attention.py 1k..16k  (~3-5 min)
#   bash bench/gpu_session.sh model    # prefix cache and training throughput, LLaMA-2-7B-shaped random model (~5-8 min)
#
# Results go to $OUT (the device tool's folder) or ./gpu-results. Packages the GPU machine lacks
# (deepspeed, pydantic, hjson) are installed from wheels in .whl/ when that folder exists; build it
# here with (see bench/RESULTS.md, "Pending: GPU measurements"):
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core hjson annotated-types typing-inspection
# Every step runs under its own time limit and the script goes on after a failing step, so one call
# brings back whatever finished; the exit status is the number of failed steps.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 100; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=$?
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; failed=$((failed + 1)); }
}

nvidia-smi -L || true
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"

case "${1:-}" in
kernel)
    step kernel-tests 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_attention_triton.py -k cuda
    step attention 300 python3 bench/attention.py --sizes 1024 2048 4096 8192 16384 --heads 32 --dim 128 \
        --dtype bf16 --repeats 10 --json "$out/attention-h100.json"
    ;;
model)
    step prefix-cache 240 python3 bench/prefix_cache.py --model llama7b-random --repeats 3 --json "$out/prefix-cache-h100.json"
    step train-throughput 300 python3 bench/train_throughput.py --model llama7b-random --seq_len 4096 --precision bf16 \
        --zero_stage 2 --gc off on --steps 5 --warmup 2 --json "$out/train-throughput-h100.json"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh kernel|model" >&2
    exit 2
    ;;
esac
exit "$failed"
