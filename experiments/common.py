"""What the experiments share: the results file and its reuse rules, one training run through the trainer's own loop,
loading trained weights for evaluation, the evaluation measures, the Wilson interval, and the methods' names.

A training run here is the trainer's phases in the trainer's order (train_gsm8k.Setup.from_args, plan_training,
initialize_adapters, make_optimizer, then train_gsm8k.train, the one training loop of the repository), with
train's after_step recording what an experiment keeps: the loss of every step and, every probe_every steps, a probe.
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import data
import lorasb
import train_gsm8k as trainer
from experiments import svg
from machinery import run_identity
from machinery.files import sha256_file

DEFAULT_MODEL = os.environ.get("LORASB_SMOLLM2_DIR") or "HuggingFaceTB/SmolLM2-135M-Instruct"
# What the tables and plots call each method the trainer trains (--method), and its colour in every plot.
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "loraxs": "LoRA-XS", "lorasb": "LoRA-SB"}
METHOD_COLORS = dict(zip(METHOD_NAMES, svg.COLORS))


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or hub name (default: {DEFAULT_MODEL})")


def add_gsm8k_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --data_dir, --device and --dtype of an experiment on GSM8K (the study and the 4-bit base)."""
    add_model_argument(parser)
    parser.add_argument("--data_dir", default=os.environ.get("LORASB_GSM8K_DIR"),
                        help="GSM8K folder (default: $LORASB_GSM8K_DIR, else downloaded)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on GPU, fp32 on CPU)")


