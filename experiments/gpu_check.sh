#!/usr/bin/env bash
# The GPU check: bench.py (interleaved rounds, medians and IQRs, the lorasb / loraxs noise gauge, FLOP-adjusted
# floors) on random-weight models of the Qwen2.5-0.5B and Mistral-7B shapes (no download, no network), bf16, then the
# compiled decode step (model.generate(compile_decode=True)) on the Qwen shapes, then the training step of the adapter
# methods on an NF4 base beside the bf16 one (--quantize nf4: the step-time ratio NF4 / bf16, same weights, same
# rounds): at most 20 minutes on one H100/H200-class GPU (each run has its own timeout). Writes each table (markdown), its figures (JSON) and its log to
# $OUT (default ./gpu_results), and prints the tables.
#
#     bash experiments/gpu_check.sh
#
# During the timed rounds every method's model is alive at once: on Mistral-7B one shared set of bf16 weights for the
# adapters and frozen (~14.5 GB), full fine-tuning's own bf16 weights, gradients and AdamW states (8 bytes per
# parameter, ~58 GB), and transformers + PEFT's model (~14.5 GB), plus one step's activations: ~110 GB of ~139 GB.
# train_gsm8k.py keeps fully trained weights in fp32 (16 bytes per parameter), so its 7B full fine-tuning needs more
# than one GPU. A method that still runs out of memory gets "out of memory" in its row; the others are measured.
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

# Every phase, the GPU defaults (30 rounds, 5 generation rounds, 3 initialization rounds) on the small model; fewer on
# the 7B, whose exact SVDs take longest. The compiled decode step compiles twice (batch 1, then any batch size): it
# runs last, generation only, so that a slow compile cannot cost the other figures.
run qwen2.5-0.5b 180 --config qwen2.5-0.5b --batch 8 --seq 512
run mistral-7b 360 --config mistral-7b --batch 4 --seq 512 --rounds 20 --gen_rounds 3 --init_rounds 2
run qwen2.5-0.5b-compiled-decode 180 --config qwen2.5-0.5b --phases generation --gen_rounds 5 --compile_decode
# NF4: the adapter methods and frozen on the bf16 base and on its NF4 copy (no full fine-tuning, no PEFT), training only.
run qwen2.5-0.5b-nf4 180 --config qwen2.5-0.5b --batch 8 --seq 512 --phases training --quantize nf4
run mistral-7b-nf4 300 --config mistral-7b --batch 4 --seq 512 --phases training --quantize nf4 --rounds 10
exit "$status"
