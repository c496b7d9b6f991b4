"""Tests of machinery/nf4.py: the NF4 format against bitsandbytes (codebook, codes and dequantized values bit for bit),
its error on a Gaussian matrix, the NF4Linear layer (forward, gradients, hooks, what backward keeps, state_dict), and
loading a checkpoint into NF4 tensor by tensor without a full-precision copy of the model."""

import io
import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lorasb
import model as model_lib
from machinery import nf4
from machinery.nf4 import NF4Linear, dequantize_nf4, quantize_nf4

SHAPES = [(64, 128), (5, 7), (300, 211), (1, 1)]  # whole blocks, and numels that are not a multiple of 64 (padded)


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes.functional")


def gaussian(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# The format against bitsandbytes
# ---------------------------------------------------------------------------------------------------------------------

def test_codebook_is_bitsandbytes_nf4(bnb):
    code = bnb.get_4bit_type("nf4", device="cpu")
    assert torch.equal(torch.tensor(nf4.NF4_CODE), code)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [nf4.CHUNK, 128])  # 128: many chunks, whose seams must not show
def test_codes_and_dequantized_values_equal_bitsandbytes(bnb, shape, chunk, monkeypatch):
    monkeypatch.setattr(nf4, "CHUNK", chunk)
    weight = gaussian(*shape) * 0.02
    packed, absmax = quantize_nf4(weight)
    theirs, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    # their codes stop at the last real pair of weights; ours run to the end of the padded last block
    assert torch.equal(packed[:theirs.numel()], theirs.view(-1))
    assert torch.equal(absmax, state.absmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state.dtype = dtype
        assert torch.equal(dequantize_nf4(packed, absmax, shape, dtype), bnb.dequantize_4bit(theirs, state))


def test_dequantization_error_of_a_gaussian_matrix_is_bounded():
    weight = gaussian(512, 512)
    packed, absmax = quantize_nf4(weight)
    error = dequantize_nf4(packed, absmax, weight.shape) - weight
    # each weight is at most half the widest gap between neighbouring code values from its own, times its block's scale
    half_gap = max(b - a for a, b in zip(nf4.NF4_CODE, nf4.NF4_CODE[1:])) / 2
    assert (error.view(-1, 64).abs() <= half_gap * absmax[:, None] * (1 + 1e-6)).all()
    # NF4's relative error on normal weights (QLoRA reports 4-bit NormalFloat beating 4-bit Float and Int)
    relative = (error.norm() / weight.norm()).item()
    assert 0.05 < relative < 0.11


def test_requantizing_the_dequantized_weight_gives_the_same_codes():
    weight = gaussian(96, 80)
    packed, absmax = quantize_nf4(weight)
    again = quantize_nf4(dequantize_nf4(packed, absmax, weight.shape))
    assert torch.equal(again[0], packed) and torch.equal(again[1], absmax)


def test_odd_numel_pads_the_last_block_and_drops_the_padding():
    weight = gaussian(5, 7)  # 35 weights: one block, 29 of it padding
    packed, absmax = quantize_nf4(weight)
    assert packed.shape == (32,) and absmax.shape == (1,)
    assert absmax[0] == weight.abs().max()
    assert (packed[18:] == 0x77).all()  # padding zeros get code 7, the value 0.0
    assert dequantize_nf4(packed, absmax, (5, 7)).shape == (5, 7)


def test_all_zero_block_dequantizes_to_zero():
    weight = torch.cat([torch.zeros(64), gaussian(64)])
    packed, absmax = quantize_nf4(weight)
    assert (dequantize_nf4(packed, absmax, (128,))[:64] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(bad):
    weight = gaussian(8, 64)
    weight[3, 5] = bad
    with pytest.raises(ValueError, match="layers.0.q_proj.*NaN or inf"):
        quantize_nf4(weight, "layers.0.q_proj")


# ---------------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------------

def nf4_layer(in_features=96, out_features=80, bias=True, seed=0) -> NF4Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(gaussian(out_features, in_features, seed=seed) * 0.05)
        if bias:
            linear.bias.copy_(gaussian(out_features, seed=seed + 1))
    return NF4Linear.from_linear(linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_linear_on_the_dequantized_weight(dtype, bias):
    layer = nf4_layer(bias=bias)
    x = gaussian(3, 5, 96, seed=2).to(dtype).requires_grad_()
    y = layer(x)
    grad_out = gaussian(*y.shape, seed=3).to(dtype)
    y.backward(grad_out)
    weight = layer.dequantize(dtype)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = None if layer.bias is None else layer.bias.detach().to(dtype).requires_grad_()
    y_ref = F.linear(x_ref, weight, bias_ref)
    y_ref.backward(grad_out)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(layer.bias.grad, bias_ref.grad.float())


def test_computes_in_autocast_dtype():
    layer = nf4_layer()
    x = gaussian(4, 96, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()))


def saved_for_backward(layer, x) -> list[torch.Tensor]:
    """The tensors autograd keeps for the backward of layer(x)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return saved


def test_backward_keeps_no_dequantized_weight():
    layer = nf4_layer(in_features=256, out_features=192)
    x = gaussian(2, 256, seed=2).requires_grad_()
    weight_size = 256 * 192
    kept = saved_for_backward(layer, x)
    assert kept and not any(t.is_floating_point() and t.numel() >= weight_size for t in kept)
    assert sum(t.nbytes for t in kept) < weight_size  # codes and scales: 0.5625 bytes a weight
    # the check sees a dequantized weight where one is kept: F.linear keeps it for dL/dx
    plain = lambda x: F.linear(x, layer.dequantize(), layer.bias)  # noqa: E731
    assert any(t.numel() == weight_size for t in saved_for_backward(plain, x))


def test_hooks_see_the_input_and_output_gradient_that_give_the_weight_gradient():
    """G = dL/dy^T x from a forward and a backward hook equals autograd's dL/dW at the dequantized weight: how
    lorasb's estimate gets the gradient of a weight that has no .grad."""
    layer = nf4_layer()
    seen = {}
    layer.register_forward_hook(lambda m, inputs, output: seen.update(x=inputs[0].detach()))
    layer.register_full_backward_hook(lambda m, grad_in, grad_out: seen.update(g=grad_out[0]))
    x = gaussian(3, 7, 96, seed=2).requires_grad_()
    (layer(x) ** 2).sum().backward()
    hook_grad = seen["g"].reshape(-1, 80).T @ seen["x"].reshape(-1, 96)
    weight = layer.dequantize().requires_grad_()
    (F.linear(x.detach(), weight, layer.bias.detach()) ** 2).sum().backward()
    torch.testing.assert_close(hook_grad, weight.grad, rtol=1e-5, atol=1e-6)


def test_is_a_frozen_nn_linear_exposing_its_shape():
    layer = nf4_layer(in_features=96, out_features=80)
    assert isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (96, 80)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]  # the codes are buffers: no optimizer sees them
    assert layer.dequantize().shape == (80, 96) and layer.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert lorasb.find_targets(nn.Sequential(layer), ["0"]) == {"0": layer}


def test_state_dict_round_trip_and_dtype_casts_leave_the_weights_exact():
    layer = nf4_layer()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = NF4Linear(96, 80)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.dequantize(), layer.dequantize()) and torch.equal(other.bias, layer.bias)
    # model.to(bf16) casts every floating-point tensor: the scales (int32 bits) must not be rounded with them
    other.to(torch.bfloat16)
    assert torch.equal(other.dequantize(), layer.dequantize()) and other.bias.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# Models: quantize_model, build_nf4_model, load_nf4_model
