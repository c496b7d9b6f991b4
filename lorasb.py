"""LoRA-SB: low-rank fine-tuning where only an r x r matrix trains, initialized from an estimate of the first full
fine-tuning update (Ponkshe, Singhal et al., arXiv 2411.19557). Each adapted linear layer computes

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

torch and the standard library only: copy this file into your project.
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
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lorasb", "loraxs", "lora")
SVDS = ("exact", "randomized", "authors")  # how the initialization's SVD is computed (truncated_svd, authors_svd)
DEFAULT_GROUP_BYTES = 4 * 2**30  # estimate_by_group's fp32 gradient sums: 1G weights, one pass for models up to ~1B


# ----- The equations of the method: tensor in, tensor out. ------------------------------------------------------------

def adamw_first_step(grad_sum: torch.Tensor, lr: float) -> torch.Tensor:
    """dW = -lr * sign(G): Adam's first update, since m_1 = g and v_1 = g^2 give m/sqrt(v) = sign(g) (eps and AdamW's
    decoupled weight decay are ignored; sign(0) = 0)."""
    return -lr * torch.sign(grad_sum)


def sgd_first_step(grad_mean: torch.Tensor, lr: float) -> torch.Tensor:
    """dW = -lr * mean(G): the first step of plain SGD."""
    return -lr * grad_mean


def truncated_svd(matrix: torch.Tensor, rank: int, randomized: bool = False, oversample: int = 10,
                  power_iters: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of `matrix` in fp32: M ~= U_r diag(S_r) V_r^T (Eckart-Young: the best rank-r
    approximation in Frobenius norm, error^2 = sum_{i>r} S_i^2): U (m x r), S (r,), Vh (r x n). Exact by default;
    `randomized=True`: torch.svd_lowrank under a forked RNG with `power_iters` power iterations and `oversample` extra
    columns (without them part of the top subspace of a sign matrix's slowly decaying spectrum is missed)."""
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
    singular vectors of dW are V and the right ones U. Their values (same device and torch version), but under a
    forked RNG and without their cast to bf16; returns U_r, S_r, Vh_r of dW, as truncated_svd."""
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
    if problem := svd_problem("lorasb", svd):
        raise ValueError(problem)
    u, s, vh = authors_svd(update, rank) if svd == "authors" else truncated_svd(update, rank, svd == "randomized")
    return u.contiguous(), torch.diag(s), vh.contiguous()


def svd_problem(method: str, svd: str) -> str | None:
    """Why `svd` cannot initialize `method`, or None: "exact" or "randomized" for LoRA-SB and LoRA-XS, "authors" for
    LoRA-SB only (LoRA's initialization has no SVD)."""
    if svd not in SVDS:
        return f"unknown svd {svd!r}; choose one of {SVDS}"
    if svd == "authors" and method != "lorasb":
        return f"svd='authors' is LoRA-SB's initialization, not {method!r}'s"
    return None


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


# ----- The adapter layer. ---------------------------------------------------------------------------------------------

class LowRankLinear(nn.Module):
    """y = base(x) + s * ((x A^T) R^T) B^T around a target layer y = x W0^T + b (find_targets), W0 and b frozen.
    LoRA-SB and LoRA-XS: B (m x r) and A (r x n) are frozen buffers, R (r x r) the only parameter, s = 1.
    LoRA: B and A are parameters, there is no R, s = alpha / r.
    The three thin matmuls never build an m x n matrix. B, A and R are kept in fp32 (B and A stay orthonormal to fp32
    precision, R's small updates are not rounded away) and cast at use to the input's (or autocast's) dtype."""

    def __init__(self, base: nn.Module, b: torch.Tensor, a: torch.Tensor, r: torch.Tensor | None, scale: float):
        super().__init__()
        self.base, self.scale, self.rank = base, scale, a.shape[0]
        self.merged_base_weight: torch.Tensor | None = None  # W0, kept while merged so unmerge is exact
        b, a = b.float().to(_device(base)), a.float().to(_device(base))
        if r is None:  # LoRA: B and A train
            self.B, self.A, self.R = nn.Parameter(b), nn.Parameter(a), None
        else:
            self.register_buffer("B", b)
            self.register_buffer("A", a)
            self.R = nn.Parameter(r.float().to(_device(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_base_weight is not None:  # the delta is already inside base.weight
            return self.base(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.to(dtype)
        h = F.linear(x, self.A.to(dtype))  # x A^T: tokens x r
        if self.R is not None:
            h = F.linear(h, self.R.to(dtype))  # (x A^T) R^T
        return self.base(x) + F.linear(h, self.scale * self.B.to(dtype))  # s on B (m x r), not on the tokens x m output

    def delta_weight(self) -> torch.Tensor:
        """s * B R A in fp32 or wider (m x n): what merging adds to W0."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        b = self.B.to(dtype) if self.R is None else self.B.to(dtype) @ self.R.to(dtype)
        return self.scale * b @ self.A.to(dtype)

    def merge(self) -> None:
        """W <- W0 + s B R A, computed in fp32 and cast once; W0 is kept so unmerge restores it exactly. A 4-bit W0 is
        refused: requantizing W0 + s B R A would lose most of the update (run the 4-bit model unmerged)."""
        if _is_quantized(self.base):
            raise ValueError(f"cannot merge into a {type(self.base).__name__}: its weight is quantized (4-bit), and "
                             f"requantizing W0 + B R A would round most of the update away; run the model unmerged")
        if self.merged_base_weight is None:
            w0 = self.base.weight.data
            delta = self.delta_weight().to(w0.device)
            self.merged_base_weight = w0
            self.base.weight.data = (w0.float() + (delta.T if _is_conv1d(self.base) else delta)).to(w0.dtype)

    def unmerge(self) -> None:
        if self.merged_base_weight is not None:
            self.base.weight.data = self.merged_base_weight
            self.merged_base_weight = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, trains={'R' if self.R is not None else 'B, A'}"


# ----- Putting adapters into a model. ---------------------------------------------------------------------------------

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


def find_targets(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """The layers y = x W^T + b whose name ends with one of `targets` (whole name components, as PEFT matches), in
    model order: nn.Linear (bitsandbytes' Linear4bit is one), transformers' Conv1D (GPT-2's: W stored in x out, PEFT's
    fan_in_fan_out), and any module with in_features, out_features and a dequantize() giving W (out x in)."""
    targets = tuple(targets)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)
              or hasattr(m, "in_features") and hasattr(m, "out_features") and callable(getattr(m, "dequantize", None))}
    found = {name: m for name, m in layers.items() if name.split(".")[-1] in targets or name in targets}
    if not found:
        suffixes = sorted({name.split(".")[-1] for name in layers})
        raise ValueError(f"no nn.Linear layer matches targets {list(targets)}; the model's linear layers end with "
                         f"{suffixes or 'nothing (it has none)'}: pass targets= with those to adapt")
    return found


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in): the shape of a target layer's W."""
    return (layer.nf, layer.nx) if _is_conv1d(layer) else (layer.out_features, layer.in_features)


def frozen_weight(layer: nn.Module) -> torch.Tensor:
    """W0 (out x in) as the layer computes with it (LoRA-XS's SVD needs it): an nn.Linear's weight, a Conv1D's
    transposed, Q(W0) of a 4-bit layer: its dequantize(), or bitsandbytes' dequantize_4bit for a Linear4bit."""
    if callable(getattr(layer, "dequantize", None)):
        return layer.dequantize()
    if hasattr(layer.weight, "quant_state"):  # a bitsandbytes Params4bit: so bitsandbytes is installed
        import bitsandbytes.functional
        return bitsandbytes.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.detach().T if _is_conv1d(layer) else layer.weight.detach()


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")  # transformers.pytorch_utils.Conv1D


def _is_quantized(layer: nn.Module) -> bool:
    """A 4-bit layer: one with a dequantize(), or a bitsandbytes Linear4bit (its weight is packed, not floating)."""
    weight = getattr(layer, "weight", None)
    return hasattr(layer, "in_features") and (callable(getattr(layer, "dequantize", None)) or (
        isinstance(weight, torch.Tensor) and not weight.is_floating_point()))


def _device(layer: nn.Module) -> torch.device:
    return next(iter([*layer.parameters(), *layer.buffers()])).device


def rank_problems(targets: dict[str, nn.Module], rank: int) -> list[str]:
    """One line per target layer that cannot take `rank` (it must be between 1 and min(out, in))."""
    return [f"rank {rank} is {'too large' if rank > 1 else 'not possible'} for {name} ({out} x {inp}): the rank must "
            f"be between 1 and min(out, in) = {min(out, inp)}"
            for name, (out, inp) in ((name, layer_shape(m)) for name, m in targets.items())
            if not 1 <= rank <= min(out, inp)]


def add_adapters(model: nn.Module, method: str, rank: int, targets: Iterable[str] = DEFAULT_TARGETS,
                 updates: dict[str, torch.Tensor] | Iterable[dict[str, torch.Tensor]] | None = None,
                 lora_alpha: float | None = None, seed: int = 0, svd: str = "exact",
                 progress: Callable[[Iterable], Iterable] | None = None) -> AdapterReport:
    """Replace every target layer by a LowRankLinear and freeze everything else; one code path for three methods:
    - "lorasb": B, R, A = lorasb_factors(updates[name]), s = 1, R trains. `updates` is estimate_first_update's dict,
      or estimate_by_group(...) itself, whose groups become B, R, A (and are freed) one at a time.
    - "loraxs": B, R, A = loraxs_factors(W0), s = 1, R trains.
    - "lora":   B = 0, A Kaiming, s = lora_alpha / rank, B and A train.
    `svd` is "exact", "randomized" or (LoRA-SB only) "authors": see lorasb_factors. `progress` wraps each loop over
    the layers that computes SVDs, e.g. tqdm."""
    problems = [problem for bad, problem in [
        (method not in METHODS, f"unknown method {method!r}; choose one of {METHODS}"),
        (method == "lorasb" and updates is None, "method 'lorasb' needs updates=estimate_first_update(...)"),
        (method == "lora" and lora_alpha is None, "method 'lora' needs lora_alpha (its scale is lora_alpha / rank)"),
        (svd_problem(method, svd) is not None, svd_problem(method, svd)),
    ] if bad]
    found = find_targets(model, targets) if not problems else {}
    problems += rank_problems(found, rank)
    if problems:
        raise ValueError(problems[0] + (f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""))
    factors = {}  # LoRA-SB's (B, R, A) of each layer, the SVDs made group by group
    for group in ([updates] if isinstance(updates, dict) else updates) if method == "lorasb" else []:
        factors.update({name: lorasb_factors(update.to(_device(found[name])), rank, svd)
                        for name, update in (progress or iter)(list(group.items())) if name in found})
        group = None  # this group's dW are freed before the generator estimates the next group
    missing = sorted(set(found) - set(factors)) if method == "lorasb" else []
    if missing:
        raise ValueError(f"no estimated update for {len(missing)} target layers, e.g. {missing[:3]}")
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in (progress or iter)(found.items()) if method == "loraxs" else found.items():
        if method == "lorasb":
            b, r, a = factors.pop(name)
        elif method == "loraxs":
            b, r, a = loraxs_factors(frozen_weight(layer), rank, generator, svd)
        else:
            (b, a), r = lora_factors(*layer_shape(layer), rank, generator), None
        _set_submodule(model, name, LowRankLinear(layer, b, a, r, lora_alpha / rank if method == "lora" else 1.0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if p.is_floating_point()) + sum(  # a 4-bit W counts out x in
        math.prod(layer_shape(m)) for m in model.modules() if _is_quantized(m))
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


@contextlib.contextmanager
def merged(model: nn.Module):
    """Run a block with the adapters merged (e.g. for generation), then restore W0 exactly."""
    merge_adapters(model)
    try:
        yield model
    finally:
        for module in adapters(model).values():
            module.unmerge()


# ----- Estimating the first full fine-tuning update from a few samples. -----------------------------------------------

def estimate_first_update(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                          num_samples: int, lr: float, targets: Iterable[str] = DEFAULT_TARGETS,
                          **options: Any) -> dict[str, torch.Tensor]:
    """{module name: dW (fp32)} of every target layer: estimate_by_group's groups in one dict (same arguments; one group
    unless `group_bytes` is given). When all dW do not fit in memory, pass estimate_by_group(...) to add_adapters."""
    groups = estimate_by_group(model, batches, loss_fn, num_samples, lr, targets, **{"group_bytes": None, **options})
    return {name: update for group in groups for name, update in group.items()}


def estimate_by_group(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                      num_samples: int, lr: float, targets: Iterable[str] = DEFAULT_TARGETS, rule: str = "adamw",
                      accumulate_on: str | torch.device | None = None,
                      group_bytes: int | None = DEFAULT_GROUP_BYTES) -> Iterator[dict[str, torch.Tensor]]:
    """Estimate the first full fine-tuning update dW of every target layer from exactly `num_samples` examples; yields
    {module name: dW (fp32)} for each group of layers (target_groups).

    `loss_fn(model, batch)` returns the batch's mean loss L_b; the batches are read until `num_samples` examples are
    seen (the last one is cut). With n_b examples in batch b and N = num_samples:

        rule "adamw" (default):  G = sum_b grad(L_b / n_b),      dW = -lr * sign(G)   (the authors' weighting)
        rule "sgd":              G = sum_b (n_b / N) grad(L_b),  dW = -lr * G         (the mean-loss gradient)

    G is dL/dW at the weights the model computes with (Q(W0) for a 4-bit layer), taken from each layer's input and
    output gradient (gradient_sums), however the weight is stored. `lr` is lr_1, the schedule's first learning rate.
    Memory: the fp32 sums of one group, at most `group_bytes` (4 bytes per weight; None: one group), on the layer's
    device or on `accumulate_on` (e.g. "cpu"). Each group takes one pass over the samples from the same random state,
    so grouping changes the memory, not dW (bit for bit). Under torch.distributed, num_samples counts this rank's
    examples and the sums are all-reduced, so every rank gets the same dW."""
    if rule not in ("adamw", "sgd"):
        raise ValueError(f"unknown rule {rule!r}; choose 'adamw' (sign of the gradient) or 'sgd'")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    found = find_targets(model, targets)
    groups = target_groups(found, group_bytes)
    if iter(batches) is batches:  # a one-shot iterator: one pass, none left for more groups or for training
        if len(groups) > 1:
            raise ValueError(f"{len(groups)} groups of layers take {len(groups)} passes over the batches, but a "
                             f"one-shot iterator ({type(batches).__name__}) gives one: pass a list")
        warnings.warn(f"a one-shot iterator ({type(batches).__name__}) is used up here, so training over it trains "
                      f"zero steps; pass a list", stacklevel=2)
    total = _all_reduce_sum(torch.tensor(float(num_samples))).item()
    devices = sorted({str(_device(m)) for m in found.values() if _device(m).type == "cuda"})
    for i, layers in enumerate(groups):
        sums = {name: torch.zeros(layer_shape(m), dtype=torch.float32, device=accumulate_on or _device(m))
                for name, m in layers.items()}
        seen = 0
        with torch.random.fork_rng(devices, enabled=i < len(groups) - 1), gradient_sums(model, layers, sums):
            for batch in batches:  # the last pass leaves the random state as one pass over all layers would
                batch, n = _first_examples(batch, num_samples - seen)
                loss = loss_fn(model, batch)
                (loss / n if rule == "adamw" else loss * (n / total)).backward()
                seen += n
                if seen == num_samples:
                    break
        if seen < num_samples:
            raise ValueError(f"the batches held only {seen} examples but num_samples={num_samples}: "
                             "pass more data or lower num_samples")
        yield {name: _first_step(name, _all_reduce_sum(sums.pop(name)), rule, lr) for name in list(sums)}


def target_groups(layers: dict[str, nn.Module], group_bytes: int | None) -> list[dict[str, nn.Module]]:
    """The target layers, in model order, cut into consecutive groups whose fp32 gradient sums (4 * out * in bytes a
    layer) fit in group_bytes (a layer larger than that is a group of its own); None: one group."""
    groups, size = [{}], 0
    for name, layer in layers.items():
        nbytes = 4 * math.prod(layer_shape(layer))
        if group_bytes is not None and groups[-1] and size + nbytes > group_bytes:
            groups, size = [*groups, {}], 0
        groups[-1][name], size = layer, size + nbytes
    return groups


@contextlib.contextmanager
def gradient_sums(model: nn.Module, layers: dict[str, nn.Module], sums: dict[str, torch.Tensor]):
    """Within the block, each backward adds G = grad_out^T x (summed over the tokens, in fp32) to sums[name] for each
    layer y = x W^T + b: dL/dW, whatever the weight's storage (fp32, bf16, 4-bit). A forward hook keeps the layer's
    input x and makes its output y require a gradient; a hook on y receives grad_out = dL/dy. No parameter requires a
    gradient meanwhile (backward stops at the first of the layers; no .grad is made) and the model is in train mode;
    on exit, also on error, the requires_grad flags and the mode are restored and the hooks removed."""
    params = list(model.parameters())
    flags, was_training = [p.requires_grad for p in params], model.training

    def keep_input(name: str) -> Callable:
        def forward_hook(layer: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
            x = args[0].detach().to(y.dtype)  # x as the layer multiplied it (in autocast's dtype under autocast)

            def add_outer_product(grad_out: torch.Tensor) -> None:  # G += grad_out^T x, over all tokens
                g = grad_out.flatten(0, -2).T.float() @ x.flatten(0, -2).float()
                sums[name].add_(g.to(sums[name].device))
            y = y if y.requires_grad else y.detach().requires_grad_()
            y.register_hook(add_outer_product)
            return y
        return forward_hook

    handles = [layer.register_forward_hook(keep_input(name)) for name, layer in layers.items()]
    try:
        for p in params:
            p.requires_grad_(False)
        model.train()
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _first_step(name: str, grad_sum: torch.Tensor, rule: str, lr: float) -> torch.Tensor:
    """dW of one layer from its G (adamw_first_step or sgd_first_step), once G is finite and not all zero."""
    if not torch.isfinite(grad_sum).all():
        raise ValueError(f"the gradient of {name} has NaN or inf values: check the loss and the data")
    if not grad_sum.any():
        raise ValueError(f"{name} received no gradient (it is all zero): the loss does not depend on this layer, "
                         "so its update cannot be estimated; remove it from the targets")
    return adamw_first_step(grad_sum, lr) if rule == "adamw" else sgd_first_step(grad_sum, lr)


def _first_examples(batch: Any, k: int) -> tuple[Any, int]:
    """The first k examples of a batch (a tensor, or a dict / list / tuple of tensors whose dim 0 is the batch) and
    how many they are: k, or fewer in a smaller batch."""
    sequence = isinstance(batch, (list, tuple))
    items = batch.items() if isinstance(batch, dict) else enumerate(batch if sequence else [batch])
    cut = {key: v[:k] if isinstance(v, torch.Tensor) else v for key, v in items}
    sizes = [len(v) for v in cut.values() if isinstance(v, torch.Tensor)]
    if not sizes:
        raise TypeError("a batch must be a tensor, or a dict / list / tuple holding tensors whose dim 0 is the batch")
    return (cut if isinstance(batch, dict) else type(batch)(cut.values()) if sequence else cut[0]), sizes[0]


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----- The baselines: LoRA-XS and LoRA (add_adapters' other two methods). ---------------------------------------------

def loraxs_factors(weight: torch.Tensor, rank: int, generator: torch.Generator | None = None,
                   svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-XS initialization (the authors' baseline): W0 ~= U_r S_r V_r^T gives B = U_r, A = S_r V_r^T (S folded into
    A, so A A^T != I), R ~ N(0, 1e-5^2): B R A is tiny, the model starts at ~W0. `svd`: "exact" or "randomized"."""
    if problem := svd_problem("loraxs", svd):
        raise ValueError(problem)
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


# ----- Files: safetensors written and read by hand (torch and json, no pickle); a damaged file is refused by name. ----

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so it is either complete or absent: a temp file in the same folder, fsync, then os.replace."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
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
    atomic_write(path, lambda f: f.writelines([len(raw).to_bytes(8, "little"), raw, *blobs]))


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


# ----- Saving, loading and exporting adapters. ------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | os.PathLike, method: str, base_model: str | None = None) -> None:
    """Save only the adapters: `<module>.B`, `<module>.A` (and `<module>.R`) in fp32, plus JSON metadata (method, rank,
    scale, targets, base model). B and A are saved too: they come from sampled data, so they cannot be re-derived."""
    found, rank, scale = _adapters_of_one_rank_and_scale(model)
    tensors = {}
    for name, m in found.items():
        tensors[f"{name}.B"], tensors[f"{name}.A"] = m.B.detach(), m.A.detach()
        if m.R is not None:
            tensors[f"{name}.R"] = m.R.detach()
    info = {"method": method, "rank": rank, "scale": scale, "targets": sorted({name.split(".")[-1] for name in found}),
            "base_model": base_model}
    save_safetensors(path, tensors, {"lorasb": json.dumps(info, allow_nan=False)})


def _adapters_of_one_rank_and_scale(model: nn.Module) -> tuple[dict[str, LowRankLinear], int, float]:
    """The model's adapters, and their rank and scale: one of each, as an adapter file holds."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no adapters (call add_adapters or load_adapter first)")
    ranks, scales = {m.rank for m in found.values()}, {m.scale for m in found.values()}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"the adapters have ranks {sorted(ranks)} and scales {sorted(scales)}; a file holds one each")
    return found, ranks.pop(), scales.pop()


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load an adapter saved by save_adapter into `model` and return its metadata: the target layers are wrapped and
    everything else is frozen. The whole file is checked first, so a refused file raises one ValueError naming it and
    leaves the model as it was. A model that already has adapters is refused: LoRA-SB and LoRA-XS adapters have the
    same form, so replacing them could silently mix two methods or scales."""
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
        layer = LowRankLinear(model.get_submodule(name), parts["B"], parts["A"], parts.get("R"), float(info["scale"]))
        _set_submodule(model, name, layer)
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
        return "the model already has adapters; load the file into a model without them, such as a fresh base model"
    try:
        info = json.loads(metadata["lorasb"])
    except (KeyError, TypeError):
        return "not an adapter saved by lorasb.save_adapter (no 'lorasb' metadata string)"
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting is a RecursionError
        return f"its 'lorasb' metadata is not JSON ({str(e)[:200]})"
    if not isinstance(info, dict):
        return f"its 'lorasb' metadata is a JSON {type(info).__name__}, not an object"
    if any(field not in info for field in ADAPTER_FIELDS):
        return f"its metadata lacks {[f for f in ADAPTER_FIELDS if f not in info]} (it has {sorted(info)})"
    for field, (ok, what) in ADAPTER_FIELDS.items():
        if not ok(info[field]):
            return f"its metadata's {field} {info[field]!r} is not {what}"
    try:
        layers = find_targets(model, info["targets"])
    except ValueError as e:
        return str(e)
    if set(modules) != set(layers):
        missing, extra = sorted(set(layers) - set(modules)), sorted(set(modules) - set(layers))
        return (f"it has no adapter for {len(missing)} of the model's {len(layers)} layers matching {info['targets']}, "
                f"e.g. {missing[:3]}" if missing else f"it has adapters for modules that are not layers of this model "
                f"matching {info['targets']}, e.g. {extra[:3]} (is this adapter for another model?)")
    rank, needed = info["rank"], ["A", "B"] if info["method"] == "lora" else ["A", "B", "R"]
    for name, parts in modules.items():
        out, inp = layer_shape(layers[name])
        needs = {"A": (rank, inp), "B": (out, rank), "R": (rank, rank)}
        if sorted(parts) != needed:
            return f"module {name} has tensors {sorted(parts)}; a {info['method']} adapter has {needed}"
        for part, t in sorted(parts.items()):
            if not t.is_floating_point():
                return f"{name}.{part} has dtype {t.dtype}, not a floating-point dtype"
            if tuple(t.shape) != needs[part]:
                return (f"module {name} has shapes {{'{part}': {tuple(t.shape)}}} but its layer ({out} x {inp}) at the "
                        f"metadata's rank {rank} needs {needs[part]}")
            if not torch.isfinite(t.float()).all():
                return f"{name}.{part} has NaN or inf values"
    return None


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> None:
    """Write the adapters in the standard LoRA format that PEFT and vLLM read (adapter_config.json and
    adapter_model.safetensors): lora_A = A, lora_B = B R (fp32), r = rank and lora_alpha = s * rank, so PEFT's
    W0 + (lora_alpha / r) lora_B lora_A equals W0 + s B R A exactly (LoRA-SB never changes W0).
    vLLM serves it with --enable-lora and a --max-lora-rank of at least r (e.g. 128 for r = 96)."""
    found, rank, scale = _adapters_of_one_rank_and_scale(model)
    tensors = {}
    for name, m in found.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.A.detach().float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.B.detach() if m.R is None else m.B.detach() @ m.R.detach()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
              "target_modules": sorted({name.split(".")[-1] for name in found}), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": any(_is_conv1d(m.base) for m in found.values()),  # GPT-2's Conv1D: W is in x out
              "use_rslora": False, "base_model_name_or_path": base_model, "inference_mode": True}
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
    atomic_write(os.path.join(out_dir, "adapter_config.json"),
                 lambda f: f.write(json.dumps(config, indent=2, allow_nan=False).encode()))
