"""Commonsense reasoning accuracy of LoRA-SB, LoRA-XS, LoRA and the base model, measured on CPU.

    python experiments/commonsense.py --commonsense_dir ../shared/commonsense --out experiments/results   # ~1 h 45 min
    python experiments/commonsense.py --quick --model DIR --commonsense_dir DIR --out DIR   # every part, in seconds

The model defaults to $LORASB_SMOLLM2_DIR (a local SmolLM2-135M-Instruct folder) or else the hub's
HuggingFaceTB/SmolLM2-135M-Instruct. Training data: the union of the training sets in --commonsense_dir (BoolQ, ARC-e,
ARC-c and OBQA in the shared copy), from which a validation split is held out first; each run trains on the same
pool, in the order its seed draws (the seed also draws LoRA-SB's init samples and LoRA's / LoRA-XS's random factors),
with the same linear schedule (LoRA-SB's lr_1 is the first step of the paper's longer schedule: Budget). Each
method's lr is the one of its grid with the lowest validation loss (the loss on
the held-out records' answers, "the correct answer is ..."), at the first seed; test data never chooses anything.
The chosen runs are then repeated for every seed and evaluated as the trainer evaluates (greedy, the authors' prompt,
first-match answer patterns) on a fixed subset of each of the 7 test sets at hand (the same questions for every
method), with 95% Wilson intervals per task and for the mean (the tasks' subsets have one size, so the mean accuracy
is the pooled accuracy of all the questions, and its interval is that proportion's).

Every part (one training run with its validation loss, or one evaluation) is written to commonsense.json as soon as it
exists, with the settings it was computed under: a rerun reuses a part only when its settings are the same (and says
so), and recomputes it otherwise. The runs are the trainer's own phases and its own loop (train_gsm8k.load, then
common.run_training: plan_training, initialize_adapters, make_optimizer, train), evaluated by its
prepare_evaluation, held_out_loss and generate_answers: there is no second training loop.

The budget (Budget below) was set for about 75 minutes on 2 quiet CPU cores, from a timing of its costs on
SmolLM2-135M in fp32 (2 threads, nothing else running): an optimizer step of 8 examples (mean 87 tokens; at most 256)
took 12 s, so T_step ~ 6 s for this budget's 4; LoRA-SB's estimate 1.45 s an example; a generation batch of 32 prompts
(up to 32 new tokens) T_gen ~ 11 s. The runs are 3 methods x 3 lrs at the first seed, each keeping its trained
weights, so the chosen lr's evaluation at that seed trains nothing again (a further seed retrains). Total ~ 9 x 50 x
T_step + 4 x 7 x 4 x T_gen + 3 x 32 x 1.45 s + 13 validation passes of ~25 s ~ 2700 + 1230 + 140 + 330 s ~ 73 min.
More seeds (Budget.seeds) add a training and an evaluation per method and seed, about 10 minutes each. Measured on a
shared machine: the least contended training parts took 7-8.5 minutes, the base model's evaluation 14 (it rarely
stops before 32 tokens), all parts 147 minutes; about 1 h 45 min is the estimate for a quiet machine.
"""

import argparse
import dataclasses
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python experiments/commonsense.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gsm8k as trainer  # noqa: E402
from experiments import common, svg  # noqa: E402
from experiments.common import METHOD_COLORS, METHOD_NAMES, Results, wilson_interval  # noqa: E402
from machinery import command, datasets  # noqa: E402
from machinery import commonsense as commonsense_tasks  # noqa: E402

TASKS = tuple(task for task in commonsense_tasks.TASKS if task != "hellaswag")  # HellaSwag's test set is not at hand
CHANCE = {"boolq": 1 / 2, "piqa": 1 / 2, "social_i_qa": 1 / 3, "winogrande": 1 / 2, "ARC-Easy": 1 / 4,
          "ARC-Challenge": 1 / 4, "openbookqa": 1 / 4}  # a uniform guess among each task's choices


