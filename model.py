"""A compact Llama-family decoder (llama, mistral, qwen2), batched greedy generation with a KV cache, and loading
Hugging Face checkpoints exactly (single file or shards) from a local folder.

    model = load_model(folder, device="cuda")                         # bf16 on GPU, fp32 on CPU
    logits = model(input_ids, attention_mask)                         # (B, T, vocab)
    new_tokens = generate(model, prompts, max_new_tokens=256, eos_ids={2}, pad_id=2)

`folder` holds config.json and model.safetensors (or shards); machinery/hub.py's resolve_model turns a hub name such as
"HuggingFaceTB/SmolLM2-135M-Instruct" into one (the Hugging Face cache, or a download).

Module names are Hugging Face's (model.layers.0.self_attn.q_proj, ...), so checkpoint keys, adapters and PEFT exports
map one to one. For speed on GPU call `model.compile()`: it compiles in place and keeps the module names, whereas
`torch.compile(model)` returns a wrapper whose state_dict keys start with `_orig_mod.`.

Reading order: config -> layers -> model -> generation -> weight loading. Needs torch, tqdm, the standard library
and three modules of machinery/ for the checkpoint's files (untrusted input): input_files.py reads JSON files safely,
config_file.py checks every field of config.json, safetensors_file.py reads the weight files strictly.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from machinery.config_file import check_config, check_layer_count, read_generation_eos
from machinery.input_files import read_json_object
from machinery.safetensors_file import INDEX_FILE, load_safetensors_strict, read_weight_map

# ---------------------------------------------------------------------------------------------------------------------
# Config: read from the checkpoint's config.json, with a short list of supported model types.
# ---------------------------------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = {"llama": "Llama 2, Llama 3.x, SmolLM/SmolLM2", "mistral": "Mistral-7B", "qwen2": "Qwen2/2.5"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """The architecture, with the names of Hugging Face's config.json."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # fewer than num_attention_heads: grouped-query attention
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_llama3: dict | None = None  # the LLAMA3_ROPE_KEYS of a "llama3" rope scaling, None without scaling
    tie_word_embeddings: bool = False  # lm_head.weight is model.embed_tokens.weight
    qkv_bias: bool = False  # qwen2 always (not a config key); llama with attention_bias
    o_bias: bool = False  # llama with attention_bias
    mlp_bias: bool = False  # llama with mlp_bias
    sliding_window: int | None = None  # longer sequences are refused, not silently computed with full attention
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """Translate a config.json dict (`where` names its file in errors). check_config first refuses any field of
        the wrong type or range, or that disagrees with another (machinery/config_file.py). Reads the rope settings
        from transformers v5's `rope_parameters` as well as from the older `rope_theta` / `rope_scaling` keys;
        anything unsupported raises a ValueError saying what is."""
        check_config(hf, where)
        model_type = hf["model_type"]
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
            raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {supported}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; only 'silu' (the SwiGLU MLP)")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{where}: rope scaling type {rope_type!r} is not supported; supported: 'default' (no "
                             f"scaling) and 'llama3' (linear, dynamic, yarn and longrope are not implemented)")
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope] if rope_type == "llama3" else []
        if missing:
            raise ValueError(f"{where}: llama3 rope scaling lacks {missing}")
        attention_bias = model_type == "llama" and bool(hf.get("attention_bias", False))
        uses_window = model_type == "mistral" or (model_type == "qwen2" and hf.get("use_sliding_window", False))
        return cls(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_llama3={k: rope[k] for k in LLAMA3_ROPE_KEYS} if rope_type == "llama3" else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias, o_bias=attention_bias,
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            sliding_window=hf.get("sliding_window") if uses_window else None,
            eos_token_ids=token_ids(hf.get("eos_token_id")))


def token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """A config's eos_token_id, which is an int, a list of ints or absent, as a tuple."""
    return tuple(value) if isinstance(value, list) else () if value is None else (value,)