# ---------------------------------------------------------------------------------------------------------------------

CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 128, "intermediate_size": 512,
          "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
          "hidden_act": "silu", "tie_word_embeddings": True}


def write_checkpoint(folder: Path, **changes) -> Path:
    """config.json + model.safetensors of a random model of CONFIG (+ changes)."""
    config = {**CONFIG, **changes}
    skeleton = model_lib.build_model(model_lib.ModelConfig.from_hf(config))
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.05
               for name, p in skeleton.named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    lorasb.save_safetensors(folder / "model.safetensors", tensors)
    return folder


PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_quantize_model_replaces_every_linear_but_lm_head(tmp_path):
    folder = write_checkpoint(tmp_path, tie_word_embeddings=False, attention_bias=True)
    model, reference = model_lib.load_model(folder), model_lib.load_model(folder)
    names = nf4.quantize_model(model)
    assert {n.split(".")[-1] for n in names} == PROJECTIONS and len(names) == 7 * CONFIG["num_hidden_layers"]
    assert type(model.lm_head) is nn.Linear and all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():  # the same model with its projections' weights rounded to their 4-bit values
        for name in names:
            reference.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids), reference(ids))


def test_build_nf4_model_allocates_no_full_precision_projection():
    config = model_lib.ModelConfig.from_hf(CONFIG)
    model = nf4.build_nf4_model(config, "cpu", torch.bfloat16)
    assert nf4.nf4_bytes(model) == sum(m.weight.nbytes + m.absmax.nbytes for m in nf4.nf4_layers(model).values()) > 0
    assert all(p.ndim < 2 or name == "model.embed_tokens.weight" for name, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied as build_model ties
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32


class PeakMemory(TorchDispatchMode):
    """The most bytes of CPU tensor storage alive at once among those made inside the block (each storage counted
    once, from its creation to its release): deterministic, unlike the process's resident memory. A memory-mapped
    file (torch.from_file) is not counted: its pages are the file's, read when touched."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.from_file.default:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:  # a view, or an op writing in place
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self.release, key)
        return out

    def release(self, key):
        self.now -= self.live.pop(key)


@pytest.mark.parametrize("tied", [True, False])
def test_loading_in_nf4_equals_loading_then_quantizing_without_a_full_precision_copy(tmp_path, tied):
    folder = write_checkpoint(tmp_path, tie_word_embeddings=tied)
    with PeakMemory() as loading_then_quantizing:
        reference = model_lib.load_model(folder)
        nf4.quantize_model(reference)
    with PeakMemory() as loading_in_nf4:
        model = nf4.load_nf4_model(folder)
    expected, got = reference.state_dict(), model.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    full_precision = sum(m.in_features * m.out_features * 4 for m in nf4.nf4_layers(model).values())
    largest = max(m.in_features * m.out_features * 4 for m in nf4.nf4_layers(model).values())
    in_memory = sum(t.nbytes for t in got.values())
    # the model itself, plus one weight read and the temporaries of quantizing it: never the fp32 projections
    assert loading_in_nf4.peak <= in_memory + 6 * largest < full_precision
    assert loading_then_quantizing.peak > full_precision  # what the meter sees when the fp32 model exists


def test_loading_in_nf4_keeps_every_check_of_load_model(tmp_path):
    folder = write_checkpoint(tmp_path)
    tensors, _ = lorasb.load_safetensors(folder / "model.safetensors")
    tensors = {k: v.clone() for k, v in tensors.items() if k != "model.layers.3.mlp.up_proj.weight"}
    lorasb.save_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(ValueError, match="missing tensors.*layers.3.mlp.up_proj.weight"):
        nf4.load_nf4_model(folder)


def test_add_adapters_counts_a_4bit_weight_as_out_x_in(tmp_path):
    """The report's total is the model's weights whether they are stored in fp32 or as packed 4-bit codes (buffers,
    not parameters): the trainable share printed for an NF4 base is the unquantized model's."""
    folder = write_checkpoint(tmp_path)
    reports = []
    for quantize in (False, True):
        model = model_lib.load_model(folder)
        if quantize:
            nf4.quantize_model(model)
        reports.append(lorasb.add_adapters(model, "loraxs", 4))
    assert reports[0].total == reports[1].total and reports[0].trainable == reports[1].trainable