@dataclass(frozen=True)
class Budget:
    steps: int = 50  # optimizer steps of every run: 200 training examples, one pass
    batch_size: int = 4
    micro_batch_size: int = 4
    warmup_ratio: float = 0.02  # the paper's commonsense schedule: 2% linear warmup, then linear decay
    # LoRA-SB's lr_1 = lr / 36, the first step of the paper's schedule (2% of 2 epochs of 170,420 examples in batches
    # of 192: 1776 steps, 36 warmup). This budget's own schedule has 1 warmup step, which would make lr_1 the peak lr:
    # a full fine-tuning sign step of 2e-3 on every weight, which on SmolLM2 alone takes the held-out loss from about
    # 1.5 to 4.5 (README, "lr_1 sets the size of the initialization"): an initialization the paper never makes.
    lr_1_warmup_steps: int = 36
    max_length: int = 256  # the paper's
    rank: int = 96  # LoRA-SB and LoRA-XS (the paper's)
    lora_rank: int = 32
    lr_grid: tuple = (("lorasb", (5e-4, 2e-3, 5e-3)), ("loraxs", (5e-4, 2e-3, 5e-3)), ("lora", (1e-4, 3e-4, 1e-3)))
    full_lr_grid: tuple = (1e-5, 3e-5, 1e-4)  # with --full
    num_init_samples: int = 32  # the trainer's default for this pool: 0.1% of it, at least 32
    init_batch_size: int = 8
    validation_examples: int = 200  # held out of the training sets, for choosing the lr
    test_per_task: int = 100  # the fixed subset of each test set
    max_new_tokens: int = 32  # the authors'
    eval_batch_size: int = 32
    seeds: tuple = (42,)  # one seed fits the budget; the intervals are the test questions' sampling error only


QUICK = Budget(steps=2, batch_size=2, micro_batch_size=2, rank=4, lora_rank=2,
               lr_grid=(("lorasb", (1e-3, 1e-2, 1e-1)), ("loraxs", (1e-3, 1e-2, 1e-1)), ("lora", (1e-3, 1e-2, 1e-1))),
               full_lr_grid=(1e-4, 1e-3, 1e-2), num_init_samples=2, init_batch_size=2, validation_examples=2,
               test_per_task=2, max_new_tokens=3, eval_batch_size=4, seeds=(42, 43))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_argument(p)
    p.add_argument("--commonsense_dir", default=os.environ.get("LORASB_COMMONSENSE_DIR"), help="the authors' layout: "
                   "<task>/train.json, <task>/test.json (default: $LORASB_COMMONSENSE_DIR, else LLM-Adapters' "
                   "commonsense_170k.json and test sets, downloaded as the trainer does)")
    p.add_argument("--full", action="store_true", help="add full fine-tuning (its own lr grid)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder of commonsense.json and the plot (default: runs/commonsense, or "
                   "runs/commonsense-quick with --quick; the committed results are --out experiments/results)")
    p.add_argument("--quick", action="store_true", help="a tiny budget: every part runs, the figures mean nothing")
    args = p.parse_args(argv)
    args.budget = QUICK if args.quick else Budget()
    args.out = Path(args.out or ("runs/commonsense-quick" if args.quick else "runs/commonsense"))
    return args


# ---------------------------------------------------------------------------------------------------------------------
# The data and the runs: the trainer's phases on one training pool, validation split and test subsets.
# ---------------------------------------------------------------------------------------------------------------------

