"""A small, fixed-seed comparison of full fine-tuning, LoRA, LoRA-XS and LoRA-SB on GSM8K, on CPU.

Every method gets the same data order, the same number of optimizer steps and the same evaluation (held-out loss on
the reference solutions and accuracy on the first --eval_limit GSM8K test questions); only the method and its learning
rate differ. It runs train_gsm8k.py once per method and writes a markdown table.

    python reproduce_cpu.py --model path/to/SmolLM2-135M-Instruct --data_dir path/to/gsm8k   # ~10 min on 2 cores
    nohup python reproduce_cpu.py --model ... --data_dir ... > reproduce.log 2>&1 &         # in the background
"""

import argparse
import json
from pathlib import Path

import train_gsm8k

# Learning rates: the usual order of magnitude for each method (full fine-tuning needs a far smaller one; r x r
# adapters with frozen B, A take larger steps than LoRA). Not tuned here. LoRA-SB's initialization is a full
# fine-tuning sign step of size lr_1 = lr / warmup_steps: with 1e-3 and 5 warmup steps it is 2e-4, a sensible
# full fine-tuning step (with 1 warmup step, lr_1 = 2e-3 starts the model far off: held-out loss 4.5 from 1.5).
METHODS = [("full", None, 2e-5), ("lora", 32, 2e-4), ("loraxs", 32, 1e-3), ("lorasb", 32, 1e-3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model folder (e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--data_dir", required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    p.add_argument("--out_dir", default="runs/reproduce-cpu")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps for every method")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--eval_limit", type=int, default=12, help="first N GSM8K test questions")
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--warmup_ratio", type=float, default=0.25, help="the same schedule shape for every method")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()

    rows = []
    for method, rank, lr in METHODS:
        out = Path(args.out_dir) / method
        argv = ["--model", args.model, "--data_dir", args.data_dir, "--out_dir", str(out), "--device", "cpu",
                "--method", method, "--lr", str(lr), "--max_steps", str(args.steps), "--warmup_ratio",
                str(args.warmup_ratio), "--batch_size", str(args.batch_size), "--micro_batch_size",
                str(args.batch_size), "--max_length", str(args.max_length),
                "--eval_limit", str(args.eval_limit), "--max_new_tokens", str(args.max_new_tokens),
                "--eval_batch_size", str(args.eval_limit), "--seed", str(args.seed), "--save_every", str(args.steps),
                "--log_every", "5", "--overwrite"]
        if rank:
            argv += ["--rank", str(rank)]
        summary = train_gsm8k.main(argv)
        rows.append((method, rank, lr, summary))

    base = train_gsm8k.main(["--model", args.model, "--data_dir", args.data_dir, "--out_dir",
                             str(Path(args.out_dir) / "base"), "--device", "cpu", "--eval_only", "--overwrite",
                             "--eval_limit", str(args.eval_limit), "--max_new_tokens", str(args.max_new_tokens),
                             "--eval_batch_size", str(args.eval_limit), "--max_length", str(args.max_length)])
    lora_params = next(s["trainable_parameters"] for m, _, _, s in rows if m == "lora")
    lines = ["| method | rank | lr | trainable params | LoRA r=32 / this | held-out loss | accuracy | invalid | "
             "init s | train s |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| base model (no training) | - | - | 0 | - | {base['test_loss']:.4f} | {base['accuracy']:.1%} | "
             f"{base['invalid']} | - | - |"]
    for method, rank, lr, s in rows:
        lines.append(f"| {method} | {rank or '-'} | {lr:g} | {s['trainable_parameters']:,} | "
                     f"{lora_params / s['trainable_parameters']:.2f} | {s['test_loss']:.4f} | {s['accuracy']:.1%} | "
                     f"{s['invalid']} | {s['init_seconds']:.1f} | {s['train_seconds']:.0f} |")
    table = "\n".join(lines)
    (Path(args.out_dir) / "results.md").write_text(table + "\n")
    (Path(args.out_dir) / "results.json").write_text(json.dumps({m: s for m, _, _, s in rows} | {"base": base},
                                                                indent=2))
    print(table)


if __name__ == "__main__":
    main()
