"""A 4-bit frozen base model: NormalFloat4 (NF4) weights, as QLoRA stores them (Dettmers et al. 2023, arXiv 2305.14314).

A weight W (m x n) is read as one flat vector cut into blocks of 64; each block keeps its absolute maximum s (fp32) and
each weight the index of the code value nearest to w / s among the 16 values of NF4_CODE (quantiles of a normal
distribution, so that a normally distributed block uses every code equally often). Two 4-bit indices share a byte,
the first in the high nibble. Dequantized, w = NF4_CODE[index] * s, computed in fp32 and then cast: the same values
as bitsandbytes' NF4 (blocksize 64, no double quantization) bit for bit.

    bytes per weight: 0.5 (two codes a byte) + 4 / 64 (an fp32 scale per block) = 0.5625 (4.5 bits)

Double quantization (QLoRA's 8-bit scales, one fp32 scale per 256 blocks) would make it 0.5 + 1 / 64 + 4 / 16384 =
0.516 bytes per weight: 0.047 bytes (8 %) less, 0.33 GB of Mistral-7B's 7.0 billion linear weights (3.93 GB -> 3.60
GB). A 7B model's estimate and training step fit in 16 GiB without it, so it is not done here.

NF4Linear is an nn.Linear (so tools that look for linear layers find it, as they find bitsandbytes' Linear4bit) whose
`weight` buffer holds the packed codes (uint8) and `absmax` the scales; it computes y = x W^T + b with W dequantized
at each use, in the compute dtype (the input's, or autocast's). Its backward dequantizes W again instead of keeping it,
so no m x n copy of W outlives the forward. `dequantize()` gives W (out x in) for whoever needs the matrix (LoRA-XS's
SVD of W0, merging): lorasb.py calls that method, without importing this module.

Which layers: quantize_model replaces every nn.Linear but lm_head: the seven projections of each decoder layer,
adapted or not (all frozen: only R, or LoRA's B and A, train, beside them). The embedding (a lookup, not a linear layer)
and lm_head stay in the model's dtype: a tied lm_head is the embedding; the logits are where 4-bit error hurts most,
which is why QLoRA and transformers' bitsandbytes loading keep lm_head unquantized; each is 1.8 % of Mistral-7B.

Loading without a full-precision copy: load_nf4_model builds the model on "meta" with NF4 layers, allocates it (4-bit
buffers, other weights in the model's dtype), then reads the checkpoint one tensor at a time, quantizing each
projection weight as it is read and dropping it. build_nf4_model gives the same empty model for random weights.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorasb import SAFETENSORS_DTYPES
from machinery.safetensors_file import check_safetensors
from model import Transformer, build_model, check_checkpoint, checkpoint_files, load_config

BLOCK = 64
# bitsandbytes.functional.get_4bit_type("nf4"), the values of the QLoRA paper's appendix E, as fp32.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)
CHUNK = 2**22  # weights (de)quantized at a time: the temporaries stay ~16 MB whatever the layer's size
KEEP = ("lm_head",)  # linear layers quantize_model leaves in the model's dtype


# ---------------------------------------------------------------------------------------------------------------------
# The format: quantize and dequantize a tensor.
# ---------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 15 midpoints between neighbouring code values (a value is given the code of the interval it falls in), and
    the pair of values (high nibble, low nibble) each of the 256 bytes stands for (256 x 2), on `device`."""
    code = torch.tensor(NF4_CODE, device=device)
    byte = torch.arange(256, device=device)
    return (code[:-1] + code[1:]) / 2, torch.stack((code[byte >> 4], code[byte & 15]), dim=1)


def packed_sizes(numel: int) -> tuple[int, int]:
    """(bytes of codes, number of blocks) of a tensor of `numel` weights: a last partial block is padded with zeros,
    which changes neither its scale nor the other codes, and is dropped again when dequantizing."""
    blocks = math.ceil(numel / BLOCK)
    return blocks * BLOCK // 2, blocks