def method_ranks(budget) -> dict[str, int | None]:
    """The rank each method trains at under a budget with a rank (LoRA-SB, LoRA-XS) and a lora_rank."""
    return {"full": None, "lora": budget.lora_rank, "loraxs": budget.rank, "lorasb": budget.rank}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a binomial proportion (sensible at and near 0, unlike p +- z sqrt(pq/n))."""
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


# ---------------------------------------------------------------------------------------------------------------------
# Results: one JSON file of parts, rewritten atomically after every part; a part in it is reused when the settings
# match: the file's settings (the study: a file of other settings is refused) or each part's own (commonsense: a part
# of other settings is computed again).
# ---------------------------------------------------------------------------------------------------------------------

FINGERPRINTS = {"model fingerprint": "the model's weights", "data sha256": "the data"}


def fingerprints(model_folder: Path, data_files: dict[str, Path]) -> dict:
    """What identifies the model and the data beyond their names: the model folder's fingerprint (config.json,
    tokenizer.json and sampled blocks of the weights: machinery.run_identity.model_fingerprint) and the sha256 of
    each data file, under its name in `data_files`."""
    return {"model fingerprint": run_identity.model_fingerprint(model_folder),
            "data sha256": {name: sha256_file(path) for name, path in data_files.items()}}


def reuse_problem(path: Path, stored: dict, settings: dict) -> str | None:
    """Why the parts stored in `path` (with `stored` settings) cannot be reused under `settings`, or None. A file that
    records no fingerprints (made before they were recorded) cannot be checked, so it is not reused."""
    differences = []
    for key in sorted(stored.keys() | settings.keys()):
        old, new = stored.get(key), settings.get(key)
        if key in FINGERPRINTS and old is None:
            continue
        if key == "model fingerprint" and old != new:
            differences.append(f"{FINGERPRINTS[key]} (fingerprint {old[:12]}... there, {new[:12]}... here)")
        elif key == "data sha256" and old != new:
            changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
            differences.append(f"{FINGERPRINTS[key]} (the sha256 of {' and '.join(changed)})")
        elif old != new:
            differences.append(f"{key} {json.dumps(old)} there, {json.dumps(new)} here")
    unverifiable = [label for key, label in FINGERPRINTS.items() if key not in stored]
    if unverifiable:
        return (f"{path} records no fingerprint of {' or of '.join(unverifiable)} it was computed with (it was made "
                f"before the study recorded them), so this run cannot check that its parts fit this model and data"
                + (f"; its settings also differ: {'; '.join(differences)}" if differences else "")
                + ". Pass another --out to compute the study anew (or delete the file).")
    if differences:
        return (f"{path} holds a study computed with other settings: {'; '.join(differences)}. Its parts cannot be "
                f"reused: pass another --out to compute the study with these settings (or delete the file to replace "
                f"it).")
    return None


class Results:
    """An experiment's parts (a part is one training run or one measurement), each saved as soon as it exists, and an
    account of what this run reused and what it computed. With `settings`, the whole file holds parts of those
    settings (a file of other settings is refused: reuse_problem); without, each part carries its own settings."""

    def __init__(self, path: Path, experiment: str, settings: dict | None = None):
        self.path, self.experiment = path, experiment
        self.data = {"parts": {}} if settings is None else {"settings": settings, "parts": {}}
        self.reused, self.computed = [], []
        if not path.is_file():
            return
        existing = json.loads(path.read_text())
        if settings is not None:
            problem = reuse_problem(path, existing.get("settings", {}), settings)
            if problem:
                raise SystemExit(problem)
            if existing["parts"]:
                self.say(f"{path} already holds {len(existing['parts'])} parts computed with these settings (the "
                         f"same model weights, data and budget): they are reused, not computed again. To compute "
                         f"everything anew, pass another --out (or delete the file).")
        self.data = {key: value for key, value in existing.items() if key in self.data}

    @property
    def parts(self) -> dict[str, dict]:
        return self.data["parts"]

    def say(self, text: str) -> None:
        print(f"{self.experiment}: {text}", flush=True)

    def part(self, name: str, compute: Callable[[], dict], settings: dict | None = None) -> dict:
        """Part `name`: from the file when it is there (with `settings`: when it was computed under them), else
        computed now and saved at once."""
        if settings is not None:
            settings = json.loads(json.dumps(settings))  # as the file holds it
        known = self.parts.get(name)
        if known is not None and (settings is None or known["settings"] == settings):
            self.reused.append(name)
            if settings is not None:
                self.say(f"{name}: reused (same settings)")
            return known
        self.say(name + (": settings changed, recomputed" if known else ""))
        t0 = time.time()
        value = compute() | ({} if settings is None else {"settings": settings})
        value["seconds"] = round(time.time() - t0, 1)
        self.parts[name] = json.loads(json.dumps(value))  # exactly what the file holds (str keys)
        self.save()
        self.computed.append(name)
        return self.parts[name]

    def get(self, name: str) -> dict:
        return self.parts[name]

    def save(self, **extra) -> None:
        """Write the file atomically: `extra` (a summary) first, then the settings and the parts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**extra, **self.data}, indent=1) + "\n"
        lorasb.atomic_write(self.path, lambda f: f.write(text.encode()))

    def account(self) -> str:
        """What this run reused and what it computed: said last, so that a replay is never read as a fresh result."""
        if not self.reused:
            return f"{self.experiment}: this run computed all {len(self.computed)} parts; they are in {self.path}."
        text = (f"{self.experiment}: this run reused {len(self.reused)} of {len(self.reused) + len(self.computed)} "
                f"parts from {self.path}, computed earlier with the same settings: {', '.join(self.reused)}. ")
        if self.computed:
            text += f"It computed {len(self.computed)}: {', '.join(self.computed)}. "
        else:
            text += ("It computed nothing new: every figure above was read from that file, and the compute time above "
                     "is what its parts took when they were computed. ")
        return text + f"To compute everything anew, pass another --out (or delete {self.path})."


# ---------------------------------------------------------------------------------------------------------------------
# A training run: the trainer's phases and its loop, recording the losses and the probes.
# ---------------------------------------------------------------------------------------------------------------------

def trainer_arguments(settings: dict) -> argparse.Namespace:
    """train_gsm8k.py's own arguments for one run (the trainer parses and checks them); None leaves a default."""
    return trainer.parse_args([f"--{k}={v}" for k, v in settings.items() if v is not None] + ["--overwrite"])


def base_model(folder: Path, setup: trainer.Setup, quantize: str = "none") -> torch.nn.Module:
    """The pretrained model, on the setup's device with its weights dtype (its linear layers in NF4 with quantize
    "nf4"), as the trainer loads it."""
    return trainer.load_base_model(folder, setup, quantize)