def load_config(folder) -> ModelConfig:
    """ModelConfig of a checkpoint folder; eos_token_ids also takes the ids of generation_config.json (often more)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass a Hugging Face model folder (config.json, model.safetensors)")
    config = ModelConfig.from_hf(read_json_object(path), str(path))
    generation = Path(folder) / "generation_config.json"
    if generation.exists():
        extra = token_ids(read_generation_eos(generation, config.vocab_size))
        config.eos_token_ids += tuple(i for i in extra if i not in config.eos_token_ids)
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Layers. Numerics follow Hugging Face's Llama: RMSNorm and the RoPE angles in fp32, then cast to the model's dtype.
# ---------------------------------------------------------------------------------------------------------------------

def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE frequencies f_i = theta^(-2i/d), i = 0 .. d/2-1 (d = head_dim), in fp32.

    llama3 scaling (Llama 3.1/3.2) rescales each frequency by its wavelength l = 2 pi / f. With L0 =
    original_max_position_embeddings, l_hi = L0 / high_freq_factor and l_lo = L0 / low_freq_factor:
        l < l_hi: f;   l > l_lo: f / factor;   otherwise (1 - t) f / factor + t f,  t = (L0/l - low) / (high - low).
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    if config.rope_llama3 is None:
        return inv_freq
    factor, low, high, l0 = (config.rope_llama3[k] for k in LLAMA3_ROPE_KEYS)
    wavelength = 2 * math.pi / inv_freq
    t = (l0 / wavelength - low) / (high - low)
    scaled = torch.where(wavelength > l0 / low, inv_freq / factor, (1 - t) * inv_freq / factor + t * inv_freq)
    return torch.where(wavelength < l0 / high, inv_freq, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(p f) and sin(p f) for positions p (B, T), each frequency twice ([f, f], the rotate-half layout):
    (B, T, head_dim) in fp32, whose angles lose precision at large p in bf16."""
    freqs = positions[..., None].float() * inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, rotate_half([x1, x2]) = [-x2, x1], for x (B, heads, T, head_dim). This is Hugging
    Face's layout, so q/k weights need no permutation; cos/sin are cast to x's dtype first, as there."""
    cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps): normalized in fp32, cast back to x's dtype, then scaled (HF Llama order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads: softmax(q k^T / sqrt(head_dim) + mask) v."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.head_dim, self.groups = head_dim, config.num_attention_heads // config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, hidden, bias=config.o_bias)

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
            k, v = k_cache, v_cache
        if self.groups > 1 and mask is not None:
            # mask is (B, 1, T, S), as attention_mask_4d builds it. Fold each group's query heads into rows of their
            # KV head, (B, H, T, d) -> (B, KV, G*T, d), so that k and v (the whole cache, when decoding) are read as
            # they are instead of copied G times; query head h = kv * G + g, as repeat_interleave pairs them.
            y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], self.groups * T, -1), k, v,
                                               attn_mask=mask.repeat(1, 1, self.groups, 1))
            y = y.unflatten(2, (self.groups, T)).permute(0, 3, 1, 2, 4)  # (B, T, KV, G, d), whatever SDPA's layout
        else:
            if self.groups > 1:  # SDPA's own enable_gqa would send masked attention to the math kernel
                k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values of every layer, k and v (layers, B, kv_heads, max_len, head_dim), and mask
    (B, max_len), True where a slot holds a real token. Zero-filled: unwritten slots are masked out, but garbage there
    (NaN) would still leak into the output, since SDPA multiplies it by a zero weight."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)


def attention_mask_4d(key_mask: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) bool, True where the query in slot query_pos[t] may attend to key slot s: s <= query_pos[t] and
    key_mask[b, s] (a real token). Every query may also attend to itself, so that the queries of pad tokens (whose
    outputs are discarded) are never fully masked: SDPA kernels may return NaN for such rows (pytorch/pytorch#110213),
    which later layers would spread."""
    slots = torch.arange(key_mask.shape[1], device=key_mask.device)
    causal = slots[None, :] <= query_pos[:, None]
    return ((causal[None] & key_mask[:, None, :]) | (slots[None, :] == query_pos[:, None]))[:, None]


