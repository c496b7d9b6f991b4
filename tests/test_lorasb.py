"""Tests of lorasb.py: each equation of the method checked numerically, plus the adapter's plumbing."""

import copy
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorasb


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


class TinyBlock(nn.Module):
    """A residual MLP whose linear layers carry target names, plus a head that is never adapted."""

    def __init__(self, d: int = 12, h: int = 24, out: int = 3):
        super().__init__()
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.norm(x + self.down_proj(F.gelu(self.up_proj(x)))))


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def make_data(n: int = 11, d: int = 12, out: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, out, generator=g)


def batches_of(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


# --- the equations -------------------------------------------------------------------------------------------------

def test_init_is_orthonormal_and_the_best_rank_r_approximation():
    torch.manual_seed(0)
    update = lorasb.adamw_first_step(torch.randn(40, 30) + 0.5 * torch.randn(40, 1) @ torch.randn(1, 30), lr=1e-3)
    b, r, a = lorasb.lorasb_factors(update, rank=6)
    assert b.shape == (40, 6) and r.shape == (6, 6) and a.shape == (6, 30)
    torch.testing.assert_close(b.T @ b, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(6), atol=1e-5, rtol=0)
    sigma = torch.linalg.svdvals(update.double())
    error = torch.linalg.matrix_norm((update - b @ r @ a).double())
    assert error.item() == pytest.approx(sigma[6:].square().sum().sqrt().item(), rel=1e-5)  # Eckart-Young bound
    # any other rank-6 factorization does worse, e.g. the best one inside a perturbed subspace
    q = orthonormal(40, 6, seed=1)
    assert torch.linalg.matrix_norm(update.double() - q @ q.T @ update.double()) > error


def test_r_gradient_equals_chain_rule_by_autograd():
    torch.manual_seed(0)
    base = nn.Linear(20, 16).double()
    b, a, r = (torch.randn(*shape, dtype=torch.float64) for shape in [(16, 4), (4, 20), (4, 4)])
    layer = lorasb.LowRankLinear(base, b, a, r, scale=1.0).double()
    x = torch.randn(7, 20, dtype=torch.float64)
    layer(x).sin().sum().backward()
    w = (base.weight + layer.delta_weight()).detach().requires_grad_(True)  # the same function of the full weight
    F.linear(x, w, base.bias).sin().sum().backward()
    torch.testing.assert_close(layer.R.grad, lorasb.r_gradient(w.grad, layer.B, layer.A))


def test_equivalent_gradient_is_the_two_sided_projection_and_the_least_squares_optimum():
    g = torch.randn(12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, a = orthonormal(12, 3, seed=1), orthonormal(10, 3, seed=2).T
    projected = (b @ b.T) @ g @ (a.T @ a)
    torch.testing.assert_close(lorasb.equivalent_gradient(g, b, a), projected)
    torch.testing.assert_close(lorasb.optimal_r_gradient(g, b, a), lorasb.r_gradient(g, b, a))  # Thm 5: s = 1
    # for any full-rank B, A: argmin_X ||s B X A - G|| by least squares on vec(X), with vec(B X A) = (A^T kron B) vec(X)
    b2, a2, s = torch.randn(12, 3, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64), 2.5
    design = s * torch.kron(a2.T.contiguous(), b2)
    x = torch.linalg.lstsq(design, g.T.reshape(-1, 1)).solution.reshape(3, 3).T
    torch.testing.assert_close(lorasb.optimal_r_gradient(g, b2, a2, scale=s), x)


def test_one_sgd_step_on_r_moves_w_by_exactly_the_projected_gradient():
    torch.manual_seed(0)
    base = nn.Linear(10, 14).double()
    update = torch.randn(14, 10, dtype=torch.float64)
    b, r, a = lorasb.lorasb_factors(update, rank=3)
    layer = lorasb.LowRankLinear(base, b, a, r, scale=1.0).double()
    x, target = torch.randn(9, 10, dtype=torch.float64), torch.randn(9, 14, dtype=torch.float64)
    w0 = layer.delta_weight() + base.weight
    loss = F.mse_loss(layer(x), target)
    loss.backward()
    w = w0.detach().clone().requires_grad_(True)
    F.mse_loss(F.linear(x, w, base.bias), target).backward()
    lr = 1e-2
    with torch.no_grad():
        layer.R -= lr * layer.R.grad
    b64, a64 = layer.B.double(), layer.A.double()
    moved = layer.delta_weight() + base.weight - w0
    torch.testing.assert_close(moved, -lr * (b64 @ b64.T) @ w.grad @ (a64.T @ a64))
    # first-order loss change is -lr * ||g_R||^2 (Thm 4)
    tiny = 1e-6
    with torch.no_grad():
        layer.R += lr * layer.R.grad - tiny * layer.R.grad
        change = F.mse_loss(layer(x), target) - loss
    assert change.item() == pytest.approx(-tiny * layer.R.grad.square().sum().item(), rel=1e-4)


def test_randomized_svd_matches_exact_and_keeps_the_callers_rng():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(200, 8, generator=g) @ torch.randn(8, 150, generator=g)
    update = lorasb.adamw_first_step(low_rank + 0.5 * torch.randn(200, 150, generator=g), lr=1.0)
    exact = lorasb.lorasb_factors(update, rank=8)
    state = torch.get_rng_state()
    approx = lorasb.lorasb_factors(update, rank=8, svd="randomized")
    assert torch.equal(state, torch.get_rng_state())
    error = lambda f: torch.linalg.matrix_norm(update - f[0] @ f[1] @ f[2]).item()  # noqa: E731
    assert error(approx) <= 1.01 * error(exact)
    torch.testing.assert_close(approx[0] @ approx[0].T, exact[0] @ exact[0].T, atol=1e-3, rtol=0)  # same P_B


def test_authors_svd_is_their_seeded_call_on_the_transpose_and_keeps_the_callers_rng():
    g = torch.Generator().manual_seed(0)
    update = lorasb.adamw_first_step(torch.randn(30, 20, generator=g) + torch.randn(30, 1, generator=g) @
                                     torch.randn(1, 20, generator=g), lr=1e-3)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    b, r, a = lorasb.lorasb_factors(update, rank=4, svd="authors")
    assert torch.equal(state, torch.get_rng_state())  # theirs reset the global seed once per layer
    # theirs, verbatim (utils/svd_utils.py::get_svd_grad on M = dW^T): seed 42, an unused draw, then svd_lowrank
    torch.manual_seed(42)
    torch.randn(update.shape[0], 4)
    u, s, v = torch.svd_lowrank(update.T.float(), q=4, niter=10)
    assert torch.equal(b, v) and torch.equal(r, torch.diag(s)) and torch.equal(a, u.T)  # B = V, A = U^T
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)  # still orthonormal, still ~[dW]_r
    exact = lorasb.lorasb_factors(update, rank=4)
    error = lambda f: torch.linalg.matrix_norm(update - f[0] @ f[1] @ f[2]).item()  # noqa: E731
    assert error(exact) <= error((b, r, a)) < 1.1 * error(exact)
    model = TinyBlock()
    updates = {"up_proj": torch.randn(24, 12), "down_proj": torch.randn(12, 24)}
    lorasb.add_adapters(model, "lorasb", 4, targets=("up_proj", "down_proj"), updates=updates, svd="authors")
    torch.testing.assert_close(model.up_proj.B, lorasb.authors_svd(updates["up_proj"], 4)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="LoRA-SB's initialization"):
        lorasb.add_adapters(TinyBlock(), "loraxs", 4, targets=("up_proj",), svd="authors")


# --- estimation ----------------------------------------------------------------------------------------------------

def brute_force_update(model, batches, num_samples, lr, rule):
    """Full autograd gradients of each batch (the last one cut), weighted as documented, summed, then the step rule."""
    weights = {"up_proj": model.up_proj.weight, "down_proj": model.down_proj.weight}
    total = {name: torch.zeros_like(w) for name, w in weights.items()}
    seen = 0
    for x, y in batches:
        n = min(len(x), num_samples - seen)
        if n == 0:
            break
        loss = mse_loss(model, (x[:n], y[:n]))
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            total[name] += grad / n if rule == "adamw" else grad * n / num_samples
        seen += n
    step = lorasb.adamw_first_step if rule == "adamw" else lorasb.sgd_first_step
    return {name: step(g, lr) for name, g in total.items()}


@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_estimate_equals_brute_force_with_exact_sample_count_and_restores_state(rule):
    torch.manual_seed(0)
    model = TinyBlock()
    model.eval()
    model.norm.weight.requires_grad_(False)  # a mixed set of flags, to check they come back as they were
    x, y = make_data()
    batches = batches_of(x, y, 3)  # 3 + 3 + 3 + 2 examples; num_samples = 7 cuts the third batch to 1
    sizes = []

    def loss_fn(m, batch):
        sizes.append(len(batch[0]))
        return mse_loss(m, batch)

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    updates = lorasb.estimate_first_update(model, batches, loss_fn, num_samples=7, lr=1e-3,
                                           targets=("up_proj", "down_proj"), rule=rule)
    assert sizes == [3, 3, 1]
    expected = brute_force_update(model, batches, 7, 1e-3, rule)
    assert set(updates) == set(expected)
    for name in expected:
        torch.testing.assert_close(updates[name], expected[name], atol=1e-9, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_estimate_accumulates_on_cpu_and_makes_no_weight_gradient():
    """G comes from each layer's input and output gradient: no parameter requires a gradient during the estimate, so
    no weight gradient (m x n) is ever made, and the sums live where accumulate_on says."""
    torch.manual_seed(0)
    model = TinyBlock()
    x, y = make_data()
    made = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: made.append(p.shape)) for p in model.parameters()]
    flags = []

    def loss_fn(m, batch):
        flags.extend(p.requires_grad for p in m.parameters())
        return mse_loss(m, batch)

    updates = lorasb.estimate_first_update(model, batches_of(x, y, 4), loss_fn, num_samples=11, lr=1.0,
                                           targets=("up_proj", "down_proj"), accumulate_on="cpu")
    for hook in hooks:
        hook.remove()
    assert made == [] and flags and not any(flags)
    assert all(u.device.type == "cpu" and u.dtype == torch.float32 for u in updates.values())
    assert set(updates["up_proj"].unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_estimate_restores_state_when_the_loss_fails():
    model = TinyBlock()
    model.eval()
    x, y = make_data()
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return mse_loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        lorasb.estimate_first_update(model, batches_of(x, y, 3), failing, num_samples=9, lr=1.0,
                                     targets=("up_proj",))
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert all(p.grad is None for p in model.parameters())
    mse_loss(model, (x, y)).backward()  # the hooks are gone: gradients accumulate normally again
    assert model.up_proj.weight.grad is not None


def test_estimate_errors_name_the_layer_or_the_problem():
    model = TinyBlock()
    x, y = make_data()
    with pytest.raises(ValueError, match="only 11 examples"):
        lorasb.estimate_first_update(model, batches_of(x, y, 4), mse_loss, 20, 1.0, targets=("up_proj",))
    with pytest.raises(ValueError, match="up_proj.*NaN"):
        lorasb.estimate_first_update(model, batches_of(x, y, 4), lambda m, b: mse_loss(m, b) * float("nan"), 4, 1.0,
                                     targets=("up_proj",))
    model.unused_proj = nn.Linear(12, 12)
    with pytest.raises(ValueError, match="unused_proj received no gradient"):
        lorasb.estimate_first_update(model, batches_of(x, y, 4), mse_loss, 4, 1.0, targets=("up_proj", "unused_proj"))
    with pytest.raises(ValueError, match="unknown rule"):
        lorasb.estimate_first_update(model, batches_of(x, y, 4), mse_loss, 4, 1.0, rule="adam")


def test_estimate_warns_when_handed_a_one_shot_iterator_and_not_a_list():
    """A generator is consumed by the estimate: a training loop over it afterwards would run zero steps."""
    model = TinyBlock()
    x, y = make_data()
    batches = batches_of(x, y, 4)
    generator = (batch for batch in batches)
    with pytest.warns(UserWarning, match=r"one-shot iterator \(generator\).*trains zero steps.*pass a list"):
        lorasb.estimate_first_update(model, generator, mse_loss, 11, 1.0, targets=("up_proj",))
    assert list(generator) == []  # what the warning is about: nothing left for a training loop
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorasb.estimate_first_update(model, batches, mse_loss, 11, 1.0, targets=("up_proj",))
    assert len(list(batches)) == 3  # a list goes through again

# --- adapters in a model -------------------------------------------------------------------------------------------

def lorasb_model(rank=4, seed=0):
    torch.manual_seed(seed)
    model = TinyBlock()
    x, y = make_data()
    updates = lorasb.estimate_first_update(model, batches_of(x, y, 4), mse_loss, 8, lr=1e-2,
                                           targets=("up_proj", "down_proj"))
    base = copy.deepcopy(model)
    report = lorasb.add_adapters(model, "lorasb", rank, targets=("up_proj", "down_proj"), updates=updates)
    return model, base, updates, report


def test_lorasb_starts_at_w0_plus_truncated_update_and_trains_only_r():
    model, base, updates, report = lorasb_model(rank=4)
    assert report.modules == ["down_proj", "up_proj"]
    assert report.trainable == 2 * 4 * 4
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["up_proj.R", "down_proj.R"]
    for name in ("up_proj", "down_proj"):
        adapter = getattr(model, name)
        assert torch.equal(adapter.base.weight, getattr(base, name).weight)  # W0 untouched
        u, s, vh = torch.linalg.svd(updates[name])
        torch.testing.assert_close(adapter.delta_weight(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-6, rtol=0)


def test_trainable_counts_of_the_three_methods():
    for method, expected in [("lorasb", 2 * 16), ("loraxs", 2 * 16), ("lora", 4 * (12 + 24) * 2)]:
        torch.manual_seed(0)
        model = TinyBlock()
        updates = {"up_proj": torch.randn(24, 12), "down_proj": torch.randn(12, 24)} if method == "lorasb" else None
        report = lorasb.add_adapters(model, method, 4, targets=("up_proj", "down_proj"), updates=updates,
                                     lora_alpha=8 if method == "lora" else None)
        assert report.trainable == expected, method
        assert "trainable parameters" in str(report)


def test_lora_and_loraxs_start_at_the_base_model():
    x, _ = make_data()
    for method in ("lora", "loraxs"):
        torch.manual_seed(0)
        model = TinyBlock()
        reference = model(x)
        lorasb.add_adapters(model, method, 4, targets=("up_proj", "down_proj"), lora_alpha=8)
        torch.testing.assert_close(model(x), reference, atol=1e-4 if method == "loraxs" else 0, rtol=0)
    b, r, a = lorasb.loraxs_factors(model.up_proj.base.weight.detach(), 4)
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    assert r.abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_exact_and_unmerge_restores_w0(dtype):
    model, _, _, _ = lorasb_model()
    with torch.no_grad():
        model.up_proj.R.mul_(50)  # a visible delta
    model = model.to(dtype)
    x, _ = make_data()
    x = x.to(dtype)
    w0 = {name: getattr(model, name).base.weight.clone() for name in ("up_proj", "down_proj")}
    adapted = model(x)
    with lorasb.merged(model):
        merged_out = model(x)
        expected = (w0["up_proj"].float() + model.up_proj.delta_weight()).to(dtype)
        assert torch.equal(model.up_proj.base.weight, expected)
    torch.testing.assert_close(merged_out, adapted, atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=1e-3)
    for name in w0:
        assert torch.equal(getattr(model, name).base.weight, w0[name])


def test_bad_inputs_name_the_layer_and_what_exists():
    model = TinyBlock()
    with pytest.raises(ValueError, match=r"rank 13 .*up_proj \(24 x 12\).*min\(out, in\) = 12"):
        lorasb.add_adapters(model, "loraxs", 13, targets=("up_proj",))
    with pytest.raises(ValueError, match=r"no nn.Linear layer matches.*\['down_proj', 'head', 'up_proj'\]"):
        lorasb.add_adapters(model, "loraxs", 2, targets=("q_proj",))
    with pytest.raises(ValueError, match="unknown method"):
        lorasb.add_adapters(model, "dora", 2)
    with pytest.raises(ValueError, match="needs updates"):
        lorasb.add_adapters(model, "lorasb", 2, targets=("up_proj",))
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed by a refused call


# --- save, load, export --------------------------------------------------------------------------------------------

def test_save_then_load_round_trip_into_a_fresh_model(tmp_path):
    model, base, _, _ = lorasb_model()
    with torch.no_grad():
        model.down_proj.R.add_(0.1)
    path = tmp_path / "adapter.safetensors"
    lorasb.save_adapter(model, path, method="lorasb", base_model="tiny")
    fresh = copy.deepcopy(base)
    info = lorasb.load_adapter(fresh, path)
    assert info == {"method": "lorasb", "rank": 4, "scale": 1.0, "targets": ["down_proj", "up_proj"],
                    "base_model": "tiny"}
    x, _ = make_data()
    assert torch.equal(fresh(x), model(x))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["up_proj.R", "down_proj.R"]


def test_loading_into_other_shapes_names_the_module(tmp_path):
    model, _, _, _ = lorasb_model()
    path = tmp_path / "adapter.safetensors"
    lorasb.save_adapter(model, path, method="lorasb")
    with pytest.raises(ValueError, match=r"module up_proj has .* needs"):
        lorasb.load_adapter(TinyBlock(d=10), path)
    other = nn.Module()
    other.down_proj = nn.Linear(24, 12)
    with pytest.raises(ValueError, match=r"adapters for modules that are not layers of this model.*'up_proj'"):
        lorasb.load_adapter(other, path)


def parameters_and_buffers(model: nn.Module) -> dict:
    """Every parameter and buffer (value, dtype, requires_grad) and every module's type: what a refused load keeps."""
    tensors = {name: (t.detach().clone(), t.requires_grad) for name, t in [*model.named_parameters(),
                                                                          *model.named_buffers()]}
    return {"tensors": tensors, "modules": [(name, type(m)) for name, m in model.named_modules()]}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = parameters_and_buffers(model)
    assert after["modules"] == before["modules"] and after["tensors"].keys() == before["tensors"].keys()
    for name, (t, requires_grad) in before["tensors"].items():
        assert after["tensors"][name][1] == requires_grad and after["tensors"][name][0].dtype == t.dtype, name
        assert torch.equal(after["tensors"][name][0], t), name


def adapter_variant(saved, path, tensors=None, info=None, metadata=None):
    """Write at `path` the adapter file `saved` with its tensors passed through `tensors` (a function of the dict) and
    its metadata replaced by json of `info` (a function of the dict) or by `metadata` as it is."""
    loaded, meta = lorasb.load_safetensors(saved)
    loaded = {name: t.clone() for name, t in loaded.items()}
    meta = dict(meta)
    if info is not None:
        meta["lorasb"] = json.dumps(info(json.loads(meta["lorasb"])))
    if metadata is not None:
        meta["lorasb"] = metadata
    lorasb.save_safetensors(path, tensors(loaded) if tensors else loaded, meta)
    return path


def without(*keys):
    return lambda tensors: {name: t for name, t in tensors.items() if name not in keys}


def changed(key, change):
    return lambda tensors: {**tensors, key: change(tensors[key])}


def with_field(field, value):
    return lambda info: {**info, field: value}


def nan_at_0(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


BAD_ADAPTER_FILES = {  # name: (tensors, info, raw metadata, what the error says)
    "a module missing": (without("down_proj.B", "down_proj.A", "down_proj.R"), None, None,
                         r"no adapter for 1 of the model's 2 layers matching \['down_proj', 'up_proj'\], e.g. "
                         r"\['down_proj'\]"),
    "a module the model lacks": (lambda t: {**t, **{f"blocks.3.{key}": t[key] for key in t if "up_proj" in key}},
                                 None, None, r"adapters for modules that are not layers of this model matching "
                                 r"\['down_proj', 'up_proj'\], e.g. \['blocks.3.up_proj'\] \(is this adapter for "),
    "a module that is no target": (lambda t: {**t, "head.B": torch.zeros(3, 4), "head.A": torch.zeros(4, 12),
                                              "head.R": torch.zeros(4, 4)}, None, None,
                                   r"modules that are not.*'head'"),
    "R missing": (without("up_proj.R"), None, None, r"module up_proj has tensors \['A', 'B'\]; a lorasb adapter"),
    "A missing": (without("down_proj.A"), None, None, r"module down_proj has tensors \['B', 'R'\]"),
    "an unknown tensor": (lambda t: {**t, "up_proj.C": t["up_proj.R"]}, None, None, r"\['A', 'B', 'C', 'R'\]"),
    "NaN in R": (changed("up_proj.R", nan_at_0), None, None, "up_proj.R has NaN or inf values"),
    "inf in B": (changed("down_proj.B", lambda t: t.clone().fill_(float("inf"))), None, None,
                 "down_proj.B has NaN or inf"),
    "NaN in bf16 A": (changed("down_proj.A", lambda t: nan_at_0(t).bfloat16()), None, None, "down_proj.A has NaN"),
    "integer B": (changed("up_proj.B", lambda t: t.to(torch.int32)), None, None,
                  "up_proj.B has dtype torch.int32, not a floating-point dtype"),
    "boolean R": (changed("up_proj.R", lambda t: t > 0), None, None, "up_proj.R has dtype torch.bool"),
    "a shape that does not fit the layer": (changed("up_proj.B", lambda t: t[:12]), None, None,
                                            r"module up_proj has shapes .*\(12, 4\).*layer \(24 x 12\).*needs"),
    "a rank that disagrees with the tensors": (None, with_field("rank", 3), None, "at the metadata's rank 3 needs"),
    "a rank that is a string": (None, with_field("rank", "4"), None, "rank '4' is not a positive integer"),
    "a zero rank": (None, with_field("rank", 0), None, "rank 0 is not a positive integer"),
    "a NaN scale": (None, with_field("scale", float("nan")), None, "scale nan is not a finite number"),
    "an inf scale": (None, with_field("scale", float("-inf")), None, "scale -inf is not a finite number"),
    "a huge integer scale": (None, with_field("scale", 10**400), None, "scale 1000.* is not a finite number"),
    "a string scale": (None, with_field("scale", "1.0"), None, "scale '1.0' is not a finite number"),
    "a boolean scale": (None, with_field("scale", True), None, "scale True is not a finite number"),
    "no scale": (None, lambda info: {k: v for k, v in info.items() if k != "scale"}, None,
                 r"its metadata lacks \['scale'\]"),
    "an unknown method": (None, with_field("method", "weird"), None, "method 'weird' is not one of"),
    "targets that are not a list": (None, with_field("targets", "up_proj"), None, "targets 'up_proj' is not a list"),
    "targets the model lacks": (None, with_field("targets", ["q_proj"]), None, "no nn.Linear layer matches"),
    "metadata that is not JSON": (None, None, "{method: lorasb", "metadata is not JSON"),
    "metadata that is a JSON list": (None, None, "[1, 2]", "metadata is a JSON list, not an object"),
    "metadata nested too deep": (None, None, "[" * 100_000, "metadata is not JSON"),
    "metadata that is no string": (None, None, 5, "no 'lorasb' metadata string"),
    "R in a LoRA file": (None, with_field("method", "lora"), None, r"a lora adapter has \['A', 'B'\]"),
}


@pytest.mark.parametrize("problem", BAD_ADAPTER_FILES)
def test_a_bad_adapter_file_is_refused_naming_it_and_the_model_is_unchanged(tmp_path, problem):
    model, base, _, _ = lorasb_model()
    saved = tmp_path / "adapter.safetensors"
    lorasb.save_adapter(model, saved, method="lorasb")
    tensors, info, metadata, message = BAD_ADAPTER_FILES[problem]
    path = adapter_variant(saved, tmp_path / "bad.safetensors", tensors, info, metadata)
    fresh = copy.deepcopy(base)
    before = parameters_and_buffers(fresh)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
        lorasb.load_adapter(fresh, path)
    assert_unchanged(fresh, before)
    assert lorasb.load_adapter(fresh, saved)["method"] == "lorasb"  # the intact file still loads into it


def test_a_model_that_has_adapters_is_refused_and_unchanged(tmp_path):
    """LoRA-SB file into LoRA adapters (which have no R), LoRA file into LoRA-SB adapters (another scale and no R), and
    a file of the same method and rank: all refused, with the model as it was; a fresh model takes each file."""
    lorasb_adapted, base, _, _ = lorasb_model()
    lora_adapted = copy.deepcopy(base)
    lorasb.add_adapters(lora_adapted, "lora", 4, targets=("up_proj", "down_proj"), lora_alpha=8)
    files = {"lorasb": tmp_path / "lorasb.safetensors", "lora": tmp_path / "lora.safetensors"}
    lorasb.save_adapter(lorasb_adapted, files["lorasb"], method="lorasb")
    lorasb.save_adapter(lora_adapted, files["lora"], method="lora")
    for model, file in [(lora_adapted, "lorasb"), (lorasb_adapted, "lora"), (lorasb_adapted, "lorasb")]:
        before = parameters_and_buffers(model)
        with pytest.raises(ValueError, match=re.escape(str(files[file])) + ": the model already has adapters"):
            lorasb.load_adapter(model, files[file])
        assert_unchanged(model, before)
    x, _ = make_data()
    for file, adapted in [("lorasb", lorasb_adapted), ("lora", lora_adapted)]:
        fresh = copy.deepcopy(base)
        assert lorasb.load_adapter(fresh, files[file])["scale"] == (1.0 if file == "lorasb" else 2.0)
        assert torch.equal(fresh(x), adapted(x))


def test_peft_export_reproduces_the_merged_weights(tmp_path):
    model, _, _, _ = lorasb_model()
    lorasb.export_peft(model, tmp_path / "peft", base_model="tiny")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["target_modules"] == ["down_proj", "up_proj"]
    tensors, _ = lorasb.load_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    for name in ("up_proj", "down_proj"):
        lora_a = tensors[f"base_model.model.{name}.lora_A.weight"]
        lora_b = tensors[f"base_model.model.{name}.lora_B.weight"]
        scale = config["lora_alpha"] / config["r"]
        torch.testing.assert_close(scale * lora_b @ lora_a, getattr(model, name).delta_weight(), atol=1e-7, rtol=0)


def tiny_hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def causal_lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def test_works_on_a_hugging_face_model_and_exports_what_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_hf_llama()
    base = copy.deepcopy(model)
    ids = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(0))
    updates = lorasb.estimate_first_update(model, [ids[:4], ids[4:]], causal_lm_loss, num_samples=6, lr=1e-3)
    report = lorasb.add_adapters(model, "lorasb", rank=4, updates=updates)
    assert len(report.modules) == 2 * 7 and report.trainable == 2 * 7 * 16
    with torch.no_grad():
        for m in lorasb.adapters(model).values():
            m.R.mul_(30)
    lorasb.export_peft(model, tmp_path / "peft", base_model="tiny")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").merge_and_unload()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        lorasb.merge_adapters(model)
        for name, m in lorasb.adapters(model).items():
            torch.testing.assert_close(peft_model.get_submodule(name).weight, m.base.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)


# --- the estimate through hooks, in groups, on other kinds of layer ------------------------------------------------

def autograd_weight_gradients(model, batch, loss_fn) -> dict:
    """dL/dW of every weight by a plain backward, in train mode as the estimate runs (a copy of the model)."""
    model = copy.deepcopy(model).train()
    loss_fn(model, batch).backward()
    return {name: m.weight.grad for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_hook_gradient_equals_autograd_bit_for_bit_on_an_fp32_model():
    """G = grad_out^T x from the hooks is the very matmul autograd computes for an nn.Linear's weight gradient (both
    flatten the tokens and multiply in fp32), so on an fp32 model they are equal bit for bit, not just to rounding."""
    model = tiny_hf_llama()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    grads = lorasb.estimate_first_update(model, [ids], causal_lm_loss, 4, lr=-1.0, rule="sgd")  # dW = G
    expected = autograd_weight_gradients(model, ids, causal_lm_loss)
    assert len(grads) == 14 and all(torch.equal(grads[name], expected[name]) for name in grads)


def tiny_llama_in_4bit():
    """tiny_hf_llama with its target linears replaced by bitsandbytes' NF4 Linear4bit (quantized on the CPU), and
    the same model in fp32 with the dequantized weights Q(W0)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_hf_llama()
    for name, linear in lorasb.find_targets(model).items():
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
        lorasb._set_submodule(model, name, layer.to("cpu"))
    dequantized = copy.deepcopy(tiny_hf_llama())
    for name, layer in lorasb.find_targets(model).items():
        dequantized.get_submodule(name).weight.data = lorasb.frozen_weight(layer).clone()
    return model, dequantized


def test_hook_gradient_on_a_4_bit_model_equals_autograd_on_its_dequantized_weights():
    model, dequantized = tiny_llama_in_4bit()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    grads = lorasb.estimate_first_update(model, [ids], causal_lm_loss, 4, lr=-1.0, rule="sgd")
    expected = autograd_weight_gradients(dequantized, ids, causal_lm_loss)
    assert len(grads) == 14
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5)


class DropoutBlock(TinyBlock):
    """TinyBlock with dropout: each pass of a grouped estimate must see the same random masks."""

    def forward(self, x):
        return self.head(self.norm(x + self.down_proj(F.dropout(F.gelu(self.up_proj(x)), 0.3, self.training))))


def test_grouped_and_ungrouped_estimates_give_the_same_initialization_bit_for_bit():
    torch.manual_seed(0)
    model = DropoutBlock()
    x, y = make_data()
    batches, targets = batches_of(x, y, 4), ("up_proj", "down_proj")
    groups = lorasb.target_groups(lorasb.find_targets(model, targets), group_bytes=4 * 24 * 12)
    assert [list(g) for g in groups] == [["up_proj"], ["down_proj"]]  # one layer each: two passes
    torch.manual_seed(1)
    whole = lorasb.estimate_first_update(model, batches, mse_loss, 9, lr=1e-2, targets=targets)
    after_whole = torch.rand(3)
    torch.manual_seed(1)
    grouped = lorasb.estimate_first_update(model, batches, mse_loss, 9, lr=1e-2, targets=targets, group_bytes=1)
    assert torch.equal(torch.rand(3), after_whole)  # the random state afterwards is the same too
    assert all(torch.equal(whole[name], grouped[name]) for name in targets)
    adapted = {}
    for kind in ("dict", "groups"):
        fresh = copy.deepcopy(model)
        torch.manual_seed(1)
        updates = whole if kind == "dict" else lorasb.estimate_by_group(fresh, batches, mse_loss, 9, 1e-2, targets,
                                                                        group_bytes=1)
        lorasb.add_adapters(fresh, "lorasb", 4, targets, updates=updates)
        adapted[kind] = {name: (m.B, m.R, m.A) for name, m in lorasb.adapters(fresh).items()}
    assert all(torch.equal(u, v) for name in targets for u, v in zip(adapted["dict"][name], adapted["groups"][name]))


def test_a_one_shot_iterator_cannot_feed_several_groups():
    model = TinyBlock()
    x, y = make_data()
    with pytest.raises(ValueError, match=r"2 groups of layers take 2 passes.*one-shot iterator \(generator\).*list"):
        lorasb.estimate_first_update(model, (b for b in batches_of(x, y, 4)), mse_loss, 8, 1.0,
                                     targets=("up_proj", "down_proj"), group_bytes=1)


def test_a_4_bit_model_takes_all_three_methods_and_refuses_to_merge(tmp_path):
    """LoRA-SB and LoRA-XS on bitsandbytes Linear4bit layers: LoRA-XS's SVD is of Q(W0), the dequantized weight; the
    adapted 4-bit model computes what the dequantized fp32 model with the same adapters does; merging is refused."""
    model, dequantized = tiny_llama_in_4bit()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    for method in ("lorasb", "loraxs", "lora"):
        quantized, full = copy.deepcopy(model), copy.deepcopy(dequantized)
        updates = lorasb.estimate_first_update(quantized, [ids], causal_lm_loss, 4, 1e-3) if method == "lorasb" \
            else None
        for m in (quantized, full):
            lorasb.add_adapters(m, method, 4, updates=updates, lora_alpha=8)
        for name, adapter in lorasb.adapters(quantized).items():
            assert all(torch.equal(getattr(adapter, t), getattr(lorasb.adapters(full)[name], t)) for t in "BA")
        with torch.no_grad():
            torch.testing.assert_close(quantized(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot merge into a Linear4bit: its weight is quantized"):
        lorasb.merge_adapters(quantized)


def test_gpt2_conv1d_layers_are_adapted_as_peft_does(tmp_path):
    """GPT-2's projections are transformers' Conv1D (y = x W + b, W stored in x out): they are targets, the update is
    estimated and merged in the right orientation, and PEFT loads the export (its fan_in_fan_out) to the same logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    base = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    targets = ("c_attn", "c_proj", "c_fc")
    with pytest.raises(ValueError, match=r"no nn.Linear layer matches.*\['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        lorasb.find_targets(model)
    updates = lorasb.estimate_first_update(model, [ids], causal_lm_loss, 4, 1e-3, targets=targets)
    assert updates["transformer.h.0.attn.c_attn"].shape == (96, 32)  # out x in, as for an nn.Linear
    report = lorasb.add_adapters(model, "lorasb", 4, targets, updates=updates)
    assert len(report.modules) == 8
    with torch.no_grad():
        for m in lorasb.adapters(model).values():
            m.R.mul_(30)
        logits = model(input_ids=ids).logits
        with lorasb.merged(model):
            torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    lorasb.export_peft(model, tmp_path / "peft")
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(base, tmp_path / "peft")(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, logits, atol=1e-5, rtol=1e-5)


def test_targets_that_match_nothing_name_the_linear_layers_the_model_has():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48)
    with pytest.raises(ValueError, match=r"no nn.Linear layer matches targets \['q_proj'.*end with \[.*'key', "
                                         r"'query', 'value'\]: pass targets="):
        lorasb.find_targets(transformers.BertModel(config))


# --- safetensors files: a damaged one is refused by name (test_safetensors_file.py: the strict checks) -------------

def test_truncated_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    lorasb.save_safetensors(path, {"w": torch.randn(4, 4)})
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="t.safetensors"):
        lorasb.load_safetensors(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="only 2 bytes"):
        lorasb.load_safetensors(path)


def test_a_damaged_adapter_file_is_refused_naming_the_file_and_the_problem(tmp_path):
    model, base, _, _ = lorasb_model()
    saved = tmp_path / "adapter.safetensors"
    lorasb.save_adapter(model, saved, method="lorasb")
    raw = saved.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    damaged = {"truncated": (raw[:-5], "data section"),
               "header length": ((10**12).to_bytes(8, "little") + raw[8:], "header length"),
               "not JSON": (raw[:8] + b"x" + raw[9:], "Expecting value"),
               "not an object": ((3).to_bytes(8, "little") + b"[1]" + data, "not a JSON object"),
               "unknown dtype": (raw.replace(b'"F32"', b'"F99"', 1), "not a dtype"),
               "offsets": (raw.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1), "data_offsets")}
    for problem, (content, message) in damaged.items():
        path = tmp_path / f"{problem}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            lorasb.load_adapter(copy.deepcopy(base), path)


def test_safetensors_round_trip_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "i64": torch.arange(3),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 2), "f16": torch.randn(2, 1).half()}
    lorasb.save_safetensors(tmp_path / "ours.safetensors", tensors, {"note": "x"})
    theirs = st.load_file(tmp_path / "ours.safetensors")
    st.save_file(tensors, tmp_path / "theirs.safetensors")
    ours, _ = lorasb.load_safetensors(tmp_path / "theirs.safetensors")
    for name, t in tensors.items():
        assert torch.equal(theirs[name], t) and torch.equal(ours[name], t) and ours[name].dtype == t.dtype