class Experiment:
    """The model folder, tokenizer, training pool, validation pairs and test subsets every part shares."""

    def __init__(self, args):
        self.args, self.budget = args, args.budget
        base = self.trainer_args("lorasb", self.budget.rank, 1e-3, self.budget.seeds[0])
        self.setup = trainer.Setup.from_args(base)
        loaded = trainer.load(base, self.setup)
        self.folder, self.tokenizer, self.eos_ids = loaded.folder, loaded.tokenizer, loaded.eos_ids
        files = [*trainer.training_data_files(base),
                 *(datasets.commonsense_test_file(task, args.commonsense_dir) for task in TASKS)]
        # a part is reused only with the same weights and data, not merely the same folder names
        self.fingerprints = common.fingerprints(self.folder, {f"{p.parent.name}/{p.name}": p for p in files})
        b = self.budget
        order = torch.randperm(len(loaded.pairs), generator=torch.Generator().manual_seed(0)).tolist()
        if len(order) < b.validation_examples + b.steps * b.batch_size:
            raise SystemExit(f"{args.commonsense_dir} holds {len(order)} training records, fewer than the "
                             f"{b.validation_examples} + {b.steps * b.batch_size} this budget needs")
        self.validation = [loaded.pairs[i] for i in order[:b.validation_examples]]
        pool = [loaded.pairs[i] for i in order[b.validation_examples:b.validation_examples + b.steps * b.batch_size]]
        self.examples = trainer.training_examples(dataclasses.replace(loaded, pairs=pool), base, self.setup)
        self.test = {}
        for task in TASKS:  # a fixed random subset of each test set, the same for every method and seed
            records = loaded.test_sets[task]
            pick = torch.randperm(len(records), generator=torch.Generator().manual_seed(1)).tolist()
            self.test[task] = [records[i] for i in sorted(pick[:b.test_per_task])]

    def trainer_args(self, method: str, rank: int | None, lr: float, seed: int) -> argparse.Namespace:
        """train_gsm8k.py's own arguments for one run (the trainer parses and checks them)."""
        b = self.budget
        settings = {"model": self.args.model, "method": method, "rank": rank, "lr": lr, "max_steps": b.steps,
                    "lr_1": lr / b.lr_1_warmup_steps if method == "lorasb" else None,
                    "batch_size": b.batch_size, "micro_batch_size": b.micro_batch_size, "warmup_ratio": b.warmup_ratio,
                    "schedule": "linear", "max_length": b.max_length, "seed": seed, "epochs": 1,
                    "num_init_samples": b.num_init_samples, "init_batch_size": b.init_batch_size,
                    "train_data": "commonsense", "commonsense_dir": self.args.commonsense_dir,
                    "eval_data": ",".join(TASKS), "eval_batch_size": b.eval_batch_size,
                    "commonsense_max_new_tokens": b.max_new_tokens, "device": self.args.device, "dtype": "float32",
                    "out_dir": self.args.out / "trainer"}
        return common.trainer_arguments(settings)


def train_and_measure(exp: Experiment, method: str, lr: float, seed: int, evaluate: bool,
                      save_as: Path | None = None) -> dict:
    """One run (common.run_training: initialize_adapters, then the trainer's own loop), then the validation loss and,
    with `evaluate`, the test accuracy of every task (test_accuracy); `save_as` keeps the trained weights for
    evaluate_trained."""
    args = exp.trainer_args(method, common.method_ranks(exp.budget)[method], lr, seed)
    run = common.run_training(exp.folder, exp.examples, exp.tokenizer.pad_id, args, f"{method} lr {lr:g} seed {seed}")
    result = {"method": method, "lr": lr, "seed": seed, "steps": run.plan.total_steps,
              "final_loss": run.losses[-1], "trainable": run.trainable,
              "validation_loss": None if run.diverged else validation_loss(exp, run.model, args, run.setup)}
    if save_as and result["validation_loss"] is not None:
        save_as.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_trainable(run.model, save_as, method, str(exp.args.model))
    if evaluate:
        result["test"] = test_accuracy(exp, run.model, args, run.setup)
    return result


def evaluate_trained(exp: Experiment, method: str, lr: float, seed: int, path: Path) -> dict:
    """A grid run's trained weights (saved by train_and_measure), evaluated as train_and_measure evaluates: the chosen
    lr at the first seed needs no second training."""
    args = exp.trainer_args(method, common.method_ranks(exp.budget)[method], lr, seed)
    setup = trainer.Setup.from_args(args)
    model = common.base_model(exp.folder, setup)
    common.load_trained(model, path, method)
    return {"method": method, "lr": lr, "seed": seed, "trained_weights": path.name,
            "validation_loss": validation_loss(exp, model, args, setup), "test": test_accuracy(exp, model, args, setup)}