class Transformer(nn.Module):
    """Llama-family decoder with Hugging Face module names: model.embed_tokens,
    model.layers.{i}.self_attn.{q,k,v,o}_proj, model.layers.{i}.mlp.{gate,up,down}_proj,
    model.layers.{i}.{input,post_attention}_layernorm, model.norm, lm_head.

    The buffer inv_freq (RoPE frequencies) stays fp32: choose the dtype with load_model(dtype=...) rather than
    .to(dtype), which would round it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, input_pos=None,
                last_only: bool = False):
        """Logits (B, T, vocab) in the model's dtype; (B, 1, vocab) with last_only, which is all generation needs
        (the full logits of a long prompt batch with a 128k vocabulary take gigabytes).

        attention_mask (B, T), True (or 1) on real tokens. Positions count real tokens only, p = cumsum(mask) - 1, so
        left- and right-padded rows give the logits of their unpadded selves. None means no padding and takes SDPA's
        causal fast path; right-padded batches may pass None too, as causal attention never looks ahead.
        With a KVCache the tokens fill cache slots input_pos (T,), the same for all rows (left padding), and attend to
        every real token cached up to their own slot.
        """
        B, T = input_ids.shape
        if cache is None and attention_mask is None:
            positions, mask, num_keys = torch.arange(T, device=input_ids.device).expand(B, T), None, T
        else:
            attention_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                              else attention_mask.bool())
            if cache is None:
                key_mask, input_pos = attention_mask, torch.arange(T, device=input_ids.device)
            else:
                cache.mask.index_copy_(1, input_pos, attention_mask)
                key_mask = cache.mask
            positions = (key_mask.cumsum(1) - 1).clamp(min=0)[:, input_pos]
            mask, num_keys = attention_mask_4d(key_mask, input_pos), key_mask.shape[1]
        window = self.config.sliding_window
        if window is not None and num_keys > window:
            raise ValueError(f"{num_keys} tokens (prompt + new tokens when generating) exceed the sliding window "
                             f"{window} of this model; sliding-window attention is not implemented, use shorter inputs")
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, None if cache is None else (cache.k[i], cache.v[i]), input_pos)
        x = self.model.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x)


def build_model(config: ModelConfig, device="meta", dtype: torch.dtype = torch.float32,
                prepare: Callable[[Transformer], object] | None = None) -> Transformer:
    """The model of `config` on `device` in `dtype`, its weights allocated but not initialized: load_model fills them
    from a checkpoint, the benchmark with random values. On "meta" (the default) it takes no memory at all: a skeleton
    for shapes and parameter counts of any size. The RoPE frequencies stay fp32 whatever `dtype` is. `prepare` may
    change the skeleton before anything is allocated (machinery/nf4.py swaps in its 4-bit layers there)."""
    with torch.device("meta"):
        model = Transformer(config)
        if prepare is not None:
            prepare(model)
    if torch.device(device).type == "meta":
        return model
    model = model.to(dtype).to_empty(device=device)  # no memory and no time spent on a random init
    if config.tie_word_embeddings:  # to_empty gives each module a new Parameter, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)  # non-persistent buffer: to_empty left it uninitialized
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Generation: batched greedy decoding with left padding and a preallocated KV cache (gpt-fast's prefill/decode shape).
# ---------------------------------------------------------------------------------------------------------------------

def prefill(model: Transformer, input_ids, attention_mask, cache: KVCache) -> torch.Tensor:
    """Run the left-padded prompts (B, T) into cache slots 0 .. T-1; return each row's greedy next token (B,)."""
    input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    return model(input_ids, attention_mask, cache, input_pos, last_only=True)[:, -1].argmax(-1)


def decode_at(model: Transformer, tokens, cache: KVCache, input_pos: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) into the cache slot input_pos (a tensor (1,), so that one compiled step serves
    every slot without recompiling); return each row's greedy next token (B,). The pad keys of the prompts stay masked
    at every step, through the cache's mask."""
    attention_mask = torch.ones_like(tokens[:, None], dtype=torch.bool)
    return model(tokens[:, None], attention_mask, cache, input_pos, last_only=True)[:, -1].argmax(-1)