# --- the method's claim on a toy task ------------------------------------------------------------------------------

def test_lorasb_beats_loraxs_and_tracks_full_fine_tuning_on_a_toy_task():
    """A student TinyBlock learns a teacher that differs from it by a rank-2 change of up_proj and down_proj.
    With the same rank, optimizer and steps, LoRA-SB (subspace from the first gradient) must reach a lower loss than
    LoRA-XS (subspace from W0's top singular vectors), and its loss curve must stay closer to full fine-tuning's
    (measure: mean |log loss_method - log loss_full| over the steps)."""
    torch.manual_seed(0)
    student = TinyBlock(d=16, h=32)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for name in ("up_proj", "down_proj"):
            w = getattr(teacher, name).weight
            w += 0.6 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]) / math.sqrt(w.shape[1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g)
    with torch.no_grad():
        y = teacher(x)
    batches = batches_of(x, y, 32)
    lr, steps = 1e-2, 150

    def train(method):
        model = copy.deepcopy(student)
        if method == "lorasb":
            updates = lorasb.estimate_first_update(model, batches, mse_loss, 64, lr=lr,
                                                   targets=("up_proj", "down_proj"))
            lorasb.add_adapters(model, "lorasb", 2, targets=("up_proj", "down_proj"), updates=updates)
        elif method == "loraxs":
            lorasb.add_adapters(model, "loraxs", 2, targets=("up_proj", "down_proj"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
        losses = []
        for step in range(steps):
            loss = mse_loss(model, batches[step % len(batches)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    full, sb, xs = train("full"), train("lorasb"), train("loraxs")
    final = lambda losses: losses[-16:].mean().item()  # noqa: E731
    assert final(sb) < 0.7 * final(xs)
    gap = lambda losses: (losses.log() - full.log()).abs().mean().item()  # noqa: E731
    assert gap(sb) < gap(xs)

