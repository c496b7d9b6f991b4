"""The LoRA-SB study: four claims of the paper, measured by this code on a real pretrained checkpoint.

    python experiments/study.py --out runs/study   # SmolLM2-135M-Instruct, GSM8K, fp32 on CPU: about 90 minutes
    python experiments/study.py --device cuda --model Qwen/Qwen2.5-0.5B --steps 400 --batch_size 32
    python experiments/study.py --quick --model DIR --data_dir DIR --out DIR   # every part on a tiny budget

The model defaults to $LORASB_SMOLLM2_DIR (a local SmolLM2-135M-Instruct folder) or else the hub's
HuggingFaceTB/SmolLM2-135M-Instruct; GSM8K to $LORASB_GSM8K_DIR or else the download. Every figure goes to
<--out>/study.json (runs/study by default) as soon as its part is done (a part is one training run or one measurement),
so an interrupted study continues where it stopped and never recomputes a finished part; the plots (SVG) and a
one-screen summary come at the end. A part is reused only from a file made with the same settings (the budget, the
model's weights by fingerprint, the data by sha256, seed, device, dtype), and a rerun says what it reused, at its start
and at its end: to compute anew, pass another --out. The training runs are the trainer's own phases and its own loop
(common.run_training: train_gsm8k.plan_training, initialize_adapters, make_optimizer, train), evaluated by its
held_out_loss and generate_answers: there is no second training loop.

The claims:
  1. The initialization captures the full fine-tuning gradient (optimal approximation), and keeps capturing it during
     training (direction preserving): rho = sum ||P_B G P_A||^2 / sum ||G||^2 over the target layers, on probe
     examples nothing else sees, for LoRA-SB's B, A, LoRA-XS's, random orthonormal ones and the rank-r ceiling.
  2. Orthonormal B and A make the plain gradient of R the optimal one: the same B R A written as (U S) I V^T.
  3. The paper's ordering and convergence: full fine-tuning, LoRA r=32, LoRA-XS r=96, LoRA-SB r=96, each at the
     paper's lr 1e-4 and at its best lr of a grid chosen on a validation split (neither training nor test data).
  4. How the initialization's inputs matter: the number of samples, gradient vs random, sign vs SGD rule, exact vs
     randomized SVD, and the size of the initial jump lr_1.
"""

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python experiments/study.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import lorasb  # noqa: E402
import train_gsm8k as trainer  # noqa: E402
from experiments import common, svg  # noqa: E402
from experiments.common import METHOD_COLORS, METHOD_NAMES, Results  # noqa: E402
from machinery import command, datasets, reporting  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LAYER_TYPES = lorasb.DEFAULT_TARGETS
PAPER_LR = 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Settings: the CPU budget (the default) and the quick one; every number that shapes a figure is in here.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Budget:
    steps: int = 30  # optimizer steps of each claim-3 run
    batch_size: int = 4  # examples per step (every run)
    micro_batch_size: int = 4
    warmup_ratio: float = 0.1  # the same schedule shape for every run: linear warmup, then cosine
    max_length: int = 320  # tokens per training example
    rank: int = 96  # LoRA-SB and LoRA-XS
    lora_rank: int = 32
    lr_grid: tuple = (("full", (1e-5, 3e-5, 1e-4)), ("lora", (1e-4, 3e-4, 1e-3)), ("loraxs", (1e-4, 3e-4, 1e-3)),
                      ("lorasb", (1e-4, 3e-4, 1e-3)))
    num_init_samples: int = 32  # the trainer's default on GSM8K: 0.1% of the training set, at least 32
    probe_examples: int = 16  # training examples held out of everything, where rho is measured
    probe_every: int = 15  # steps between probes along a run
    validation_examples: int = 32  # training examples held out of training, for choosing the lr
    test_solutions: int = 128  # GSM8K test solutions for the held-out loss
    accuracy_questions: int = 32  # GSM8K test questions for greedy accuracy (of the base and each best-lr run)
    max_new_tokens: int = 256  # the authors' GSM8K budget
    eval_batch_size: int = 32
    ablation_steps: int = 10  # optimizer steps of each claim-4 run
    init_samples: tuple = (1, 4, 16, 64, 256)
    lr_1_values: tuple = (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)


