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
    export_peft(model, "peft_adapter/", base_model="org/name")         # loads in PEFT and vLLM

This file needs torch and the standard library only: copy it into your project.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lorasb", "loraxs", "lora")


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

    Exact (torch.linalg.svd) by default. `randomized=True` uses torch.svd_lowrank with `oversample` extra columns and
    `power_iters` power iterations (the authors used no oversampling, which misses part of the top subspace of a sign
    matrix's slowly decaying spectrum), under a forked RNG so the caller's random state is untouched.
    Returns U (m x r), S (r,), Vh (r x n)."""
    m = matrix.float()
    if not randomized:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + oversample, *m.shape)
    devices = [m.device] if m.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=q, niter=power_iters)
    return u[:, :rank], s[:rank], v[:, :rank].T


def authors_svd(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' SVD of dW (utils/svd_utils.py::get_svd_grad), to reproduce their initialization: on M = dW^T
    (in x out) in fp32, torch.manual_seed(42), an unused torch.randn(out, rank) draw, then torch.svd_lowrank(M,
    q=rank, niter=10): a randomized SVD with 10 power iterations and no oversampling. dW = M^T = V S U^T, so the left
    singular vectors of dW are V and the right ones U.

    The values equal theirs (on the same device and torch version) because the seed and the draws are the same. Unlike
    theirs, it runs under a forked RNG, so the caller's random state is untouched, and U, S, V are not cast to bf16.
    Returns U_r (m x r), S_r (r,), Vh_r (r x n) of dW, as truncated_svd."""
    m = update.float().T
    with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
        torch.manual_seed(42)
        torch.randn(m.shape[1], rank, device=m.device)  # unused in theirs too, but it moves the RNG the SVD then uses
        u, s, v = torch.svd_lowrank(m, q=rank, niter=10)
    return v, s, u.T


def lorasb_factors(update: torch.Tensor, rank: int, authors: bool = False,
                   **svd_options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB initialization (Thm 6): B = U_r, R = diag(S_r), A = V_r^T from dW ~= U_r S_r V_r^T, so B R A = [dW]_r.
    The SVD is truncated_svd(update, rank, **svd_options), or with authors=True the authors' (authors_svd)."""
    u, s, vh = authors_svd(update, rank) if authors else truncated_svd(update, rank, **svd_options)
    return u.contiguous(), torch.diag(s), vh.contiguous()


def loraxs_factors(weight: torch.Tensor, rank: int, generator: torch.Generator | None = None,
                   **svd_options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-XS initialization (the authors' baseline): W0 ~= U_r S_r V_r^T gives B = U_r, A = S_r V_r^T (S folded into
    A, so A A^T != I) and R ~ N(0, 1e-5^2). B R A is tiny, so the model starts at ~W0."""
    u, s, vh = truncated_svd(weight, rank, **svd_options)
    r = torch.randn(rank, rank, generator=generator, device="cpu").to(weight.device) * 1e-5
    return u.contiguous(), r, (s[:, None] * vh).contiguous()


def lora_factors(out_features: int, in_features: int, rank: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA initialization (Hu et al.; the PEFT default): B = 0 (m x r), A ~ Kaiming-uniform(a=sqrt(5))
    (r x n), i.e. U(-1/sqrt(n), 1/sqrt(n)). B A = 0, so the model starts exactly at W0."""
    bound = 1.0 / math.sqrt(in_features)
    a = torch.rand(rank, in_features, generator=generator) * (2 * bound) - bound
    return torch.zeros(out_features, rank), a


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

class _LowRankLinearFunction(torch.autograd.Function):
    """y = x W0^T + bias + s ((x A^T) R^T) B^T and its gradients, written out so that the adapter costs its thin
    matmuls and nothing more: its output is added inside the last matmul (addmm_ into the base output) and its input
    gradient inside the base layer's (addmm_ into dy W0), so no elementwise pass over the (tokens x m) output or the
    (tokens x n) input gradient is added. Every tensor comes in one dtype; r is None for LoRA.

    Forward:  h = x A^T,  g = h R^T,  y = x W0^T + bias,  y += s g B^T
    Backward: dg = s dy B,  dR = dg^T h,  dh = dg R,  dx = dy W0 + dh A,
              and when they train: dW0 = dy^T x, dbias = sum of dy, dB = s dy^T g, dA = dh^T x.
    Only what the requested gradients need is kept for backward (with W0 and A frozen, not even x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, b, r, a, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        g = h if r is None else h @ r.t()
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        y.addmm_(g, b.t(), alpha=scale)
        _, need_weight, _, need_b, need_r, need_a, _ = ctx.needs_input_grad
        ctx.scale = scale
        ctx.save_for_backward(x2 if need_weight or need_a else None, weight, b, r, a, h if need_r else None,
                              g if need_b else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, b, r, a, h, g = ctx.saved_tensors
        need_x, need_weight, need_bias, need_b, need_r, need_a, _ = ctx.needs_input_grad
        shape, dy = dy.shape, dy.reshape(-1, dy.shape[-1])
        dg = dy @ b if ctx.scale == 1 else (dy @ b).mul_(ctx.scale)
        dh = dg if r is None else dg @ r
        dx = (dy @ weight).addmm_(dh, a).view(*shape[:-1], weight.shape[1]) if need_x else None
        dweight = dy.t() @ x2 if need_weight else None
        dbias = dy.sum(0) if need_bias else None
        db = (dy.t() @ g).mul_(ctx.scale) if need_b else None
        dr = dg.t() @ h if need_r else None
        da = dh.t() @ x2 if need_a else None
        return dx, dweight, dbias, db, dr, da, None


class LowRankLinear(nn.Module):
    """y = base(x) + s * ((x A^T) R^T) B^T, wrapping an existing nn.Linear (whose weight W0 and bias stay frozen).

    LoRA-SB and LoRA-XS: B (m x r) and A (r x n) are frozen buffers, R (r x r) the only parameter, s = 1.
    LoRA: B and A are parameters, there is no R, s = alpha / r.
    The three thin matmuls never build an m x n matrix, and the forward and backward add nothing to them
    (_LowRankLinearFunction). B, A and R are kept in fp32 (B and A stay orthonormal to fp32 precision, R's small updates
    are not rounded away) and cast to the compute dtype at use: the activations' dtype, or autocast's."""

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
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        r = None if self.R is None else self.R.to(dtype)
        b, a = self._frozen_factors(dtype) if self.R is not None else (self.B.to(dtype), self.A.to(dtype))
        return _LowRankLinearFunction.apply(x.to(dtype), self.base.weight.to(dtype), bias, b, r, a, self.scale)

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


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapters(model: nn.Module, method: str, rank: int, targets: Iterable[str] = DEFAULT_TARGETS,
                 updates: dict[str, torch.Tensor] | None = None, lora_alpha: float | None = None, seed: int = 0,
                 randomized_svd: bool = False, authors_svd: bool = False,
                 progress: Callable[[Iterable], Iterable] | None = None) -> AdapterReport:
    """Replace every target nn.Linear by a LowRankLinear and freeze everything else; one code path for three methods:

    - "lorasb": B, R, A = lorasb_factors(updates[name]) (updates from estimate_first_update), s = 1, R trains.
    - "loraxs": B, R, A = loraxs_factors(W0), s = 1, R trains.
    - "lora":   B = 0, A Kaiming, s = lora_alpha / rank, B and A train.

    The SVDs are exact, or randomized with randomized_svd=True; authors_svd=True gives LoRA-SB the authors' SVD.
    `progress` wraps the loop over the layers (one SVD each for lorasb and loraxs), e.g. tqdm, to show how far it is.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "lorasb" and updates is None:
        raise ValueError("method 'lorasb' needs updates=estimate_first_update(...)")
    if method == "lora" and lora_alpha is None:
        raise ValueError("method 'lora' needs lora_alpha (its scale is lora_alpha / rank)")
    if authors_svd and method != "lorasb":
        raise ValueError(f"authors_svd is LoRA-SB's initialization; method {method!r} does not use it")
    if authors_svd and randomized_svd:
        raise ValueError("authors_svd and randomized_svd are two different SVDs: choose one")
    found = find_targets(model, targets)
    problems = rank_problems(found, rank)
    if problems:
        raise ValueError(problems[0] + (f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""))
    if updates is not None:
        missing = sorted(set(found) - set(updates))
        if missing:
            raise ValueError(f"no estimated update for {len(missing)} target layers, e.g. {missing[:3]}")
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in (progress or iter)(found.items()):
        w0 = linear.weight
        if method == "lorasb":
            b, r, a = lorasb_factors(updates[name].to(w0.device), rank, authors=authors_svd,
                                     randomized=randomized_svd)
            scale = 1.0
        elif method == "loraxs":
            b, r, a = loraxs_factors(w0.detach(), rank, generator, randomized=randomized_svd)
            scale = 1.0
        else:
            b, a = lora_factors(linear.out_features, linear.in_features, rank, generator)
            r, scale = None, lora_alpha / rank
        _set_submodule(model, name, LowRankLinear(linear, b, a, r, scale).to(w0.device))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return AdapterReport(method, rank, sorted(found), trainable, total)


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

def _batch_size(batch: Any) -> int:
    """Number of examples in a batch: dim 0 of its first tensor (a tensor, a dict or a sequence of tensors)."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise TypeError("a batch must be a tensor, or a dict / list / tuple holding tensors whose dim 0 is the batch")


def _first_examples(batch: Any, k: int) -> Any:
    """The first k examples of a batch (every tensor sliced along dim 0)."""
    cut = lambda v: v[:k] if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(batch, dict):
        return {key: cut(v) for key, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def estimate_first_update(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                          num_samples: int, lr: float, targets: Iterable[str] = DEFAULT_TARGETS, rule: str = "adamw",
                          accumulate_on: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Estimate the first full fine-tuning update dW of every target weight from exactly `num_samples` examples.

    `loss_fn(model, batch)` returns the batch's mean loss L_b; the batches are consumed until `num_samples` examples are
    seen (the last one is cut). With n_b examples in batch b and N = num_samples:

        rule "adamw" (default):  G = sum_b grad(L_b / n_b),      dW = -lr * sign(G)   (the authors' weighting)
        rule "sgd":              G = sum_b (n_b / N) grad(L_b),  dW = -lr * G         (the mean-loss gradient)

    `lr` is lr_1, the learning rate of the schedule's first optimizer step. Memory: only target weights get gradients
    (every other parameter's requires_grad is off, so backward stops at the first target layer); each gradient is added
    to an fp32 accumulator (on the weight's device, or on `accumulate_on`, e.g. "cpu") by a post-accumulate-grad hook
    that then frees it, so at most one target gradient exists at a time. Under torch.distributed each rank passes its
    own batches and num_samples counts this rank's examples; the sums are all-reduced so every rank gets the same dW.
    The model's requires_grad flags, train/eval mode and .grad are restored afterwards, also on error.
    Returns {module name: dW (fp32)}."""
    if rule not in ("adamw", "sgd"):
        raise ValueError(f"unknown rule {rule!r}; choose 'adamw' (sign of the gradient) or 'sgd'")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    weights = {name: linear.weight for name, linear in find_targets(model, targets).items()}
    total = _all_reduce_sum(torch.tensor(float(num_samples))).item()
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=accumulate_on or w.device)
            for name, w in weights.items()}

    def accumulate_and_free(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:  # runs once weight.grad is complete for this backward
            sums[name].add_(weight.grad.to(sums[name].device, torch.float32))
            weight.grad = None
        return hook

    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(accumulate_and_free(name)))
        model.train()
        seen = 0
        for batch in batches:
            n = min(_batch_size(batch), num_samples - seen)
            batch = _first_examples(batch, n)
            loss = loss_fn(model, batch)
            loss = loss / n if rule == "adamw" else loss * (n / total)
            loss.backward()
            seen += n
            if seen == num_samples:
                break
        if seen < num_samples:
            raise ValueError(f"the batches held only {seen} examples but num_samples={num_samples}: "
                             "pass more data or lower num_samples")
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)

    updates = {}
    for name, g in sums.items():
        _all_reduce_sum(g)
        if not torch.isfinite(g).all():
            raise ValueError(f"the gradient of {name} has NaN or inf values: check the loss and the data")
        if not g.any():
            raise ValueError(f"{name} received no gradient (it is all zero): the loss does not depend on this layer, "
                             "so its update cannot be estimated; remove it from the targets")
        updates[name] = adamw_first_step(g, lr) if rule == "adamw" else sgd_first_step(g, lr)
        sums[name] = None  # free the accumulator as soon as its update exists
    return updates