class Diverged(Exception):
    """A step's loss was not finite: the run ends there (every later step would be NaN too)."""


@dataclass
class TrainedRun:
    model: torch.nn.Module
    setup: trainer.Setup
    plan: trainer.Plan
    losses: list[float | None]  # each step's loss; the last is None when the run diverged (and ended there)
    probes: dict[int, dict]  # {step: probe(model, setup)} at step 0 and every probe_every steps
    init_seconds: float
    train_seconds: float

    @property
    def diverged(self) -> bool:
        return self.losses[-1] is None

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def run_training(folder: Path, examples: list[dict], pad_id: int, args: argparse.Namespace, desc: str,
              probe: Callable | None = None, probe_every: int = 0, adjust_init: Callable | None = None) -> TrainedRun:
    """One run of the trainer on `examples` (tokenized): initialize_adapters (then `adjust_init(model)`, which may
    rewrite the adapters), then train_gsm8k.train (the trainer's LR schedule, accumulation, clipping and AdamW), whose
    after_step records each step's loss and, every probe_every steps, `probe(model, setup)` (also called at step 0).
    A non-finite loss ends the run."""
    setup = trainer.Setup.from_args(args)
    model = base_model(folder, setup, args.quantize)
    plan = trainer.plan_training(args, len(examples), 1)
    t0 = time.time()
    trainer.initialize_adapters(model, examples, pad_id, args, plan, setup)
    if adjust_init:
        adjust_init(model)
    init_seconds = time.time() - t0
    optimizer = trainer.make_optimizer(model, args, setup.device)
    batches = data.Batches(examples, args.micro_batch_size, args.seed, pad_id=pad_id)
    probes = {0: probe(model, setup)} if probe else {}
    losses, bar = [], tqdm(total=plan.total_steps, desc=desc, leave=False)

    def after_step(step: int, result: dict) -> None:
        loss = result["loss"].item()
        losses.append(loss if math.isfinite(loss) else None)
        bar.update()
        if losses[-1] is None:
            raise Diverged
        if probe and probe_every and step % probe_every == 0:
            probes[step] = probe(model, setup)

    t0 = time.time()
    try:
        trainer.train(model, optimizer, batches, args, plan, setup, after_step=after_step)
    except Diverged:
        pass
    finally:
        bar.close()
    return TrainedRun(model, setup, plan, losses, probes, init_seconds, time.time() - t0)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: trained weights loaded back, the held-out loss and greedy accuracy as the trainer measures them.
# ---------------------------------------------------------------------------------------------------------------------

def load_trained(model: torch.nn.Module, path: Path, method: str) -> None:
    """Load into the base model what train_gsm8k.save_trainable wrote for `method` at `path`: every weight (full
    fine-tuning), else the adapter."""
    if method == "full":
        model.load_state_dict(lorasb.load_safetensors(path)[0])
    else:
        lorasb.load_adapter(model, path)


def held_out_loss(model, tokenizer, pairs: list[tuple[str, str]], args, setup: trainer.Setup) -> float:
    """train_gsm8k.held_out_loss of (prompt, response) pairs, without gradients, under the setup's autocast."""
    with torch.no_grad(), setup.autocast():
        return trainer.held_out_loss(model, tokenizer, pairs, args, setup)


def greedy_accuracy(model, tokenizer, records: list[dict], eos_ids: set[int], args, setup: trainer.Setup,
             eval_set: str) -> tuple[dict, list[float]]:
    """Greedy answers to `records` of `eval_set` (train_gsm8k.EVAL_TASKS: its prompt, stop strings and scorer):
    the metrics (accuracy, correct, invalid, total) and the accuracy's 95% Wilson interval."""
    with torch.no_grad(), setup.autocast():
        rows = trainer.generate_answers(model, tokenizer, records, eos_ids, args, setup, eval_set)
    metrics, _ = trainer.EVAL_TASKS[eval_set].score(rows)
    return metrics, wilson_interval(metrics["correct"], metrics["total"])