_compiled_decode_at = None


def compiled_decode_at():
    """decode_at under torch.compile (gpt-fast's compiled decode step over the static KV cache), made at first use.
    The first call compiles (seconds to minutes); another batch size or cache length compiles once more, for any."""
    global _compiled_decode_at
    if _compiled_decode_at is None:
        _compiled_decode_at = torch.compile(decode_at, fullgraph=True)
    return _compiled_decode_at


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int,
                   stop: Callable[[list[int]], bool] | None = None, compile_decode: bool = False,
                   progress: tqdm | None = None) -> list[list[int]]:
    """Greedy continuation of one batch of prompts. A row ends at an EOS id (not included), after max_new_tokens,
    or when stop(its new tokens) is true; the others go on, and the batch ends when every row has.
    compile_decode runs each new token through compiled_decode_at (the prompt itself runs uncompiled). `progress`
    (a tqdm bar) advances after each token by the budget the rows spent: the tokens made, all of it for a row that
    ended."""
    weight = model.lm_head.weight
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, T - len(prompt):] = True
    # under torch.autocast (fp32 weights that train, computing in bf16) k and v come in autocast's dtype
    device_type = weight.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    cache = KVCache(model.config, B, T + max_new_tokens, dtype, weight.device)
    tokens = prefill(model, input_ids.to(weight.device), attention_mask.to(weight.device), cache)
    decode = compiled_decode_at() if compile_decode else decode_at
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    shown = 0  # the budget already counted on `progress`
    for step in range(max_new_tokens):
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in eos_ids:
                done[row] = True
                continue
            new[row].append(token)
            done[row] = len(new[row]) == max_new_tokens or (stop is not None and stop(new[row]))
        if progress is not None:
            spent = sum(max_new_tokens if ended else len(made) for ended, made in zip(done, new))
            progress.update(spent - shown)
            shown = spent
        if all(done):
            break
        tokens = decode(model, tokens, cache, torch.tensor([T + step], device=weight.device))
    return new


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids, pad_id: int,
             stop: Callable[[list[int]], bool] | None = None, batch_size: int = 16,
             compile_decode: bool = False, progress: bool = True) -> list[list[int]]:
    """Greedy continuations of token-id prompts: the new tokens of each prompt, in input order, EOS not included.

    Prompts are sorted by length (longest first, so running out of memory shows at once) into batches of batch_size,
    which cuts padding; per row, the output equals that of the prompt alone (exactly in fp32; in bf16 near-ties may
    flip). stop(new_tokens) is called per row after each token and ends that row when true.
    compile_decode=True runs the decode step under torch.compile, as gpt-fast does (off by default: the first call
    compiles, which takes seconds to minutes, for a gain on GPU, where fusing the small step's kernels cuts launch
    overhead). The output equals the uncompiled one in fp32.
    progress=True shows a bar on stderr over every row's token budget (len(prompts) x max_new_tokens, a row that
    ends early counting its whole budget), advanced after each new token, so even a single long batch shows how far it
    is; progress=False hides it.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty[:8]} are empty; every prompt needs at least one token (e.g. BOS)")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts) * max_new_tokens, desc="generate", unit="token", leave=False,
              disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            for i, new in zip(rows, generate_batch(model, [prompts[i] for i in rows], max_new_tokens, set(eos_ids),
                                                   pad_id, stop, compile_decode, bar)):
                outputs[i] = new
    return outputs


# ---------------------------------------------------------------------------------------------------------------------
# Weight loading: safetensors only (no pickle), strict, one tensor at a time.
# ---------------------------------------------------------------------------------------------------------------------

def checkpoint_files(folder) -> dict[Path, set[str] | None]:
    """The safetensors files of a folder: {model.safetensors: None} (any tensors), or each shard of the index with
    the tensor names the index puts in it (the same preference as transformers: single file first)."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.exists() or single.is_symlink():  # a FIFO or a symlink loop too: the reader refuses it, saying so
        return {single: None}
    if not (folder / INDEX_FILE).exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors or {INDEX_FILE} (pickled pytorch_model.bin files are "
                                f"not loaded; convert them to safetensors)")
    shards: dict[Path, set[str]] = {}
    for name, shard in read_weight_map(folder / INDEX_FILE).items():
        shards.setdefault(folder / shard, set()).add(name)
    for path in shards:
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(f"{path}: shard listed in {folder / INDEX_FILE} is missing")
    return shards