def validation_loss(exp: Experiment, model, args, setup: trainer.Setup) -> float | None:
    """The loss on the validation records' answers, in the form the trainer evaluates the model; None if not finite."""
    trainer.prepare_evaluation(model, args, setup)
    loss = common.held_out_loss(model, exp.tokenizer, exp.validation, args, setup)
    return loss if loss == loss and abs(loss) != float("inf") else None


def test_accuracy(exp: Experiment, model, args, setup: trainer.Setup) -> dict:
    """Per task: accuracy, correct, invalid, total and the 95% Wilson interval; and the mean over the tasks."""
    trainer.prepare_evaluation(model, args, setup)
    tasks = {}
    for task, records in exp.test.items():
        metrics, interval = common.greedy_accuracy(model, exp.tokenizer, records, exp.eos_ids, args, setup, task)
        tasks[task] = {**metrics, "interval": interval}
    correct, total = sum(t["correct"] for t in tasks.values()), sum(t["total"] for t in tasks.values())
    return {"tasks": tasks, "mean": {"accuracy": correct / total, "correct": correct, "total": total,
                                     "interval": wilson_interval(correct, total)}}


def base_model_part(exp: Experiment) -> dict:
    args = exp.trainer_args("lorasb", exp.budget.rank, 1e-3, exp.budget.seeds[0])
    setup = trainer.Setup.from_args(args)
    model = common.base_model(exp.folder, setup)
    return {"method": "base", "validation_loss": validation_loss(exp, model, args, setup),
            "test": test_accuracy(exp, model, args, setup)}


# ---------------------------------------------------------------------------------------------------------------------
# The experiment: the lr grids at the first seed, the chosen lr of each method at every seed, the base model.
# ---------------------------------------------------------------------------------------------------------------------

def part_settings(exp: Experiment, **run) -> dict:
    """What shapes a part: the model and the data (their fingerprints), the budget (but the grids and seeds, which name
    the parts), the run."""
    budget = {k: v for k, v in dataclasses.asdict(exp.budget).items() if k not in ("lr_grid", "full_lr_grid", "seeds")}
    return {"model": str(exp.args.model), "commonsense_dir": str(exp.args.commonsense_dir), **exp.fingerprints,
            **budget, **run}


def run_experiment(exp: Experiment, results: Results) -> dict:
    """Every part, then the summary: per method its chosen lr, per seed its accuracies, and their mean and spread."""
    b = exp.budget
    grids = dict(b.lr_grid) | ({"full": b.full_lr_grid} if exp.args.full else {})
    chosen = {}
    for method, grid in grids.items():
        losses = {}
        for lr in grid:
            part = results.part(f"grid/{method}-lr{lr:g}",
                                lambda: train_and_measure(exp, method, lr, b.seeds[0], evaluate=False,
                                                          save_as=trained_weights(exp, method, lr)),
                                settings=part_settings(exp, method=method, lr=lr, seed=b.seeds[0]))
            losses[lr] = part["validation_loss"]
        finite = {lr: loss for lr, loss in losses.items() if loss is not None}
        if not finite:
            raise SystemExit(f"every lr of {method}'s grid {grid} diverged: lower its grid")
        lr = min(finite, key=finite.get)
        chosen[method] = {"lr": lr, "validation_losses": {f"{k:g}": v for k, v in losses.items()},
                          "at_grid_edge": lr in (min(grid), max(grid))}
    base = results.part("eval/base", lambda: base_model_part(exp), settings=part_settings(exp, method="base"))
    summary = {"base": {"test": base["test"]}}
    for method, choice in chosen.items():
        runs = {seed: results.part(f"eval/{method}-seed{seed}", lambda: evaluate_run(exp, method, choice["lr"], seed),
                                   settings=part_settings(exp, method=method, lr=choice["lr"], seed=seed))
                for seed in b.seeds}
        summary[method] = {**choice, "seeds": {str(seed): run["test"] for seed, run in runs.items()},
                           "across_seeds": across_seeds([run["test"] for run in runs.values()])}
    return summary