QUICK = Budget(steps=4, batch_size=2, micro_batch_size=1, rank=4, lora_rank=2,
               lr_grid=(("full", (1e-4, 1e-3, 1e-2)), ("lora", (1e-4, 1e-3, 1e-2)), ("loraxs", (1e-4, 1e-3, 1e-2)),
                        ("lorasb", (1e-4, 1e-3, 1e-2))),
               num_init_samples=4, probe_examples=2, probe_every=2, validation_examples=4, test_solutions=4,
               accuracy_questions=2, max_new_tokens=6, eval_batch_size=2, ablation_steps=2, init_samples=(1, 2, 4),
               lr_1_values=(1e-4, 1e-2))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_gsm8k_run_arguments(p)
    p.add_argument("--out", default=None, help="folder of study.json, the plots and the trained weights (default: "
                   "runs/study, or runs/study-quick with --quick; the committed results are --out experiments/results)")
    p.add_argument("--quick", action="store_true", help="a tiny budget: every part runs, the figures mean nothing")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each claim-3 run")
    p.add_argument("--batch_size", type=int, default=None, help="examples per optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=None, help="examples per forward pass")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    budget = QUICK if args.quick else Budget()
    for name in ("steps", "batch_size", "micro_batch_size"):
        if getattr(args, name) is not None:
            budget = Budget(**{**vars(budget), name: getattr(args, name)})
    args.budget = budget
    args.out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    return args


# ---------------------------------------------------------------------------------------------------------------------
# The data: GSM8K train split into a training pool, probe examples and a validation split; GSM8K test for the end.
# ---------------------------------------------------------------------------------------------------------------------

class Study:
    """The model folder, tokenizer and data every part shares, and trainer arguments for each run."""

    def __init__(self, args):
        self.args, self.budget = args, args.budget
        base = self.trainer_args("lorasb", self.budget.rank, PAPER_LR, self.budget.steps)
        self.setup = trainer.Setup.from_args(base)
        loaded = trainer.load(base, self.setup)
        self.folder, self.tokenizer = loaded.folder, loaded.tokenizer
        self.eos_ids, self.pad_id = loaded.eos_ids, loaded.tokenizer.pad_id
        rows = data.load_gsm8k("train", datasets.gsm8k_dir(args.data_dir))
        held = self.budget.probe_examples + self.budget.validation_examples
        self.validation = rows[-self.budget.validation_examples:]
        probe_pairs = loaded.pairs[-held:-self.budget.validation_examples]
        self.examples, self.truncated = data.tokenize_dataset(self.tokenizer, loaded.pairs[:-held],
                                                              self.budget.max_length)
        self.probe, _ = data.tokenize_dataset(self.tokenizer, probe_pairs, self.budget.max_length)
        self.test = data.load_gsm8k("test", datasets.gsm8k_dir(args.data_dir))
        # the trained weights of the claim-3 runs, kept for their evaluation (outside the committed results)
        self.cache = args.out / "trained" if args.quick else Path("runs") / "study-trained"  # made when first used

    def trainer_args(self, method: str, rank: int | None, lr: float, steps: int, **options) -> argparse.Namespace:
        """train_gsm8k.py's own arguments for one run (the trainer parses and checks them); None leaves a default."""
        b = self.budget
        settings = {"model": self.args.model, "method": method, "rank": rank, "lr": lr, "max_steps": steps,
                    "batch_size": b.batch_size, "micro_batch_size": b.micro_batch_size, "warmup_ratio": b.warmup_ratio,
                    "max_length": b.max_length, "seed": self.args.seed, "num_init_samples": b.num_init_samples,
                    "eval_batch_size": b.eval_batch_size, "max_new_tokens": b.max_new_tokens,
                    "data_dir": self.args.data_dir, "device": self.args.device, "dtype": self.args.dtype,
                    "out_dir": self.args.out / "trainer", **options}
        return common.trainer_arguments(settings)

    def base_model(self, setup: trainer.Setup) -> torch.nn.Module:
        return common.base_model(self.folder, setup)


# ---------------------------------------------------------------------------------------------------------------------
# Claim 1's measurement: the fraction of the full gradient a subspace captures.
# ---------------------------------------------------------------------------------------------------------------------

def full_gradient(study: Study, model, setup: trainer.Setup) -> dict[str, torch.Tensor]:
    """G = dL/dW of every target weight, the mean-loss gradient over the probe examples, at the model's current W
    (for an adapted layer W = W0 + B R A, whose gradient is that of W0 = base.weight). lorasb.estimate_first_update's
    "sgd" rule returns -lr * G, so lr = -1 gives G itself, with the same memory-lean accumulation."""
    adapted = bool(lorasb.adapters(model))
    batches = data.Batches(study.probe, study.budget.micro_batch_size, seed=0, shuffle=False, pad_id=study.pad_id)

    def loss_fn(m, batch):
        with setup.autocast():
            return trainer.causal_lm_loss(m, trainer.to_device(batch, setup.device))

    grads = lorasb.estimate_first_update(model, batches, loss_fn, len(study.probe), lr=-1.0, rule="sgd",
                                         targets=("base",) if adapted else lorasb.DEFAULT_TARGETS)
    return {name.removesuffix(".base"): g for name, g in grads.items()}


def orthonormal_basis(m: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (columns) of the column space of m (full column rank)."""
    return torch.linalg.qr(m.double())[0].float()


def subspaces(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (orthonormal basis of col(B), orthonormal basis of row(A))} of a model's adapters."""
    return {name: (orthonormal_basis(m.B), orthonormal_basis(m.A.T)) for name, m in lorasb.adapters(model).items()}


def random_subspaces(grads: dict[str, torch.Tensor], rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: (orthonormal_basis(torch.randn(G.shape[0], rank, generator=g)).to(G.device),
                   orthonormal_basis(torch.randn(G.shape[1], rank, generator=g)).to(G.device))
            for name, G in grads.items()}


def captured(grads: dict[str, torch.Tensor], spaces: dict[str, dict], rank: int) -> dict:
    """rho = sum_l ||P_B G_l P_A||_F^2 / sum_l ||G_l||_F^2 for each named set of subspaces, and the ceiling, the top-r
    singular values' share sum_l sum_{i<=r} s_i(G_l)^2 / sum_l ||G_l||_F^2 (Eckart-Young: no rank-r pair B, A can
    capture more of any layer). With orthonormal bases Q_B, Q_A: ||P_B G P_A||_F = ||Q_B^T G Q_A||_F.
    Returns {"all": {name: rho}, "by_type": {q_proj: {name: rho}, ...}}."""
    sums = {t: {"G": 0.0, "ceiling": 0.0, **{k: 0.0 for k in spaces}} for t in ("all", *LAYER_TYPES)}
    for layer, G in grads.items():  # fp32 products and SVDs, each layer's sum in fp64
        parts = {"G": G.double().square().sum(), "ceiling": torch.linalg.svdvals(G)[:rank].double().square().sum()}
        for name, space in spaces.items():
            qb, qa = space[layer]
            parts[name] = (qb.T @ G @ qa).double().square().sum()
        for t in ("all", layer.rsplit(".", 1)[-1]):
            for k, v in parts.items():
                sums[t][k] += v.item()
    shares = {t: {k: v / s["G"] for k, v in s.items() if k != "G"} for t, s in sums.items() if s["G"] > 0}
    return {"all": shares.pop("all"), "by_type": shares}


# ---------------------------------------------------------------------------------------------------------------------
# Training runs: the trainer's phases, with probes along the way.
# ---------------------------------------------------------------------------------------------------------------------

def train_run(study: Study, method: str, rank: int | None, lr: float, steps: int, probe=None, probe_every: int = 0,
              adjust_init=None, save_as: str | None = None, **options) -> dict:
    """One run of the trainer on the study's training pool (common.run_training: initialize_adapters, then the trainer's
    own loop for `steps` steps), then the validation loss. `probe(model, setup)` is called at step 0 and, with
    probe_every, every probe_every steps; `adjust_init(model)` may rewrite the adapters after the initialization;
    `save_as` keeps the trained weights for a later evaluation."""
    args = study.trainer_args(method, rank, lr, steps, **options)
    run = common.run_training(study.folder, study.examples, study.pad_id, args, f"{method} lr {lr:g}", probe=probe,
                           probe_every=probe_every, adjust_init=adjust_init)
    validation = None
    if not run.diverged:
        run.model.eval()
        validation = common.held_out_loss(run.model, study.tokenizer, list(map(data.gsm8k_pair, study.validation)),
                                          args, run.setup)
        if save_as:
            study.cache.mkdir(parents=True, exist_ok=True)
            trainer.save_trainable(run.model, study.cache / f"{save_as}.safetensors", method, str(study.args.model))
    return {"method": method, "rank": rank, "lr": lr, "lr_1": run.plan.lr_1, "steps": run.plan.total_steps,
            "losses": run.losses, "validation_loss": validation, "probes": run.probes,
            "init_seconds": round(run.init_seconds, 1), "train_seconds": round(run.train_seconds, 1),
            "trainable": run.trainable}


def evaluate_saved(study: Study, name: str, method: str, accuracy: bool = True) -> dict:
    """The held-out loss on the first test_solutions GSM8K test solutions and, with `accuracy`, greedy accuracy on the
    first accuracy_questions (the authors' prompt, stop strings and scoring), for the trained weights of run `name`, or
    for the base model when method is "base", prepared as the trainer evaluates (trainer.prepare_evaluation). The
    held-out loss is saved under "test_loss", the key the committed study.json has always used for it."""
    b = study.budget
    args = study.trainer_args("lorasb" if method == "base" else method, b.rank, PAPER_LR, b.steps)
    setup = trainer.Setup.from_args(args)
    model = study.base_model(setup)
    if method != "base":
        common.load_trained(model, study.cache / f"{name}.safetensors", method)
    trainer.prepare_evaluation(model, args, setup)
    pairs = list(map(data.gsm8k_pair, study.test[:b.test_solutions]))
    held_out_loss = common.held_out_loss(model, study.tokenizer, pairs, args, setup)
    if not accuracy:
        return {"test_loss": held_out_loss}
    metrics, interval = common.greedy_accuracy(model, study.tokenizer, study.test[:b.accuracy_questions],
                                               study.eos_ids, args, setup, "gsm8k")
    return {"test_loss": held_out_loss, **metrics, "accuracy_95ci": interval}


def smoothed(losses: list[float], window: int = 5) -> list[float]:
    """Trailing mean over `window` steps (fewer at the start): per-step losses of small batches are noisy."""
    return [statistics.fmean(losses[max(0, i + 1 - window):i + 1]) for i in range(len(losses))]


# ---------------------------------------------------------------------------------------------------------------------
# The four claims.
# ---------------------------------------------------------------------------------------------------------------------

def lorasb_model(study: Study, lr: float, steps: int):
    """The base model with LoRA-SB adapters, initialized as the trainer does for this lr and schedule."""
    args = study.trainer_args("lorasb", study.budget.rank, lr, steps)
    setup = trainer.Setup.from_args(args)
    model = study.base_model(setup)
    trainer.initialize_adapters(model, study.examples, study.pad_id, args,
                                trainer.plan_training(args, len(study.examples), 1), setup)
    return model, setup, args


def claim1_at_init(study: Study) -> dict:
    """rho at W0 for LoRA-SB's subspace, LoRA-XS's (the SVD of W0), random ones and the ceiling, at rank `rank`
    and, with the top lora_rank directions of each, at LoRA's rank."""
    b = study.budget
    sb, setup, _ = lorasb_model(study, PAPER_LR, b.steps)
    xs = study.base_model(setup)
    lorasb.add_adapters(xs, "loraxs", b.rank)
    grads = full_gradient(study, study.base_model(setup), setup)
    spaces = {"lorasb": subspaces(sb), "loraxs": subspaces(xs), "random": random_subspaces(grads, b.rank, 0)}
    top = {name: {layer: (qb[:, :b.lora_rank], qa[:, :b.lora_rank]) for layer, (qb, qa) in s.items()}
           for name, s in spaces.items() if name != "random"}  # the leading singular directions come first
    top["random"] = random_subspaces(grads, b.lora_rank, 0)
    return {"rank": b.rank, "rho": captured(grads, spaces, b.rank), "small_rank": b.lora_rank,
            "rho_small_rank": captured(grads, top, b.lora_rank)}


def orthonormal_to_scaled(model) -> None:
    """Rewrite every adapter's B R A as (B R) I A: the same product and subspace, but B = U_r S_r is no longer
    orthonormal, so the plain gradient of R is no longer the optimal one (claim 2)."""
    with torch.no_grad():
        for m in lorasb.adapters(model).values():
            m.B.copy_(m.B @ m.R)
            m.R.copy_(torch.eye(m.rank, device=m.R.device))


def claim2_at_init(study: Study) -> dict:
    """At LoRA-SB's starting point, the W-space step of the plain R-gradient, B g_R A with g_R = B^T G A^T, against
    the optimal one, B X* A = P_B G P_A (lorasb.optimal_r_gradient): their cosine, relative error and norm ratio, for
    the orthonormal factors (B = U_r, R = S_r, A = V_r^T) and for the same product written B = U_r S_r, R = I."""
    sb, setup, _ = lorasb_model(study, PAPER_LR, study.budget.steps)
    grads = full_gradient(study, sb, setup)
    adapters = lorasb.adapters(sb)
    variants = {"orthonormal": {n: (m.B, m.A) for n, m in adapters.items()},
                "scaled": {n: (m.B @ m.R, m.A) for n, m in adapters.items()}}
    out = {}
    for variant, factors in variants.items():
        sums = {t: torch.zeros(4, dtype=torch.float64) for t in ("all", *LAYER_TYPES)}
        for layer, (B, A) in factors.items():
            G, B, A = grads[layer].double(), B.double(), A.double()
            plain = B @ lorasb.r_gradient(G, B, A) @ A
            optimal = B @ lorasb.optimal_r_gradient(G, B, A) @ A
            terms = torch.stack([(plain * optimal).sum(), plain.square().sum(), optimal.square().sum(),
                                 (plain - optimal).square().sum()]).cpu()
            for t in ("all", layer.rsplit(".", 1)[-1]):
                sums[t] += terms
        out[variant] = {t: {"cosine": (dot / (pp * oo).sqrt()).item(), "relative_error": (dd / oo).sqrt().item(),
                            "norm_ratio": (pp / oo).sqrt().item()} for t, (dot, pp, oo, dd) in sums.items()}
    return out


def probe_rho(study: Study, fixed_spaces: dict | None = None):
    """A probe for train_run: on the current full gradient, rho of the run's own adapters (or of `fixed_spaces`, for
    full fine-tuning), of random subspaces of the same rank, and the ceiling."""
    def probe(model, setup) -> dict:
        grads = full_gradient(study, model, setup)
        own = fixed_spaces if fixed_spaces is not None else subspaces(model)
        rank = next(iter(own.values()))[0].shape[1]
        return captured(grads, {"own": own, "random": random_subspaces(grads, rank, 0)}, rank)
    return probe


def claim1_probe(study: Study, method: str, lr: float):
    """The probe along the paper-lr runs: LoRA-SB and LoRA-XS against their own subspace, full fine-tuning against
    the fixed LoRA-SB subspace of step 0; None for the other runs."""
    if lr != PAPER_LR or method == "lora":
        return None
    if method == "full":
        return probe_rho(study, subspaces(lorasb_model(study, PAPER_LR, study.budget.steps)[0]))
    return probe_rho(study)


def run_name(method: str, rank: int | None, lr: float) -> str:
    return method + (f"-r{rank}" if rank else "") + f"-lr{lr:g}"


def claim3(study: Study, results: Results) -> dict:
    """Every method over its lr grid (with probes along the paper-lr runs of LoRA-SB, LoRA-XS and full fine-tuning:
    claim 1), the best lr of each on the validation split, then the test evaluation of the best and paper-lr runs."""
    b = study.budget
    ranks = common.method_ranks(b)
    chosen = {}
    for method, grid in b.lr_grid:
        for lr in grid:
            name = run_name(method, ranks[method], lr)
            results.part(f"claim3/{name}", lambda: train_run(study, method, ranks[method], lr, b.steps,
                                                              probe=claim1_probe(study, method, lr),
                                                              probe_every=b.probe_every, save_as=name))
        runs = {lr: results.get(f"claim3/{run_name(method, ranks[method], lr)}") for lr in grid}
        finite = {lr: r["validation_loss"] for lr, r in runs.items() if r["validation_loss"] is not None}
        best = min(finite, key=finite.get)
        chosen[method] = {"best_lr": best, "best_at_grid_edge": best in (grid[0], grid[-1])}
    results.part("claim3/eval/base", lambda: evaluate_saved(study, "base", "base"))
    for method, choice in chosen.items():
        for lr in sorted({choice["best_lr"], PAPER_LR}):
            name = run_name(method, ranks[method], lr)
            results.part(f"claim3/eval/{name}", lambda: evaluate_saved(study, name, method,
                                                                       accuracy=lr == choice["best_lr"]))
    return chosen


def claim2_runs(study: Study, results: Results, lrs: list[float]) -> None:
    """The scaled variant (B = U_r S_r, R = I) trained at the same lrs as claim 3's orthonormal LoRA-SB runs."""
    b = study.budget
    for lr in lrs:
        results.part(f"claim2/scaled-lr{lr:g}", lambda: train_run(study, "lorasb", b.rank, lr, b.steps,
                                                                  adjust_init=orthonormal_to_scaled))


def random_sign_init(lr_1: float, seed: int):
    """adjust_init for claim 4's control: B, R, A from the SVD of -lr_1 sign(N), with N Gaussian noise of each
    layer's shape: the spectrum of a sign matrix of the same size, but no information from the data."""
    def adjust(model) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lorasb.adapters(model).values():
                noise = torch.randn(m.B.shape[0], m.A.shape[1], generator=g).to(m.B.device)
                for buffer, value in zip((m.B, m.R, m.A), lorasb.lorasb_factors(lorasb.adamw_first_step(noise, lr_1),
                                                                               m.rank)):
                    buffer.copy_(value)
    return adjust


def claim4(study: Study, results: Results) -> None:
    """Each variant of the initialization: rho at step 0 (on the probe gradient at W0), then ablation_steps steps
    at the paper lr; and the size of the initial jump."""
    b = study.budget
    variants = {f"samples-{n}": {"num_init_samples": n} for n in sorted({*b.init_samples, b.num_init_samples})}
    variants |= {"rule-sgd": {"init_rule": "sgd"}, "svd-randomized": {"init_svd": "randomized"}, "random-init": {}}
    grads_at_w0 = {}

    def rho_at_w0(model, setup) -> dict:  # the same probe gradient for every variant: computed once
        if not grads_at_w0:
            grads_at_w0.update(full_gradient(study, study.base_model(setup), setup))
        return captured(grads_at_w0, {"own": subspaces(model)}, b.rank)

    lr_1 = trainer.plan_training(study.trainer_args("lorasb", b.rank, PAPER_LR, b.ablation_steps),
                                 len(study.examples), 1).lr_1
    for name, options in variants.items():
        adjust = random_sign_init(lr_1, seed=1) if name == "random-init" else None
        results.part(f"claim4/{name}", lambda: train_run(study, "lorasb", b.rank, PAPER_LR, b.ablation_steps,
                                                          probe=rho_at_w0, adjust_init=adjust, **options))
    results.part("claim4/lr_1", lambda: initial_jump(study))


def initial_jump(study: Study) -> dict:
    """Validation loss right after the initialization, with no training, as lr_1 varies: the LoRA-SB start
    W0 + [dW]_r and, for reference, the full-rank sign step W0 + dW, with dW = -lr_1 sign(G). B and A do not depend on
    lr_1 and R is proportional to it, so one estimate (at lr_1 = 1) serves every value."""
    b = study.budget
    args = study.trainer_args("lorasb", b.rank, PAPER_LR, b.steps)
    setup = trainer.Setup.from_args(args)
    plan = trainer.plan_training(args, len(study.examples), 1)
    model = study.base_model(setup)
    groups = trainer.estimate_update_from_examples(model, study.examples, study.pad_id, args,
                                                   dataclasses.replace(plan, lr_1=1.0), setup)
    unit_step = {name: update for group in groups for name, update in group.items()}  # -sign(G)
    targets = lorasb.find_targets(model)
    w0 = {n: m.weight.detach().clone() for n, m in targets.items()}
    model.eval()

    def validation_loss() -> float:
        return common.held_out_loss(model, study.tokenizer, list(map(data.gsm8k_pair, study.validation)), args, setup)

    full_rank, rank_r = [], []
    for lr_1 in b.lr_1_values:
        with torch.no_grad():
            for n, m in targets.items():
                m.weight.copy_(w0[n] + lr_1 * unit_step[n].to(w0[n].dtype))
        full_rank.append(validation_loss())
    with torch.no_grad():
        for n, m in targets.items():
            m.weight.copy_(w0[n])
    lorasb.add_adapters(model, "lorasb", b.rank, updates=unit_step)
    unit_r = {n: m.R.detach().clone() for n, m in lorasb.adapters(model).items()}
    for lr_1 in b.lr_1_values:
        with torch.no_grad():
            for n, m in lorasb.adapters(model).items():
                m.R.copy_(lr_1 * unit_r[n])
        rank_r.append(validation_loss())
    return {"lr_1": list(b.lr_1_values), "rank_r": rank_r, "full_rank": full_rank, "study_lr_1": plan.lr_1}


# ---------------------------------------------------------------------------------------------------------------------
# The report: one screen of tables (also written to study.md) and the plots.
# ---------------------------------------------------------------------------------------------------------------------

def describe(study: Study) -> dict:
    """What the study ran on (recorded once)."""
    return {"training_pool": len(study.examples), "truncated": study.truncated, "probe": len(study.probe),
            "validation": len(study.validation), "torch": torch.__version__, "device": str(study.setup.device),
            "threads": torch.get_num_threads()}


def fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def final_loss(run: dict) -> float | None:
    """The mean training loss of the last 5 steps (None when the run diverged)."""
    losses = run["losses"]
    return None if losses[-1] is None else statistics.fmean(losses[-5:])


def steps_to_reach(losses: list[float], level: float) -> int | None:
    return next((i + 1 for i, loss in enumerate(smoothed(losses)) if loss <= level), None)


def claim3_rows(results: Results, chosen: dict, b: Budget) -> list[str]:
    ranks = common.method_ranks(b)
    best = {m: results.get(f"claim3/{run_name(m, ranks[m], c['best_lr'])}") for m, c in chosen.items()}
    level = max(min(smoothed(r["losses"])) for r in best.values())  # a level every method reaches
    base = results.get("claim3/eval/base")
    lines = [f"Claim 3: {b.steps} steps of {b.batch_size} examples, lr grid per method chosen on "
             f"{b.validation_examples} validation examples; test loss on {b.test_solutions} GSM8K test solutions, "
             f"greedy accuracy on the first {b.accuracy_questions} questions [95% Wilson interval]; "
             f"'steps to {level:.3f}' = first step whose "
             f"5-step mean training loss reaches the level every method reaches.", "",
             "| method | trainable | lr | validation loss | final train loss | steps to level | test loss | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| base model | 0 | - | - | - | - | {base['test_loss']:.4f} | {accuracy_text(base)} |"]
    for method, choice in chosen.items():
        for lr in sorted({choice["best_lr"], PAPER_LR}):
            name = run_name(method, ranks[method], lr)
            run, ev = results.get(f"claim3/{name}"), results.get(f"claim3/eval/{name}")
            tags = [t for t, on in (("best", lr == choice["best_lr"]), ("paper", lr == PAPER_LR),
                                    ("grid edge", lr == choice["best_lr"] and choice["best_at_grid_edge"])) if on]
            label = METHOD_NAMES[method] + (f" r={run['rank']}" if run["rank"] else "")
            reached = steps_to_reach(run["losses"], level) if run["losses"][-1] is not None else None
            lines.append(f"| {label} | {run['trainable']:,} | {lr:g} ({', '.join(tags)}) | "
                         f"{fmt(run['validation_loss'])} | {fmt(final_loss(run))} | {fmt(reached, 'd')} | "
                         f"{fmt(ev['test_loss'])} | {accuracy_text(ev)} |")
    return lines


def accuracy_text(ev: dict) -> str:
    if "accuracy" not in ev:
        return "-"
    low, high = ev["accuracy_95ci"]
    return f"{ev['correct']}/{ev['total']} = {ev['accuracy']:.1%} [{low:.1%}, {high:.1%}]"


def summarize(results: Results, chosen: dict, b: Budget) -> str:
    """The study's figures as markdown tables, claim by claim."""
    c1 = results.get("claim1/at_init")
    lines = [f"Claim 1: rho = captured share of the full gradient's squared norm on {b.probe_examples} probe examples, "
             f"at W0.", "", "| subspace | rank | all layers | " + " | ".join(LAYER_TYPES) + " |",
             "|---|---:|---:|" + "---:|" * len(LAYER_TYPES)]
    for key, rank in (("rho", c1["rank"]), ("rho_small_rank", c1["small_rank"])):
        for name in ("lorasb", "loraxs", "random", "ceiling"):
            label = {"lorasb": "LoRA-SB (B, A of the init)", "loraxs": "LoRA-XS (SVD of W0)", "random": "random",
                     "ceiling": "ceiling (top-r SVD of G)"}[name]
            lines.append(f"| {label} | {rank} | {c1[key]['all'][name]:.4f} | "
                         + " | ".join(f"{c1[key]['by_type'][t][name]:.4f}" for t in LAYER_TYPES) + " |")
    lines += ["", "rho along training (own = the run's fixed subspace; for full fine-tuning, LoRA-SB's from step 0):",
              "", "| run | step | own | ceiling | random |", "|---|---:|---:|---:|---:|"]
    for method, rank in (("lorasb", b.rank), ("loraxs", b.rank), ("full", None)):
        run = results.get(f"claim3/{run_name(method, rank, PAPER_LR)}")
        for step, probe in run["probes"].items():
            a = probe["all"]
            lines.append(f"| {METHOD_NAMES[method]} lr {PAPER_LR:g} | {step} | {a['own']:.4f} | {a['ceiling']:.4f} | "
                         f"{a['random']:.5f} |")
    c2 = results.get("claim2/at_init")
    lines += ["", "Claim 2: the plain R-gradient's W-space step against the optimal P_B G P_A at LoRA-SB's start.", "",
              "| factors | cosine | relative error | norm ratio plain/optimal | final train loss (lr) |",
              "|---|---:|---:|---:|---|"]
    lorasb_lrs = sorted({PAPER_LR, chosen["lorasb"]["best_lr"]})
    for variant in ("orthonormal", "scaled"):
        a = c2[variant]["all"]
        runs = [results.get(f"claim3/{run_name('lorasb', b.rank, lr)}") if variant == "orthonormal"
                else results.get(f"claim2/scaled-lr{lr:g}") for lr in lorasb_lrs]
        trained = ", ".join(f"{fmt(final_loss(r))} ({lr:g})" for r, lr in zip(runs, lorasb_lrs))
        name = "B = U_r, R = S_r, A = V_r^T" if variant == "orthonormal" else "B = U_r S_r, R = I, A = V_r^T"
        lines.append(f"| {name} | {a['cosine']:.6f} | {a['relative_error']:.2e} | {a['norm_ratio']:.3g} | {trained} |")
    lines += ["", *claim3_rows(results, chosen, b), "",
              f"Claim 4: LoRA-SB r={b.rank}, {b.ablation_steps} steps at lr {PAPER_LR:g}; rho at W0 on the probe "
              f"examples.", "", "| initialization | rho at step 0 | final train loss | validation loss |",
              "|---|---:|---:|---:|"]
    for name, run in results.data["parts"].items():
        if name.startswith("claim4/") and name != "claim4/lr_1":
            lines.append(f"| {name.removeprefix('claim4/')} | {run['probes']['0']['all']['own']:.4f} | "
                         f"{fmt(final_loss(run))} | {fmt(run['validation_loss'])} |")
    jump = results.get("claim4/lr_1")
    lines += ["", f"Initial jump (no training; the study's runs use lr_1 = {jump['study_lr_1']:.2g}): validation loss",
              "", "| lr_1 | " + " | ".join(f"{v:g}" for v in jump["lr_1"]) + " |",
              "|---|" + "---:|" * len(jump["lr_1"]),
              "| W0 + [dW]_r (LoRA-SB start) | " + " | ".join(f"{v:.4f}" for v in jump["rank_r"]) + " |",
              "| W0 + dW (full-rank sign step) | " + " | ".join(f"{v:.4f}" for v in jump["full_rank"]) + " |"]
    seconds = sum(part["seconds"] for part in results.data["parts"].values())
    lines += ["", f"Compute time of all parts: {seconds / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


def plot(results: Results, chosen: dict, b: Budget, out: Path) -> None:
    ranks = common.method_ranks(b)
    curves = []
    for method, choice in chosen.items():
        run = results.get(f"claim3/{run_name(method, ranks[method], choice['best_lr'])}")
        if run["losses"][-1] is not None:
            curves.append({"label": f"{METHOD_NAMES[method]} (lr {choice['best_lr']:g})",
                           "x": list(range(1, len(run["losses"]) + 1)), "y": smoothed(run["losses"]),
                           "color": METHOD_COLORS[method]})
    svg.line_plot(out / "loss_curves.svg", curves, "Training loss at each method's best lr (5-step mean)",
                  "optimizer step", "training loss")
    series = []
    for method, rank, label in (("lorasb", b.rank, "LoRA-SB run, its subspace"),
                                ("loraxs", b.rank, "LoRA-XS run, its subspace"),
                                ("full", None, "full FT run, LoRA-SB's step-0 subspace")):
        color = METHOD_COLORS[method]
        probes = results.get(f"claim3/{run_name(method, rank, PAPER_LR)}")["probes"]
        steps = [int(s) for s in probes]
        series.append({"label": label, "x": steps, "y": [p["all"]["own"] for p in probes.values()], "color": color})
        series.append({"label": f"ceiling, {METHOD_NAMES[method]} run", "x": steps, "color": color, "dashed": True,
                       "y": [p["all"]["ceiling"] for p in probes.values()]})
    svg.line_plot(out / "rho_over_training.svg", series, f"Captured gradient share rho (rank {b.rank}, lr "
                  f"{PAPER_LR:g})", "optimizer step", "rho", logy=True)
    samples = sorted({*b.init_samples, b.num_init_samples})
    rho = [results.get(f"claim4/samples-{n}")["probes"]["0"]["all"]["own"] for n in samples]
    c1 = results.get("claim1/at_init")["rho"]["all"]
    svg.line_plot(out / "rho_vs_init_samples.svg",
                  [{"label": "LoRA-SB init", "x": samples, "y": rho, "color": METHOD_COLORS["lorasb"]},
                   {"label": "LoRA-XS", "x": samples, "y": [c1["loraxs"]] * len(samples), "dashed": True,
                    "color": METHOD_COLORS["loraxs"]}],
                  f"rho at W0 against the number of init samples (rank {b.rank})", "init samples", "rho", logx=True,
                  logy=True, hline=(c1["ceiling"], "ceiling"))
    jump = results.get("claim4/lr_1")
    svg.line_plot(out / "initial_jump.svg", [{"label": f"W0 + [dW]_r (rank {b.rank})", "x": jump["lr_1"],
                                              "y": jump["rank_r"]},
                                             {"label": "W0 + dW (full rank)", "x": jump["lr_1"], "y": jump["full_rank"],
                                              "dashed": True}],
                  "Validation loss right after the initialization", "lr_1", "validation loss", logx=True)


def settings(args, study: Study) -> dict:
    """What must match for a study.json to be reused: the budget, the model's name and fingerprint, the data's sha256,
    the seed, device and dtype."""
    model = Path(args.model).name if Path(args.model).is_dir() else args.model
    return {**{k: (list(map(list, v)) if k == "lr_grid" else list(v) if isinstance(v, tuple) else v)
               for k, v in vars(study.budget).items()},
            "model": model, "seed": args.seed, "device": str(study.setup.device),
            "dtype": str(study.setup.compute_dtype),
            **common.fingerprints(study.folder, {name: datasets.gsm8k_dir(args.data_dir) / name
                                                 for name in ("train.jsonl", "test.jsonl")})}


def main(argv=None) -> dict:
    args = parse_args(argv)
    study = Study(args)
    print(f"study: {reporting.device_line(study.setup)}", flush=True)
    results = Results(args.out / "study.json", "study", json.loads(json.dumps(settings(args, study))))
    results.part("setup", lambda: describe(study))
    results.part("claim1/at_init", lambda: claim1_at_init(study))
    results.part("claim2/at_init", lambda: claim2_at_init(study))
    chosen = claim3(study, results)
    claim2_runs(study, results, sorted({PAPER_LR, chosen["lorasb"]["best_lr"]}))
    claim4(study, results)
    report = summarize(results, chosen, study.budget)
    plot(results, chosen, study.budget, args.out)
    (args.out / "study.md").write_text(report)
    print(report)
    print(results.account())
    return results.data


if __name__ == "__main__":
    command.run(main)
