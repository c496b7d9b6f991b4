"""Two versions of lorasb.py timed against each other in one process: the first-update estimate and a LoRA-SB
training step, in interleaved rounds (bench.py's method), so whatever slows the machine slows both alike.

    git show <commit>:lorasb.py > /tmp/lorasb_old.py
    python experiments/ab_lorasb.py --old /tmp/lorasb_old.py                       # fp32, SmolLM2 shapes
    python experiments/ab_lorasb.py --old /tmp/lorasb_old.py --dtype bfloat16      # frozen weights in bf16, autocast

Prints each phase's median seconds with its interquartile range for both, and the median of the per-round ratios
new / old. The new version is this repository's lorasb.py. Both estimate on the same batches of random tokens and
train the same model weights (one set shared by both, never changed: only R trains).
"""

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorasb  # noqa: E402
import train_gsm8k  # noqa: E402
from experiments import bench  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the other lorasb.py (e.g. from git show)")
    p.add_argument("--model", default=None, help=f"local model folder (default: {bench.DEFAULT_MODEL_DIR})")
    p.add_argument("--config", default=None, help=f"random weights of these shapes instead: {', '.join(bench.CONFIGS)}")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--samples", type=int, default=8, help="examples of the estimate")
    p.add_argument("--rank", type=int, default=96)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--phases", default="estimate,step")
    args = p.parse_args(argv)
    if not args.old.is_file():
        p.error(f"--old {args.old}: no such file")
    bench_args = bench.parse_args([*(["--config", args.config] if args.config else ["--model", args.model]
                                     if args.model else []), "--device", "cpu", "--dtype", args.dtype,
                                   "--batch", str(args.batch), "--seq", str(args.seq)])
    args.model, args.device, args.dtype = bench_args.model, bench_args.device, bench_args.dtype  # resolved by bench
    return args


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def report(name: str, times: dict[str, list[float]]) -> None:
    old, new = bench.spread(times["old"]), bench.spread(times["new"])
    ratio = bench.paired(times["new"], times["old"])
    print(f"{name}: old {old['median']:.3f} s [{old['q1']:.3f}-{old['q3']:.3f}], new {new['median']:.3f} s "
          f"[{new['q1']:.3f}-{new['q3']:.3f}], new / old {ratio['median']:.3f} [{ratio['q1']:.3f}-{ratio['q3']:.3f}] "
          f"({ratio['n']} rounds)", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    versions = {"old": load_module(args.old, "lorasb_old"), "new": lorasb}
    model, machine = bench.fresh_model(args), bench.Machine()
    setup = train_gsm8k.Setup.one_process(args.device, args.dtype)
    batches = [bench.random_batch(model.config.vocab_size, args.batch, args.seq, args.device, seed=1 + i)
               for i in range(-(-args.samples // args.batch))]

    def loss_fn(m, batch):
        with setup.autocast():
            return train_gsm8k.causal_lm_loss(m, batch)

    print(f"{args.config or args.model}, {args.dtype}, batch {args.batch} x {args.seq}, rank {args.rank}, "
          f"{torch.get_num_threads()} threads", flush=True)
    if "estimate" in args.phases:
        runs = {name: (lambda m=m: m.estimate_first_update(model, batches, loss_fn, args.samples, 1e-4))
                for name, m in versions.items()}
        with machine.phase("estimate"):
            times = bench.interleaved(runs, args.rounds, 1, args.device, machine)
        report("estimate", times)
    if "step" in args.phases:
        updates = lorasb.estimate_first_update(model, batches[:1], loss_fn, 1, 1e-4)
        runs = {}
        for name, module in versions.items():
            adapted = bench.twin(model)
            module.add_adapters(adapted, "lorasb", args.rank, updates=copy.deepcopy(updates))
            adapted.train()
            optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)

            def step(adapted=adapted, optimizer=optimizer):
                loss_fn(adapted, batches[0]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            runs[name] = step
        with machine.phase("training step"):
            times = bench.interleaved(runs, args.rounds, 2, args.device, machine)
        report("training step", times)
    for name, phase in machine.finish()["phases"].items():
        print(f"{name}: other processes used {phase['other_cores'] or 0:.2f} of {machine.cpus} cores", flush=True)


if __name__ == "__main__":
    main()