# ---------------------------------------------------------------------------------------------------------------------
# safetensors, written and read by hand (torch + json, no pickle). Files are untrusted input: every check below comes
# from the reference implementation's errors (huggingface/safetensors, SafeTensorError).
# ---------------------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}
# Valid in the safetensors format, deliberately not read here: sub-byte types (a tensor is not a whole number of bytes)
# and F8_E8M0, which only recent torch versions have.
UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0")
MAX_HEADER_BYTES = 100_000_000
MAX_NUMEL = 2**63 - 1  # torch counts elements in an int64


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


def remove_interrupted_writes(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files atomic_write leaves behind when its process is killed mid-write, anywhere under
    `folder` (which no other process may be writing to); returns their paths."""
    pattern = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # mkstemp's names: prefix, 8 random characters, suffix
    removed = [str(p) for p in Path(folder).rglob(".*.tmp") if p.is_file() and pattern.fullmatch(p.name)]
    for path in removed:
        os.unlink(path)
    return removed


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


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen, duplicated = set(), set()
    for key, _ in pairs:
        (duplicated if key in seen else seen).add(key)
    if duplicated:  # the reference keeps the last one silently; two different tensors under one name is ambiguous
        raise ValueError(f"duplicate names in header: {sorted(duplicated)[:5]}")
    return dict(pairs)


def _reject_minus_zero(literal: str) -> int:
    if literal == "-0":  # Python reads it as 0; the reference reads a float and refuses it
        raise ValueError("'-0' where a non-negative integer is expected")
    return int(literal)


def _check_tensor_info(name: str, info: Any) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return f"tensor {name!r} must have 'dtype', 'shape' and 'data_offsets'"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype in UNSUPPORTED_DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}, which is valid safetensors but not supported here"
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}; supported: {sorted(SAFETENSORS_DTYPES)}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers"
    numel = 1
    for d in shape:  # left to right, as the reference checks: [0, 2**62, 2**62] is empty, [2**62, 2**62, 0] overflows
        numel *= d
        if numel > MAX_NUMEL:
            return f"tensor {name!r} has shape {shape}, whose element count overflows"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end"
    if offsets[1] - offsets[0] != numel * SAFETENSORS_DTYPES[dtype].itemsize:
        return f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}"
    return None


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ({name: tensor}, metadata). The tensors are CPU views of a private memory map of the
    file (pages are read when touched), so loading a model tensor by tensor keeps memory near one model.

    Every malformed file raises ValueError naming the file and the problem. It accepts what the reference library
    accepts (whitespace around the header, "__metadata__": null, extra keys in a tensor entry), except duplicate tensor
    names and the UNSUPPORTED_DTYPES, which are refused with a message that says so."""
    path = os.fspath(path)
    size = os.path.getsize(path)

    def fail(msg: str):
        raise ValueError(f"{path}: {msg}; the file is not a valid safetensors file (re-download or re-save it)")

    if size < 8:
        fail(f"only {size} bytes")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            fail(f"header length {header_len} does not fit in a {size}-byte file (limit {MAX_HEADER_BYTES})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_int=_reject_minus_zero)
    except ValueError as e:
        fail(f"bad JSON header ({e})")
    except RecursionError:
        fail("the JSON header is nested too deeply")
    try:
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\\ud800" escape decodes to one; the reference refuses it anywhere
        fail("the header holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text")
    if not isinstance(header, dict):
        fail(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail("__metadata__ must map strings to strings")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    spans = []
    for name, info in header.items():
        problem = _check_tensor_info(name, info)
        if problem:
            fail(problem)
        spans.append((*info["data_offsets"], name))
    end_of_previous = 0
    for begin, end, name in sorted(spans):
        if begin != end_of_previous:
            fail(f"tensor {name!r} starts at byte {begin}, expected {end_of_previous} (overlap or hole)")
        end_of_previous = end
    if end_of_previous != data_len:
        fail(f"the tensors cover {end_of_previous} bytes but the data section has {data_len}")
    storage = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for begin, end, name in spans:
        dtype = SAFETENSORS_DTYPES[header[name]["dtype"]]
        data = storage[data_start + begin:data_start + end]
        if (data_start + begin) % dtype.itemsize:  # some writers do not pad the header; .view needs alignment
            data = data.clone()
        tensors[name] = data.view(dtype).reshape(header[name]["shape"])
    return tensors, metadata


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
    """Load an adapter saved by save_adapter into `model` and return its metadata.

    A model without adapters gets them (its target linears are wrapped, everything else frozen); a model that has them
    gets their values. Names and shapes are checked first, and an error names the module that disagrees."""
    tensors, metadata = load_safetensors(path)
    if "lorasb" not in metadata:
        raise ValueError(f"{path}: not an adapter saved by lorasb.save_adapter (no 'lorasb' metadata)")
    info = json.loads(metadata["lorasb"])
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        modules.setdefault(name, {})[part] = t
    existing = adapters(model)
    if existing and set(existing) != set(modules):
        diff = sorted(set(existing) ^ set(modules))
        raise ValueError(f"{path}: the adapter's modules differ from the model's adapters, e.g. {diff[:3]}")
    for name, parts in modules.items():
        try:
            module = existing[name] if name in existing else model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: module {name} is not in the model (is this adapter for another model?)"
                             ) from None
        linear = module.base if isinstance(module, LowRankLinear) else module
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path}: module {name} is a {type(linear).__name__}, not an nn.Linear")
        rank = info["rank"]
        expected = {"B": (linear.out_features, rank), "A": (rank, linear.in_features)}
        if "R" in parts:
            expected["R"] = (rank, rank)
        got = {part: tuple(t.shape) for part, t in parts.items()}
        if got != expected:
            raise ValueError(f"{path}: module {name} has {got} but this model needs {expected} "
                             f"(layer {linear.out_features} x {linear.in_features}, rank {rank})")
    if not existing:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, parts in modules.items():
        if name in existing:
            with torch.no_grad():
                for part, t in parts.items():
                    getattr(existing[name], part).copy_(t)
        else:
            linear = model.get_submodule(name)
            adapter = LowRankLinear(linear, parts["B"], parts["A"], parts.get("R"), info["scale"])
            _set_submodule(model, name, adapter.to(linear.weight.device))
    return info


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