def trained_weights(exp: Experiment, method: str, lr: float) -> Path:
    """Where a grid run (at the first seed) keeps its trained weights."""
    return exp.args.out / "trained" / f"{method}-lr{lr:g}-seed{exp.budget.seeds[0]}.safetensors"


def evaluate_run(exp: Experiment, method: str, lr: float, seed: int) -> dict:
    """The chosen lr's test accuracy at one seed: the grid run's own weights at the first seed (when they are still
    there: its part may come from an earlier commonsense.json), a new training run otherwise."""
    path = trained_weights(exp, method, lr)
    if seed == exp.budget.seeds[0] and path.is_file():
        return evaluate_trained(exp, method, lr, seed, path)
    return train_and_measure(exp, method, lr, seed, evaluate=True)


def across_seeds(tests: list[dict]) -> dict:
    """Mean and spread (sample standard deviation; max - min) over the seeds of each task's and the mean accuracy."""
    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "range": max(values) - min(values)}
    out = {task: stats([t["tasks"][task]["accuracy"] for t in tests]) for task in tests[0]["tasks"]}
    return {**out, "mean": stats([t["mean"]["accuracy"] for t in tests])}


def report(summary: dict) -> str:
    """One table: accuracy per task and mean, per method, at the first seed with its 95% interval; with more seeds,
    the seeds' mean and standard deviation beside it."""
    lines = ["| method | lr | " + " | ".join(TASKS) + " | mean |", "|---|---|" + "---|" * (len(TASKS) + 1)]
    for method, entry in summary.items():
        test = entry["test"] if method == "base" else next(iter(entry["seeds"].values()))
        cells = []
        for key in (*TASKS, "mean"):
            cell = test["mean"] if key == "mean" else test["tasks"][key]
            low, high = cell["interval"]
            cells.append(f"{cell['accuracy']:.3f} [{low:.2f}, {high:.2f}]")
            if method != "base" and len(entry["seeds"]) > 1:
                spread = entry["across_seeds"][key]
                cells[-1] += f" ({len(entry['seeds'])} seeds: {spread['mean']:.3f} +- {spread['std']:.3f})"
        lr = "-" if method == "base" else f"{entry['lr']:g}{' (edge)' if entry['at_grid_edge'] else ''}"
        lines.append(f"| {METHOD_NAMES.get(method, 'base model')} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """Accuracy per task and method at the first seed, with its 95% Wilson interval; chance as a reference line."""
    categories = [*TASKS, "mean"]
    series = []
    for method, entry in summary.items():
        test = entry["test"] if method == "base" else next(iter(entry["seeds"].values()))
        cells = [test["tasks"][t] for t in TASKS] + [test["mean"]]
        series.append({"label": METHOD_NAMES.get(method, "base model"), "color": METHOD_COLORS.get(method, "#7f7f7f"),
                       "y": [c["accuracy"] for c in cells], "low": [c["interval"][0] for c in cells],
                       "high": [c["interval"][1] for c in cells]})
    chance = statistics.fmean(CHANCE.values())
    svg.dot_plot(out / "commonsense_accuracy.svg", categories, series,
                 "Commonsense accuracy per task (95% Wilson intervals, first seed)", "accuracy",
                 hline=(chance, f"mean chance {chance:.2f}"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = Results(args.out / "commonsense.json", "commonsense")
    exp = Experiment(args)
    summary = run_experiment(exp, results)
    results.save(summary=summary)
    plot(summary, args.out)
    print(report(summary))
    print(results.account())
    return {"summary": summary, "parts": results.parts}


if __name__ == "__main__":
    command.run(main)