def quantize_nf4(weight: torch.Tensor, where: str = "the weight") -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of `weight` (any shape, read flat): (packed uint8 codes, fp32 absmax per block of 64), on its device.
    Computed CHUNK weights at a time, so that quantizing needs a few MB beside the weight whatever its size.
    Raises ValueError when the weight holds NaN or inf (`where` names it)."""
    flat = weight.detach().reshape(-1)
    n_bytes, blocks = packed_sizes(flat.numel())
    packed = torch.empty(n_bytes, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    midpoints, _ = _tables(flat.device)
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start:start + CHUNK].float()
        chunk = F.pad(chunk, (0, -chunk.numel() % BLOCK)).view(-1, BLOCK)
        scale = chunk.abs().amax(dim=1)
        if not torch.isfinite(scale).all():
            raise ValueError(f"{where} holds NaN or inf values and cannot be quantized; check the checkpoint")
        # x * (1 / s), not x / s, and the clamp (s = 0 in an all-zero block): bitsandbytes' arithmetic, for its codes
        scaled = (chunk * (1.0 / scale.clamp(min=1e-38))[:, None]).clamp(-1, 1)
        codes = torch.bucketize(scaled.view(-1), midpoints, out_int32=True).to(torch.uint8)
        packed[start // 2:start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // BLOCK:start // BLOCK + scale.numel()] = scale
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: Iterable[int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of `shape` that quantize_nf4 encoded: NF4_CODE[code] * absmax in fp32, cast to `dtype`."""
    shape = tuple(shape)
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    _, pairs = _tables(packed.device)
    for start in range(0, numel, CHUNK):
        values = pairs[packed[start // 2:(start + CHUNK) // 2].int()].view(-1, BLOCK)
        values = values * absmax[start // BLOCK:start // BLOCK + values.shape[0], None]
        out[start:start + CHUNK] = values.view(-1)[:min(CHUNK, numel - start)]
    return out.view(shape)


# ---------------------------------------------------------------------------------------------------------------------
# The layer.
# ---------------------------------------------------------------------------------------------------------------------

class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b, W dequantized from its codes in forward and again in backward (dL/dx = dL/dy W): only the codes
    and scales are saved for backward, where F.linear would save the m x n dequantized W. W gets no gradient (it is
    frozen); b gets one when it requires it."""

    @staticmethod
    def forward(ctx, x, packed, absmax, bias, shape):
        ctx.save_for_backward(packed, absmax)
        ctx.shape = shape
        return F.linear(x, dequantize_nf4(packed, absmax, shape, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(packed, absmax, ctx.shape, grad_out.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


class NF4Linear(nn.Linear):
    """A frozen linear layer in NF4: buffers `weight` (packed codes, uint8) and `absmax` (one fp32 scale per block of
    64 weights, kept as its int32 bit pattern so that model.to(bfloat16), which casts every floating-point tensor,
    leaves the code intact), and the bias as in nn.Linear. Forward hooks see x, backward hooks dL/dy, as for
    nn.Linear: lorasb's estimate takes G = sum dL/dy^T x from them, the gradient at the weights computed with."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__, which would allocate a full-precision weight
        self.in_features, self.out_features = in_features, out_features
        n_bytes, blocks = packed_sizes(in_features * out_features)
        self.register_buffer("weight", torch.zeros(n_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, where: str = "the weight") -> "NF4Linear":
        """The NF4 layer of an nn.Linear (its bias Parameter is taken over); on "meta", an empty one of its shape."""
        layer = cls(linear.in_features, linear.out_features, bias=False, device=linear.weight.device)
        layer.bias = linear.bias
        if linear.weight.device.type != "meta":
            layer.quantize_(linear.weight, where)
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, where: str = "the weight") -> None:
        """Store `weight` (out x in, any floating dtype) in NF4, on this layer's device."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{where} has shape {tuple(weight.shape)}; this layer is "
                             f"{(self.out_features, self.in_features)}")
        packed, absmax = quantize_nf4(weight.to(self.weight.device), where)
        self.weight.copy_(packed)
        self.absmax.copy_(absmax.view(torch.int32))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (out x in) in `dtype`: the weights this layer computes with (fp32 by default, which is exact)."""
        return dequantize_nf4(self.weight, self.absmax.view(torch.float32), (self.out_features, self.in_features),
                              dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return NF4LinearFunction.apply(x.to(dtype), self.weight, self.absmax.view(torch.float32), bias,
                                       (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", nf4"


def quantize_model(model: nn.Module, keep: Iterable[str] = KEEP) -> list[str]:
    """Replace, in place, every nn.Linear of `model` whose name does not end with one of `keep` by its NF4Linear, each
    full-precision weight dropped as soon as it is quantized; the names of the replaced layers. On a "meta" model (a
    skeleton) the layers are swapped without computing anything."""
    keep = tuple(keep)
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Linear and name.split(".")[-1] not in keep and name not in keep]
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, NF4Linear.from_linear(linear, name))
        del linear
    return [name for name, _ in found]


def nf4_layers(model: nn.Module) -> dict[str, NF4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of the NF4 layers' codes and scales."""
    return sum(m.weight.nbytes + m.absmax.nbytes for m in nf4_layers(model).values())


# ---------------------------------------------------------------------------------------------------------------------
# Models: built empty in NF4, or loaded from a checkpoint tensor by tensor.
# ---------------------------------------------------------------------------------------------------------------------

def build_nf4_model(config, device="cpu", dtype: torch.dtype = torch.float32, keep: Iterable[str] = KEEP
                    ) -> Transformer:
    """model.build_model with quantize_model's layers swapped in while it is a skeleton on "meta": its NF4 buffers
    and other weights allocated on `device` (the others in `dtype`), not initialized. Never holds a full-precision
    copy of the swapped weights."""
    return build_model(config, device, dtype, prepare=lambda skeleton: quantize_model(skeleton, keep))


def read_tensor(file, data_start: int, info: dict, path) -> torch.Tensor:
    """One tensor of a checked safetensors header, read from the open file into memory of its own (not a memory map,
    whose pages would count as the process's memory as long as the whole file stays mapped)."""
    begin, end = info["data_offsets"]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    file.seek(data_start + begin)
    if file.readinto(buffer.numpy()) != end - begin:
        raise ValueError(f"{path}: the file ended inside a tensor (it changed while being read); load it again")
    return buffer.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def load_nf4_model(folder, device="cpu", dtype: torch.dtype | None = None, keep: Iterable[str] = KEEP,
                   checked: bool = False) -> Transformer:
    """model.load_model with the frozen linear layers in NF4 (quantize_model's), and no full-precision copy of the
    model ever in memory: every check of load_model first (on a skeleton, reading no weights), then the model built
    empty in NF4 (build_nf4_model) and the checkpoint read one tensor at a time, each projection weight quantized on
    `device` and dropped before the next is read. dtype (of the unquantized weights: embedding, lm_head, norms, biases)
    defaults to bf16 on CUDA and fp32 elsewhere. The result equals load_model followed by quantize_model. checked=True:
    the caller has run check_checkpoint already (as load_model's)."""
    config = load_config(folder)
    if not checked:
        check_checkpoint(folder, config)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_nf4_model(config, device, dtype, keep)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path in checkpoint_files(folder):
            header = check_safetensors(path)
            with open(path, "rb") as file:
                data_start = 8 + int.from_bytes(file.read(8), "little")
                for name, info in header.items():
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # check_checkpoint found it equal to the embedding, which is read
                    module_name, _, attribute = name.rpartition(".")
                    module, tensor = modules[module_name], read_tensor(file, data_start, info, path)
                    if isinstance(module, NF4Linear) and attribute == "weight":
                        module.quantize_(tensor, f"{path}: {name}")
                    else:
                        getattr(module, attribute).copy_(tensor)
                    del tensor
    return model.eval()

