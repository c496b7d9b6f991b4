"""LowRankLinear's forward and gradients equal those of the dense layer x (W0 + s B R A)^T + b, for every combination
of what trains, in fp64, under bf16 autocast and under torch.compile; its frozen factors are cast once."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorasb


def dense_reference(layer: lorasb.LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """x (W0 + s B R A)^T + b by autograd through the full m x n weight, in x's dtype."""
    b = layer.B.to(x.dtype) if layer.R is None else layer.B.to(x.dtype) @ layer.R.to(x.dtype)
    weight = layer.base.weight.to(x.dtype) + layer.scale * b @ layer.A.to(x.dtype)
    return F.linear(x, weight, None if layer.base.bias is None else layer.base.bias.to(x.dtype))


def make_layer(method: str, bias: bool, train_base: bool, dtype=torch.float64) -> lorasb.LowRankLinear:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias).requires_grad_(train_base)
    b, a = torch.randn(10, 4), torch.randn(4, 12)
    r = torch.randn(4, 4) if method == "lorasb" else None
    return lorasb.LowRankLinear(base, b, a, r, scale=1.0 if method == "lorasb" else 2.5).to(dtype)


def trained(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lorasb", "lora"])
@pytest.mark.parametrize("bias, train_base, x_grad", [(False, False, True), (True, True, True), (True, False, False)])
def test_forward_and_gradients_equal_the_dense_layer(method, bias, train_base, x_grad):
    layer = make_layer(method, bias, train_base)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=x_grad)
    dy = torch.randn(3, 5, 10, dtype=torch.float64)
    params = trained(layer)
    inputs = [*params.values(), *([x] if x_grad else [])]
    expected_y = dense_reference(layer, x)
    expected = torch.autograd.grad(expected_y, inputs, dy)
    y = layer(x)
    torch.testing.assert_close(y, expected_y)
    for name, got, want in zip([*params, "x"], torch.autograd.grad(y, inputs, dy), expected):
        torch.testing.assert_close(got, want, msg=name)
    assert layer.B.dtype == layer.A.dtype == torch.float64  # the stored factors are untouched


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    layer = make_layer("lorasb", bias=True, train_base=False, dtype=torch.float32)
    x = torch.randn(2, 7, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = dense_reference(layer, x)  # fp32: y is within bf16 rounding of it, relative to the output's scale
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    y.float().square().sum().backward()
    assert layer.R.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_compiles_without_graph_breaks():
    layer = make_layer("lorasb", bias=True, train_base=False, dtype=torch.float32)
    x = torch.randn(2, 3, 12)
    expected = layer(x)
    try:
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
        compiled(x).sum().backward()
        assert layer.R.grad is not None
    finally:
        torch._dynamo.reset()


def test_under_autocast_the_factors_are_cast_at_each_use_and_follow_changes():
    """B, A and R stay fp32 and are cast to autocast's dtype at each forward: an in-place change of B (load_adapter
    copies into it) shows at the next call, and nothing cast is kept in the module or its state_dict."""
    layer = make_layer("lorasb", bias=False, train_base=False, dtype=torch.float32)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(x)
        with torch.no_grad():
            layer.B.mul_(2)
        after = layer(x)
        base = layer.base(x).float()
    torch.testing.assert_close(after.float() - base, 2 * (before.float() - base), atol=2e-2, rtol=2e-2)
    assert layer.B.dtype == layer.A.dtype == layer.R.dtype == torch.float32
    assert sorted(layer.state_dict()) == ["A", "B", "R", "base.weight"]
