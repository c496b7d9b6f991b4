"""LoRA-SB: low-rank fine-tuning where only an r x r matrix trains, initialized from an estimate of the first full
fine-tuning update (Ponkshe, Singhal et al., arXiv 2411.19557).

Each adapted linear layer computes

    y = W0 x + b + s * B R A x          W0: m x n   B: m x r   R: r x r   A: r x n

with W0, b, B and A frozen and R the only trainable tensor (r^2 parameters per layer, whatever m and n are).
LoRA-SB sets s = 1 and initializes from dW, an estimate of the first full fine-tuning step:

    G  = sum of the gradients of the loss over a few samples      (estimate_first_update)
    dW = -lr_1 * sign(G)                                             (adamw_first_step: Adam's first step is sign(G))
    dW ~= U_r S_r V_r^T                                              (truncated_svd, fp32)
    B = U_r,  R = S_r,  A = V_r^T                                    (lorasb_factors)

so the model starts at W0 + [dW]_r (W0 itself is never changed). B and A are orthonormal and s = 1, so the plain
gradient of R, g_R = B^T G A^T, has the equivalent gradient B g_R A = P_B G P_A at every step: the best approximation of
the full gradient G that the subspace allows, with nothing to tune (r_gradient, equivalent_gradient). An SGD step on R
moves W by exactly -lr P_B G P_A; AdamW, which trains R in practice, rescales g_R entry by entry, so its step stays in
the subspace but is not that projection.

Usage on any torch.nn.Module whose target layers are nn.Linear (a Hugging Face model too):

    updates = estimate_first_update(model, batches, loss_fn, num_samples=64, lr=lr_1)
    report = add_adapters(model, "lorasb", rank=32, updates=updates)   # freezes everything but R
    ... train the parameters with requires_grad ...
    save_adapter(model, "adapter.safetensors", method="lorasb", base_model="org/name")
    load_adapter(fresh_model, "adapter.safetensors")
    export_peft(model, "peft_adapter/", base_model="org/name")         # loads in PEFT and vLLM

Read top to bottom: the equations, the layer, adding adapters, the estimate of the first update; then the LoRA-XS and
LoRA baselines; then saving, loading and exporting. torch and the standard library only: copy it into your project.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lorasb", "loraxs", "lora")
SVDS = ("exact", "randomized", "authors")  # how the initialization's SVD is computed (truncated_svd, authors_svd)


# ---------------------------------------------------------------------------------------------------------------------
# The equations of the method: tensor in, tensor out.
# ---------------------------------------------------------------------------------------------------------------------

def adamw_first_step(grad_sum: torch.Tensor, lr: float) -> torch.Tensor:
    """dW = -lr * sign(G): Adam's first update, since m_1 = g and v_1 = g^2 give m/sqrt(v) = sign(g).

    (eps and AdamW's decoupled weight decay are ignored; sign(0) = 0.)"""
    return -lr * torch.sign(grad_sum)


def sgd_first_step(grad_mean: torch.Tensor, lr: float) -> torch.Tensor:
    """dW = -lr * mean(G): the first step of plain SGD."""
    return -lr * grad_mean


def truncated_svd(matrix: torch.Tensor, rank: int, randomized: bool = False, oversample: int = 10,
                  power_iters: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of `matrix` in fp32: M ~= U_r diag(S_r) V_r^T (Eckart-Young: the best rank-r
    approximation in Frobenius norm, with error^2 = sum_{i>r} S_i^2).

    Exact (torch.linalg.svd) by default. `randomized=True`: torch.svd_lowrank with `oversample` extra columns (without
    them part of the top subspace of a sign matrix's slowly decaying spectrum is missed) and `power_iters` power
    iterations, under a forked RNG (the caller's random state is untouched). Returns U (m x r), S (r,), Vh (r x n)."""
    m = matrix.float()
    if not randomized:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + oversample, *m.shape)
    with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=q, niter=power_iters)
    return u[:, :rank], s[:rank], v[:, :rank].T


def authors_svd(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' SVD of dW (utils/svd_utils.py::get_svd_grad), to reproduce their initialization: on M = dW^T
    (in x out) in fp32, torch.manual_seed(42), an unused torch.randn(out, rank) draw, then torch.svd_lowrank(M,
    q=rank, niter=10): a randomized SVD with 10 power iterations and no oversampling. dW = M^T = V S U^T, so the left
    singular vectors of dW are V and the right ones U.

    The same seed and draws give their values (same device and torch version), but under a forked RNG (the caller's
    random state is untouched) and without their cast to bf16. Returns U_r, S_r, Vh_r of dW, as truncated_svd."""
    m = update.float().T
    with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
        torch.manual_seed(42)
        torch.randn(m.shape[1], rank, device=m.device)  # unused in theirs too, but it moves the RNG the SVD then uses
        u, s, v = torch.svd_lowrank(m, q=rank, niter=10)
    return v, s, u.T


def lorasb_factors(update: torch.Tensor, rank: int,
                   svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB initialization (Thm 6): B = U_r, R = diag(S_r), A = V_r^T from dW ~= U_r S_r V_r^T, so B R A = [dW]_r.
    `svd` is "exact" or "randomized" (truncated_svd), or "authors" (authors_svd)."""
    if svd not in SVDS:
        raise ValueError(f"unknown svd {svd!r}; choose one of {SVDS}")
    u, s, vh = authors_svd(update, rank) if svd == "authors" else truncated_svd(update, rank, svd == "randomized")
    return u.contiguous(), torch.diag(s), vh.contiguous()


def r_gradient(grad_w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Chain rule for W = W0 + s B R A (Lemma 2): dL/dR = s * B^T G A^T, with G = dL/dW."""
    return scale * b.T @ grad_w @ a.T


def equivalent_gradient(grad_w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The equivalent gradient of R (s = 1): B (B^T G A^T) A = P_B G P_A, where P_B = B B^T and P_A = A^T A project
    onto col(B) and row(A) when B and A are orthonormal (Thm 3: the closest such update to G). One SGD step on R moves
    W by exactly -lr times it."""
    return b @ r_gradient(grad_w, b, a) @ a


def optimal_r_gradient(grad_w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """argmin_X ||s B X A - G||_F = (1/s) (B^T B)^-1 B^T G A^T (A A^T)^-1 for any full-rank B, A (Thm 3).

    With orthonormal B, A and s = 1 it equals r_gradient: the plain gradient is already optimal (Thm 5)."""
    left = torch.linalg.solve(b.T @ b, b.T @ grad_w @ a.T)
    return torch.linalg.solve(a @ a.T, left.T).T / scale


# ---------------------------------------------------------------------------------------------------------------------
# The adapter layer.
# ---------------------------------------------------------------------------------------------------------------------

class LowRankLinear(nn.Module):
    """y = base(x) + s * ((x A^T) R^T) B^T, wrapping an existing nn.Linear (whose weight W0 and bias stay frozen).

    LoRA-SB and LoRA-XS: B (m x r) and A (r x n) are frozen buffers, R (r x r) the only parameter, s = 1.
    LoRA: B and A are parameters, there is no R, s = alpha / r.
    The three thin matmuls never build an m x n matrix. B, A and R are kept in fp32 (B and A stay orthonormal to fp32
    precision, R's small updates are not rounded away) and cast to the compute dtype at use: the activations' dtype,
    or autocast's."""

    def __init__(self, base: nn.Linear, b: torch.Tensor, a: torch.Tensor, r: torch.Tensor | None, scale: float):
        super().__init__()
        self.base = base
        self.scale = scale
        self.merged_base_weight: torch.Tensor | None = None  # W0, kept while merged so unmerge is exact
        self._cast_cache: tuple | None = None  # frozen B and A in the compute dtype (_frozen_factors)
        if r is None:  # LoRA: B and A train
            self.B = nn.Parameter(b.float())
            self.A = nn.Parameter(a.float())
            self.R = None
        else:
            self.register_buffer("B", b.float())
            self.register_buffer("A", a.float())
            self.R = nn.Parameter(r.float())

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_base_weight is not None:  # the delta is already inside base.weight
            return self.base(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.to(dtype)
        b, a = self._frozen_factors(dtype) if self.R is not None else (self.B.to(dtype), self.A.to(dtype))
        r = None if self.R is None else self.R.to(dtype)
        h = F.linear(x, a)  # x A^T: tokens x r
        if r is not None:
            h = F.linear(h, r)  # (x A^T) R^T
        return self.base(x) + F.linear(h, self.scale * b)  # s on B (m x r), not on the tokens x m output

    def _frozen_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen B and A of LoRA-SB/XS in the compute dtype, cast once and kept (in a plain attribute: never
        saved, dropped when the module moves) until B, A or the dtype change, rather than cast at every step."""
        if dtype == self.B.dtype or torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return self.B.to(dtype), self.A.to(dtype)
        key = (id(self.B), id(self.A), self.B._version, self.A._version, dtype)
        if self._cast_cache is None or self._cast_cache[0] != key:  # holding B and A keeps their ids theirs
            self._cast_cache = (key, self.B, self.A, self.B.to(dtype), self.A.to(dtype))
        return self._cast_cache[3], self._cast_cache[4]

    def _apply(self, fn, *args, **kwargs):
        self._cast_cache = None  # .to(), .cuda(), .half(): the copies are remade at the next forward
        return super()._apply(fn, *args, **kwargs)

    def delta_weight(self) -> torch.Tensor:
        """s * B R A in fp32 or wider (m x n): what merging adds to W0."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        b = self.B.to(dtype) if self.R is None else self.B.to(dtype) @ self.R.to(dtype)
        return self.scale * b @ self.A.to(dtype)

    def merge(self) -> None:
        """W <- W0 + s B R A, computed in fp32 and cast once; W0 is kept so unmerge restores it exactly."""
        if self.merged_base_weight is None:
            w0 = self.base.weight.data
            self.merged_base_weight = w0
            self.base.weight.data = (w0.float() + self.delta_weight().to(w0.device)).to(w0.dtype)

    def unmerge(self) -> None:
        if self.merged_base_weight is not None:
            self.base.weight.data = self.merged_base_weight
            self.merged_base_weight = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, trains={'R' if self.R is not None else 'B, A'}"


# ---------------------------------------------------------------------------------------------------------------------
# Putting adapters into a model.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class AdapterReport:
    """What add_adapters did: the adapted module names and the parameter counts."""
    method: str
    rank: int
    modules: list[str]
    trainable: int
    total: int

    def __str__(self) -> str:
        return (f"{self.method}: rank {self.rank} on {len(self.modules)} linear layers; trainable parameters "
                f"{self.trainable:,} of {self.total:,} ({100 * self.trainable / max(self.total, 1):.4f}%)")


def find_targets(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose name ends with one of `targets` (matched on whole name components, as PEFT does)."""
    targets = tuple(targets)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {name: m for name, m in linears.items() if name.split(".")[-1] in targets or name in targets}
    if not found:
        suffixes = sorted({name.split(".")[-1] for name in linears})
        raise ValueError(f"no nn.Linear layer matches targets {list(targets)}; the model's linear layers end with: "
                         f"{suffixes or 'none (the model has no nn.Linear)'}")
    return found


def rank_problems(targets: dict[str, nn.Linear], rank: int) -> list[str]:
    """One line per target layer that cannot take `rank` (it must be between 1 and min(out, in))."""
    return [f"rank {rank} is {'too large' if rank > 1 else 'not possible'} for {name} ({m.out_features} x "
            f"{m.in_features}): the rank must be between 1 and min(out, in) = {min(m.out_features, m.in_features)}"
            for name, m in targets.items() if not 1 <= rank <= min(m.out_features, m.in_features)]


def add_adapters(model: nn.Module, method: str, rank: int, targets: Iterable[str] = DEFAULT_TARGETS,
                 updates: dict[str, torch.Tensor] | None = None, lora_alpha: float | None = None, seed: int = 0,
                 svd: str = "exact", progress: Callable[[Iterable], Iterable] | None = None) -> AdapterReport:
    """Replace every target nn.Linear by a LowRankLinear and freeze everything else; one code path for three methods:

    - "lorasb": B, R, A = lorasb_factors(updates[name]) (updates from estimate_first_update), s = 1, R trains.
    - "loraxs": B, R, A = loraxs_factors(W0), s = 1, R trains.
    - "lora":   B = 0, A Kaiming, s = lora_alpha / rank, B and A train.

    `svd` is "exact", "randomized" or (LoRA-SB only) "authors": see lorasb_factors. `progress` wraps the loop over the
    layers (one SVD each for lorasb and loraxs), e.g. tqdm, to show how far it is."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "lorasb" and updates is None:
        raise ValueError("method 'lorasb' needs updates=estimate_first_update(...)")
    if method == "lora" and lora_alpha is None:
        raise ValueError("method 'lora' needs lora_alpha (its scale is lora_alpha / rank)")
    if svd not in SVDS:
        raise ValueError(f"unknown svd {svd!r}; choose one of {SVDS}")
    if svd == "authors" and method != "lorasb":
        raise ValueError(f"svd='authors' is LoRA-SB's initialization; method {method!r} does not use it")
    found = find_targets(model, targets)
    problems = rank_problems(found, rank)
    if problems:
        raise ValueError(problems[0] + (f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""))
    missing = sorted(set(found) - set(updates)) if updates is not None else []
    if missing:
        raise ValueError(f"no estimated update for {len(missing)} target layers, e.g. {missing[:3]}")
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in (progress or iter)(found.items()):
        w0 = linear.weight
        if method == "lorasb":
            b, r, a = lorasb_factors(updates[name].to(w0.device), rank, svd)
            scale = 1.0
        elif method == "loraxs":
            b, r, a = loraxs_factors(w0.detach(), rank, generator, svd)
            scale = 1.0
        else:
            b, a = lora_factors(linear.out_features, linear.in_features, rank, generator)
            r, scale = None, lora_alpha / rank
        _set_submodule(model, name, LowRankLinear(linear, b, a, r, scale).to(w0.device))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return AdapterReport(method, rank, sorted(found), trainable, total)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapters(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W <- W0 + s B R A): the model then runs at the base model's cost."""
    for module in adapters(model).values():
        module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Restore the exact W0 of every merged adapter."""
    for module in adapters(model).values():
        module.unmerge()


@contextlib.contextmanager
def merged(model: nn.Module):
    """Run a block with the adapters merged (e.g. for generation), then restore W0 exactly."""
    merge_adapters(model)
    try:
        yield model
    finally:
        unmerge_adapters(model)


# ---------------------------------------------------------------------------------------------------------------------
# Estimating the first full fine-tuning update from a few samples.
# ---------------------------------------------------------------------------------------------------------------------

def estimate_first_update(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                          num_samples: int, lr: float, targets: Iterable[str] = DEFAULT_TARGETS, rule: str = "adamw",
                          accumulate_on: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Estimate the first full fine-tuning update dW of every target weight from exactly `num_samples` examples.

    `loss_fn(model, batch)` returns the batch's mean loss L_b; the batches are consumed until `num_samples` examples are
    seen (the last one is cut). With n_b examples in batch b and N = num_samples:

        rule "adamw" (default):  G = sum_b grad(L_b / n_b),      dW = -lr * sign(G)   (the authors' weighting)
        rule "sgd":              G = sum_b (n_b / N) grad(L_b),  dW = -lr * G         (the mean-loss gradient)

    `lr` is lr_1, the learning rate of the schedule's first optimizer step. Memory: only target weights get gradients,
    each added to an fp32 sum (on the weight's device, or on `accumulate_on`, e.g. "cpu") and freed at once
    (only_targets_get_gradients). Under torch.distributed each rank passes its own batches and num_samples counts this
    rank's examples; the sums are all-reduced so every rank gets the same dW. Returns {module name: dW (fp32)}.

    `batches` is iterated once. Pass something that can be iterated again (a list, a DataLoader): a one-shot iterator
    such as a generator is consumed here, so a training loop over the same object afterwards gets only what is left of
    it, possibly nothing, and trains zero steps without an error. Handed an iterator, this warns."""
    if rule not in ("adamw", "sgd"):
        raise ValueError(f"unknown rule {rule!r}; choose 'adamw' (sign of the gradient) or 'sgd'")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if iter(batches) is batches:
        warnings.warn(f"a one-shot iterator ({type(batches).__name__}) is used up here: a training loop over it then "
                      f"trains zero steps; pass a list", stacklevel=2)
    weights = {name: linear.weight for name, linear in find_targets(model, targets).items()}
    total = _all_reduce_sum(torch.tensor(float(num_samples))).item()
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=accumulate_on or w.device)
            for name, w in weights.items()}
    seen = 0
    with only_targets_get_gradients(model, weights, lambda name, grad: sums[name].add_(grad.to(sums[name]))):
        for batch in batches:
            batch, n = _first_examples(batch, num_samples - seen)
            loss = loss_fn(model, batch)
            (loss / n if rule == "adamw" else loss * (n / total)).backward()
            seen += n
            if seen == num_samples:
                break
    if seen < num_samples:
        raise ValueError(f"the batches held only {seen} examples but num_samples={num_samples}: "
                         "pass more data or lower num_samples")
    updates = {}
    for name in weights:
        g = _all_reduce_sum(sums.pop(name))  # each sum is freed as soon as its update exists
        if not torch.isfinite(g).all():
            raise ValueError(f"the gradient of {name} has NaN or inf values: check the loss and the data")
        if not g.any():
            raise ValueError(f"{name} received no gradient (it is all zero): the loss does not depend on this layer, "
                             "so its update cannot be estimated; remove it from the targets")
        updates[name] = adamw_first_step(g, lr) if rule == "adamw" else sgd_first_step(g, lr)
    return updates


@contextlib.contextmanager
def only_targets_get_gradients(model: nn.Module, weights: dict[str, torch.Tensor],
                               on_gradient: Callable[[str, torch.Tensor], Any]):
    """Within the block, in train mode, only `weights` require gradients (so backward stops at the first target layer),
    and each weight's gradient, once complete, is passed to on_gradient(name, grad) and freed, so at most one exists
    at a time. On exit, also on error, every parameter's requires_grad and .grad and the train/eval mode are restored
    and the hooks removed."""
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    handles = []

    def hand_over_and_free(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:  # runs once weight.grad is complete for this backward
            on_gradient(name, weight.grad)
            weight.grad = None
        return hook

    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hand_over_and_free(name)))
        model.train()
        yield
    finally:
        for h in handles:
            h.remove()
        for p, (flag, grad) in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def _first_examples(batch: Any, k: int) -> tuple[Any, int]:
    """The first k examples of a batch (a tensor, or a dict / list / tuple of tensors whose dim 0 is the batch) and
    how many they are: k, or fewer in a smaller batch."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    sizes = [v.shape[0] for v in values if isinstance(v, torch.Tensor)]
    if not sizes:
        raise TypeError("a batch must be a tensor, or a dict / list / tuple holding tensors whose dim 0 is the batch")
    cut = lambda v: v[:k] if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(batch, dict):
        batch = {key: cut(v) for key, v in batch.items()}
    elif isinstance(batch, (list, tuple)):
        batch = type(batch)(cut(v) for v in batch)
    else:
        batch = cut(batch)
    return batch, min(sizes[0], k)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------------------------------
# The baselines: LoRA-XS and LoRA (add_adapters' other two methods).
# ---------------------------------------------------------------------------------------------------------------------

def loraxs_factors(weight: torch.Tensor, rank: int, generator: torch.Generator | None = None,
                   svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-XS initialization (the authors' baseline): W0 ~= U_r S_r V_r^T gives B = U_r, A = S_r V_r^T (S folded into
    A, so A A^T != I) and R ~ N(0, 1e-5^2). B R A is tiny, so the model starts at ~W0. `svd`: "exact" or
    "randomized"."""
    if svd not in ("exact", "randomized"):
        raise ValueError(f"LoRA-XS's svd is 'exact' or 'randomized', not {svd!r}")
    u, s, vh = truncated_svd(weight, rank, randomized=svd == "randomized")
    r = torch.randn(rank, rank, generator=generator, device="cpu").to(weight.device) * 1e-5
    return u.contiguous(), r, (s[:, None] * vh).contiguous()


def lora_factors(out_features: int, in_features: int, rank: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA initialization (Hu et al.; the PEFT default): B = 0 (m x r), A ~ Kaiming-uniform(a=sqrt(5))
    (r x n), i.e. U(-1/sqrt(n), 1/sqrt(n)). B A = 0, so the model starts exactly at W0."""
    bound = 1.0 / math.sqrt(in_features)
    a = torch.rand(rank, in_features, generator=generator) * (2 * bound) - bound
    return torch.zeros(out_features, rank), a


# ---------------------------------------------------------------------------------------------------------------------
# Files: safetensors written and read by hand (torch + json, no pickle), then the adapter's own files. The reader
# checks what reading needs, so a damaged file is refused by name; in the project, machinery/safetensors_file.py adds
# the strict checks that untrusted third-party checkpoints need.
# ---------------------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so it is either complete or absent: a temp file in the same folder, fsync, then os.replace."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the permissions a plain open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors: u64 header length, JSON header padded with spaces to 8 bytes, then the data."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"cannot save tensor {name!r}: dtype {t.dtype} has no safetensors name")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        blobs.append(t.reshape(-1).view(torch.uint8).numpy())
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(memoryview(blob))
    atomic_write(path, write)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ({name: tensor}, metadata). The tensors are CPU views of a private memory map of the
    file (pages are read when touched), so loading a model tensor by tensor keeps memory near one model. A damaged
    file (truncated, overwritten, not safetensors, a symlink loop) raises ValueError naming the file and the problem."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size < 8:
            raise ValueError(f"only {size} bytes")
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a header length of {header_len} does not fit in a {size}-byte file")
            header = json.loads(f.read(header_len).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
        storage = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
        tensors = {name: _tensor_at(storage, 8 + header_len, name, info) for name, info in header.items()}
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ValueError(f"{path}: a symlink that loops back to itself; point it at the file") from None
    except (ValueError, RecursionError, TypeError, RuntimeError) as e:  # the last two: torch's, on overflowing shapes
        raise ValueError(f"{path}: {str(e).splitlines()[0]}; the file is not a valid safetensors file (re-save or "
                         f"re-download it)") from None
    return tensors, metadata


def tensor_entry_problem(name: str, info: Any, data_len: int) -> str | None:
    """What keeps one header entry from being a tensor of the `data_len`-byte data section, or None: it needs a known
    dtype, a shape of non-negative integers, and data_offsets [begin, end] inside the section spanning the shape."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return f"tensor {name!r} must have 'dtype', 'shape' and 'data_offsets'"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}, not a dtype of {list(SAFETENSORS_DTYPES)}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        return (f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end <= "
                f"{data_len}, the size of the data section")
    needs = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != needs:
        return (f"tensor {name!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes for shape {shape} of "
                f"{dtype}, which needs {needs}")
    return None


def _tensor_at(storage: torch.Tensor, data_start: int, name: str, info: Any) -> torch.Tensor:
    """The tensor of one header entry: a view of the file's bytes, once tensor_entry_problem finds nothing wrong."""
    problem = tensor_entry_problem(name, info, len(storage) - data_start)
    if problem:
        raise ValueError(problem)
    begin, end = data_start + info["data_offsets"][0], data_start + info["data_offsets"][1]
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    data = storage[begin:end] if begin % dtype.itemsize == 0 else storage[begin:end].clone()  # .view needs alignment
    return data.view(dtype).reshape(info["shape"])


# ---------------------------------------------------------------------------------------------------------------------
# Saving, loading and exporting adapters.
# ---------------------------------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | os.PathLike, method: str, base_model: str | None = None) -> None:
    """Save only the adapters: `<module>.B`, `<module>.A` (and `<module>.R`) in fp32, plus JSON metadata (method, rank,
    scale, targets, base model). B and A are saved too: they come from sampled data, so they cannot be re-derived."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no adapters to save (call add_adapters or load_adapter first)")
    tensors = {}
    for name, m in found.items():
        tensors[f"{name}.B"], tensors[f"{name}.A"] = m.B.detach(), m.A.detach()
        if m.R is not None:
            tensors[f"{name}.R"] = m.R.detach()
    info = {"method": method, "rank": _common(found, "rank"), "scale": _common(found, "scale"),
            "targets": sorted({name.split(".")[-1] for name in found}), "base_model": base_model}
    save_safetensors(path, tensors, {"lorasb": json.dumps(info, allow_nan=False)})


def _common(found: dict[str, LowRankLinear], attribute: str) -> Any:
    values = {getattr(m, attribute) for m in found.values()}
    if len(values) != 1:
        raise ValueError(f"the adapters have different {attribute}s {sorted(values)}; one file holds one {attribute}")
    return values.pop()


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load an adapter saved by save_adapter into `model`, a model without adapters, and return its metadata: the
    target linears are wrapped and everything else is frozen.

    The whole file is checked against the model first (_adapter_problem), so a refused file raises one ValueError
    naming the file and what is wrong, and leaves the model as it was. A model that already has adapters is refused:
    LoRA-SB and LoRA-XS adapters have the same form, so replacing them could silently mix two methods or scales; load
    into a freshly loaded base model instead."""
    tensors, metadata = load_safetensors(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        modules.setdefault(name, {})[part] = t
    problem = _adapter_problem(model, metadata, modules)
    if problem:
        raise ValueError(f"{path}: {problem}")
    info = json.loads(metadata["lorasb"])
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parts in modules.items():
        linear = model.get_submodule(name)
        adapter = LowRankLinear(linear, parts["B"], parts["A"], parts.get("R"), float(info["scale"]))
        _set_submodule(model, name, adapter.to(linear.weight.device))
    return info


ADAPTER_FIELDS = {  # what each field of an adapter file's metadata must be: (test, what it is then)
    "method": (lambda v: v in METHODS, f"one of {METHODS}"),
    "rank": (lambda v: type(v) is int and v >= 1, "a positive integer"),
    "scale": (lambda v: type(v) in (int, float) and abs(v) <= sys.float_info.max, "a finite number"),  # not NaN, inf
    "targets": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of module-name suffixes"),
}


def _adapter_problem(model: nn.Module, metadata: dict[str, str],
                    modules: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """What keeps an adapter file (its metadata, its tensors grouped by module) from loading into `model`, or None."""
    if adapters(model):
        return (f"the model already has adapters (on {len(adapters(model))} layers); load the file into a model "
                f"without adapters, such as a freshly loaded base model")
    if not isinstance(metadata.get("lorasb"), str):
        return "not an adapter saved by lorasb.save_adapter (no 'lorasb' metadata string)"
    try:
        info = json.loads(metadata["lorasb"])
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting is a RecursionError
        return f"its 'lorasb' metadata is not JSON ({str(e)[:200]})"
    if not isinstance(info, dict) or any(field not in info for field in ADAPTER_FIELDS):
        return (f"its 'lorasb' metadata is a JSON {type(info).__name__}, not an object" if not isinstance(info, dict)
                else f"its metadata lacks {[f for f in ADAPTER_FIELDS if f not in info]} (it has {sorted(info)})")
    for field, (ok, what) in ADAPTER_FIELDS.items():
        if not ok(info[field]):
            return f"its metadata's {field} {info[field]!r} is not {what}"
    try:
        layers = find_targets(model, info["targets"])
    except ValueError as e:
        return str(e)
    missing, extra = sorted(set(layers) - set(modules)), sorted(set(modules) - set(layers))
    if missing or extra:
        return (f"it has no adapter for {len(missing)} of the model's {len(layers)} layers matching {info['targets']}, "
                f"e.g. {missing[:3]}" if missing else f"it has adapters for modules that are not layers of this model "
                f"matching {info['targets']}, e.g. {extra[:3]} (is this adapter for another model?)")
    rank, needed = info["rank"], ["A", "B"] if info["method"] == "lora" else ["A", "B", "R"]
    for name, parts in modules.items():
        out, inp = layers[name].out_features, layers[name].in_features
        if sorted(parts) != needed:
            return f"module {name} has tensors {sorted(parts)}; a {info['method']} adapter has {needed}"
        for part, t in sorted(parts.items()):
            needs = {"A": (rank, inp), "B": (out, rank), "R": (rank, rank)}[part]
            if not t.is_floating_point() or not torch.isfinite(t.float()).all() or tuple(t.shape) != needs:
                return (f"{name}.{part} has dtype {t.dtype}, not a floating-point dtype" if not t.is_floating_point()
                        else f"{name}.{part} has NaN or inf values" if tuple(t.shape) == needs else
                        f"module {name} has shapes {{'{part}': {tuple(t.shape)}}} but its layer ({out} x {inp}) at "
                        f"the metadata's rank {rank} needs {needs}")
    return None


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> None:
    """Write the adapters in the standard LoRA format that PEFT and vLLM read (adapter_config.json and
    adapter_model.safetensors): lora_A = A, lora_B = B R (fp32), r = rank and lora_alpha = s * rank, so PEFT's
    W0 + (lora_alpha / r) lora_B lora_A equals W0 + s B R A exactly (LoRA-SB never changes W0).
    vLLM serves it with --enable-lora and a --max-lora-rank of at least r (e.g. 128 for r = 96)."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no adapters to export")
    rank, scale = _common(found, "rank"), _common(found, "scale")
    tensors = {}
    for name, m in found.items():
        b = m.B.detach().float() if m.R is None else m.B.detach().float() @ m.R.detach().float()
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.A.detach().float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
              "target_modules": sorted({name.split(".")[-1] for name in found}), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "base_model_name_or_path": base_model,
              "inference_mode": True}
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
    atomic_write(os.path.join(out_dir, "adapter_config.json"),
                 lambda f: f.write(json.dumps(config, indent=2, allow_nan=False).encode()))