def _some(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_weights(model: Transformer, folder) -> None:
    """Copy a checkpoint into the model's parameters one tensor at a time (cast to the parameter's dtype and device),
    so peak memory stays near one model. Strict: every file tensor is used and every parameter filled, or the error
    names the keys. A tied model accepts a stored lm_head.weight only when it equals the embedding."""
    config, tensors, source = model.config, {}, {}
    for path, expected in checkpoint_files(folder).items():
        shard, _ = load_safetensors_strict(path)
        if expected is not None and set(shard) != expected:
            stray, absent = _some(set(shard) - expected), _some(expected - set(shard))
            raise ValueError(f"{path} does not match {INDEX_FILE}: tensors in the file but not mapped to it: "
                             f"[{stray}]; mapped to it but absent: [{absent}]")
        tensors.update(shard)
        source.update(dict.fromkeys(shard, path))
    params = dict(model.named_parameters())  # a tied lm_head.weight is listed once, as model.embed_tokens.weight
    unexpected, missing = set(tensors) - set(params), set(params) - set(tensors)
    if config.tie_word_embeddings:
        unexpected.discard("lm_head.weight")
    if missing or unexpected:
        hint = ""
        if "lm_head.weight" in missing:
            hint += " (config.json has tie_word_embeddings false, so lm_head.weight must be stored)"
        if any(k.endswith(".bias") for k in missing | unexpected):
            hint += " (biases follow the model_type: qwen2 has q/k/v biases, llama has attention_bias / mlp_bias)"
        raise ValueError(f"{folder}: checkpoint does not match its {config.model_type} config.json: missing tensors "
                         f"[{_some(missing)}]; unexpected tensors [{_some(unexpected)}]{hint}")
    if (config.tie_word_embeddings and "lm_head.weight" in tensors
            and not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])):
        raise ValueError(f"{source['lm_head.weight']}: config.json ties lm_head to the embedding, but the stored "
                         f"'lm_head.weight' differs from 'model.embed_tokens.weight'; fix tie_word_embeddings")
    with torch.no_grad():
        for name, param in params.items():
            t = tensors[name]
            if t.shape != param.shape:
                raise ValueError(f"{source[name]}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(param.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"{source[name]}: tensor {name!r} has dtype {t.dtype}; weights must be floating point")
            param.copy_(t)


def check_checkpoint(folder, config: ModelConfig) -> None:
    """Refuse a checkpoint that does not fit `config` before any memory is spent on it: the layer count, from the
    safetensors headers (a skeleton of a million layers would take an hour to build, even on "meta"), then every
    check of load_weights on a skeleton on "meta", where copying is a no-op and no tensor data is read (but a stored
    tied lm_head, compared with the embedding)."""
    check_layer_count(checkpoint_files(folder), config.num_hidden_layers, Path(folder) / "config.json")
    load_weights(build_model(config), folder)


def load_model(folder, device="cpu", dtype: torch.dtype | None = None, checked: bool = False) -> Transformer:
    """The model of a Hugging Face folder (config.json + safetensors), in eval mode, once check_checkpoint found that
    the weights fit config.json (checked=True: the caller has run it already). dtype defaults to bf16 on CUDA and fp32
    elsewhere."""
    config = load_config(folder)
    if not checked:
        check_checkpoint(folder, config)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(config, device, dtype)
    load_weights(model, folder)
    return model.eval()
