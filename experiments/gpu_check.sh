#!/usr/bin/env bash
# The GPU check: bench.py on random-weight models of the Qwen2.5-0.5B and Mistral-7B shapes (no download, no
# network), bf16, in under 10 minutes on one H100/H200-class GPU. Writes each table (markdown), its figures (JSON)
# and its log to $OUT (default ./gpu_results), and prints the tables.
#
#     bash experiments/gpu_check.sh
#
# Mistral-7B full fine-tuning is measured with bf16 weights, gradients and AdamW states, 8 bytes per parameter
# (~58 GB) plus activations, to fit in ~139 GB; train_gsm8k.py keeps trained weights in fp32 (16 bytes per
# parameter), so its 7B full fine-tuning needs more than one GPU. Should it still run out of memory, its row says so and the other rows are measured.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_results}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
# Full fine-tuning of 7B frees and reallocates tens of GB between methods: expandable segments avoid fragmentation.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$OUT/nvidia-smi.txt"

status=0
run() {  # run NAME TIMEOUT_S BENCH_ARGS...
    local name="$1" limit="$2"
    shift 2
    echo "=== $name: python -m experiments.bench $* (at most ${limit} s)"
    timeout "$limit" "$PYTHON" -m experiments.bench "$@" --device cuda --dtype bfloat16 --json "$OUT/$name.json" \
        > "$OUT/$name.md" 2> "$OUT/$name.log"
    local rc=$?
    cat "$OUT/$name.md"
    if [ "$rc" -ne 0 ]; then
        echo "=== $name FAILED (exit $rc; 124 = timed out); last lines of $OUT/$name.log:"
        tail -n 20 "$OUT/$name.log"
        status=1
    fi
}

run qwen2.5-0.5b 240 --config qwen2.5-0.5b --batch 8 --seq 512 --steps 10
run mistral-7b 330 --config mistral-7b --batch 4 --seq 512 --steps 5
exit "$status"
