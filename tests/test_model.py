"""Tests of model.py: logits, RoPE tables and greedy generation equal to transformers on tiny random checkpoints (and
on SmolLM2-135M when it is present), padding, strict and hostile-file-safe loading, and configs."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import model as M
from machinery import safetensors_file
from conftest import SMOLLM2_DIR as SMOLLM2, deadline, has_file
from lorasb import load_safetensors, save_safetensors

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
VARIANTS = {  # name: (transformers config class, extra kwargs)
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama_untied_biases": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
}
PROMPTS = [[1, 5, 7, 9, 11], [1, 100, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 42], [1, 64, 65, 66, 67, 68, 69]]
MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
              "tie_word_embeddings": False, "rope_theta": 10000.0, "sliding_window": 4096, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 32768}


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: tiny random checkpoints, written by transformers' save_pretrained for parity tests and by our own code for
# the rest (which then run without transformers)
# ---------------------------------------------------------------------------------------------------------------------

def random_weights_(named_tensors) -> None:
    """Every weight random, norms around 1 (HF would initialize biases to 0 and norms to 1, which hides mistakes)."""
    with torch.no_grad():
        for key, p in named_tensors:
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in key else 0.0))


def write_checkpoint(folder: Path, **changes) -> Path:
    """A tiny random llama checkpoint (config.json, model.safetensors) written with model.py and lorasb.py alone."""
    config = {**TINY, "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, **changes}
    torch.manual_seed(0)
    tensors = M.build_model(M.ModelConfig.from_hf(config), device="cpu").state_dict()
    if config["tie_word_embeddings"]:
        del tensors["lm_head.weight"]  # as transformers saves a tied model
    random_weights_(tensors.items())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_safetensors(folder / "model.safetensors", tensors)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untied llama checkpoint with attention and MLP biases, and our model of it (fp32 CPU)."""
    folder = write_checkpoint(tmp_path_factory.mktemp("tiny"), attention_bias=True, mlp_bias=True)
    return folder, M.load_model(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (folder, transformers model)} written by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, (config_class, extra) in VARIANTS.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**TINY, **extra)).eval()
        random_weights_(hf.named_parameters())
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder, safe_serialization=True)
        out[name] = (folder, hf)
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(folder: Path, edit) -> None:
    """Load model.safetensors, let edit(dict) change it in place, write it back (tensors cloned off the memory map)."""
    tensors, _ = load_safetensors(folder / "model.safetensors")
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors)
    save_safetensors(folder / "model.safetensors", tensors)


def write_shards(folder: Path, tensors: dict, num_shards: int = 2) -> dict:
    """Split tensors into shards plus model.safetensors.index.json, as transformers does; returns the weight map."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_safetensors(folder / shard, {k: tensors[k] for k in part})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / safetensors_file.INDEX_FILE).write_text(json.dumps(index))
    return weight_map


# ---------------------------------------------------------------------------------------------------------------------
# numerics against transformers
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(checkpoints, variant):
    folder, hf = checkpoints[variant]
    ours = M.load_model(folder)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got, got_masked = ours(ids), ours(ids, torch.ones_like(ids, dtype=torch.bool))
    assert (got - expected).abs().max() <= 1e-4
    assert (got_masked - expected).abs().max() <= 1e-4  # the explicit-mask path equals the causal fast path
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == VARIANTS[variant][1]["tie_word_embeddings"]
    assert {k for k, _ in ours.named_parameters()} == {k for k, _ in hf.named_parameters()}  # HF module names
    transformers = pytest.importorskip("transformers")
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        diff = (M.load_model(folder, dtype=torch.bfloat16)(ids).float() - hf_bf16(ids).logits.float()).abs().max()
    assert diff <= 1e-2 * expected.abs().max()  # HF's order of casts (RMSNorm, RoPE); another order is ~10% off


def test_compiles_as_whole_graphs(tiny):
    """model.compile() (the documented speed-up on GPU) traces prefill and decode without graph breaks, gives the same
    tokens and keeps the module names."""
    model = M.load_model(tiny[0])
    expected = M.generate(model, PROMPTS[:3], 8, eos_ids=[], pad_id=0)
    model.compile(backend="eager", fullgraph=True)
    try:
        assert M.generate(model, PROMPTS[:3], 8, eos_ids=[], pad_id=0) == expected
        assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    finally:
        torch._dynamo.reset()


def test_compiled_decode_gives_the_same_tokens(tiny, monkeypatch):
    """generate(compile_decode=True) traces the decode step over the static KV cache as one graph (its in-place cache
    writes included) and returns the uncompiled tokens. aot_eager keeps the test fast: inductor, the default, takes
    minutes to compile on a CPU."""
    model = M.load_model(tiny[0])
    expected = M.generate(model, PROMPTS[:3], 8, eos_ids=[], pad_id=0)
    monkeypatch.setattr(M, "_compiled_decode_at", torch.compile(M.decode_at, backend="aot_eager", fullgraph=True))
    try:
        assert M.generate(model, PROMPTS[:3], 8, eos_ids=[], pad_id=0, compile_decode=True) == expected
    finally:
        torch._dynamo.reset()


def test_rope_tables_match_transformers():
    """cos/sin at every position up to the maximum, including llama3 scaling (all three frequency regimes)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cases = [  # (transformers config kwargs, max positions)
        (dict(TINY, rope_parameters=LLAMA3_ROPE), 512),
        (dict(TINY, hidden_size=4096, num_attention_heads=32, rope_parameters=dict(  # Llama 3.1 8B: 128k positions
            LLAMA3_ROPE, original_max_position_embeddings=8192), max_position_embeddings=131072), 131072),
        (dict(TINY, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5), 8192),  # SmolLM2
    ]
    for kwargs, max_pos in cases:
        hf_config = transformers.LlamaConfig(**kwargs)
        ours = M.ModelConfig.from_hf(hf_config.to_dict())
        positions = torch.arange(max_pos)[None]
        hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
        cos, sin = M.rope_cos_sin(M.rope_inv_freq(ours), positions)
        torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)
    plain = M.rope_inv_freq(M.ModelConfig.from_hf(dict(transformers.LlamaConfig(**TINY).to_dict(), rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0})))
    scaled = M.rope_inv_freq(M.ModelConfig.from_hf(transformers.LlamaConfig(**cases[0][0]).to_dict()))
    ratio = plain / scaled
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


def test_padded_batch_equals_unpadded(tiny):
    _, model = tiny
    rows = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    T = max(map(len, rows))
    with torch.no_grad():
        alone = [model(torch.tensor([r]))[0] for r in rows]
        for side in ("right", "left"):
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.bool)
            for i, r in enumerate(rows):
                span = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
                ids[i, span], mask[i, span] = torch.tensor(r), True
            logits = model(ids, mask)
            assert torch.isfinite(logits).all()  # pad queries attend to themselves: no NaN
            for i, r in enumerate(rows):
                span = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
                torch.testing.assert_close(logits[i, span], alone[i], rtol=1e-5, atol=1e-5)


def test_attention_does_not_depend_on_the_memory_layout_sdpa_returns(tiny, monkeypatch):
    """CUDA's memory-efficient kernel returns its output as a transposed (B, T, H, d) buffer, not a contiguous
    (B, H, T, d) one: the grouped-query paths (folded with a mask, repeated without) must read it either way."""
    _, model = tiny
    assert model.model.layers[0].self_attn.groups > 1
    ids = torch.tensor([PROMPTS[0], PROMPTS[2][:len(PROMPTS[0])]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expected = [model(ids, mask), model(ids), M.generate(model, PROMPTS, 8, eos_ids=[], pad_id=0, batch_size=2)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), expected[0], rtol=0, atol=0)
        torch.testing.assert_close(model(ids), expected[1], rtol=0, atol=0)
        assert M.generate(model, PROMPTS, 8, eos_ids=[], pad_id=0, batch_size=2) == expected[2]


@pytest.mark.parametrize("variant", ["llama_tied", "llama3_rope", "mistral", "qwen2"])
def test_greedy_generation_matches_transformers(checkpoints, variant):
    folder, hf = checkpoints[variant]
    ours = M.load_model(folder)
    n = 20
    one_at_a_time = M.generate(ours, PROMPTS, n, eos_ids=[], pad_id=0, batch_size=1)
    for prompt, new in list(zip(PROMPTS, one_at_a_time))[:3]:
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert new == expected and len(new) == n
    for batch_size in (2, 5):  # left padding, sorted into batches, order restored
        assert M.generate(ours, PROMPTS, n, eos_ids=[], pad_id=0, batch_size=batch_size) == one_at_a_time


def test_generation_stops_per_row(tiny):
    _, model = tiny
    full = M.generate(model, PROMPTS, 20, eos_ids=[], pad_id=0)
    assert all(len(new) == 20 for new in full)
    assert [len(x) for x in M.generate(model, PROMPTS, 7, eos_ids=[], pad_id=0)] == [7] * len(PROMPTS)
    eos = full[0][5]  # an EOS id row 0 meets at step 5 at the latest; each row stops at its first occurrence, if any
    expected = [new[:new.index(eos)] if eos in new else new for new in full]
    assert M.generate(model, PROMPTS, 20, eos_ids={eos, 10_000}, pad_id=0) == expected
    assert len(expected[0]) <= 5 and any(len(new) == 20 for new in expected)  # the other rows go on
    stop_token = full[1][3]  # stop(new_tokens) sees each row's tokens so far; the token that triggers it is kept
    expected = [new[:new.index(stop_token) + 1] if stop_token in new else new for new in full]
    got = M.generate(model, PROMPTS, 20, eos_ids=[], pad_id=0, stop=lambda new: new[-1] == stop_token)
    assert got == expected and got[1][-1] == stop_token and len(got[1]) <= 4
    with pytest.raises(ValueError, match="empty"):
        M.generate(model, [[1, 2], []], 5, eos_ids=[], pad_id=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.generate(model, PROMPTS, 0, eos_ids=[], pad_id=0)


def test_generation_shows_progress_within_a_single_batch(tiny, capsys):
    """One batch of every prompt still shows a bar (a long batch is minutes on a CPU), advanced after each new token
    by the budget spent: the tokens made, and the whole budget of a row that ended; progress=False shows nothing."""
    _, model = tiny
    full = M.generate(model, PROMPTS, 12, eos_ids=[], pad_id=0, batch_size=len(PROMPTS))
    assert re.search(r"generate:\s+0%.*\| 0/60 ", capsys.readouterr().err)  # 5 prompts x 12 tokens, one batch
    eos = full[0][3]  # row 0 ends at step 3 at the latest; from then on its whole budget counts as spent

    def spent(step: int) -> int:  # the budget spent once `step` (0-based) has run
        return sum(12 if eos in new[:step + 1] or step == 11 else step + 1 for new in full)

    steps = next(step for step in range(12) if spent(step) == 60) + 1  # the batch ends when every row has
    for eos_ids, expected in (([], [5] * 12), ([eos], [spent(0)] + [spent(k) - spent(k - 1) for k in range(1, steps)])):
        counts = []
        bar = type("Bar", (), {"update": lambda self, n: counts.append(n)})()
        M.generate_batch(model, PROMPTS, 12, set(eos_ids), 0, progress=bar)
        assert counts == expected and sum(counts) == 60
    M.generate(model, PROMPTS, 12, eos_ids=[], pad_id=0, batch_size=len(PROMPTS), progress=False)
    assert capsys.readouterr().err == ""


def test_sliding_window_is_refused_not_ignored(tmp_path):
    model = M.load_model(write_checkpoint(tmp_path / "m", model_type="mistral", sliding_window=8))
    assert model(torch.ones(1, 8, dtype=torch.long)).shape == (1, 8, TINY["vocab_size"])
    with pytest.raises(ValueError, match="sliding window 8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding window 8"):
        M.generate(model, [[1, 2, 3, 4]], 5, eos_ids=[], pad_id=0)


# ---------------------------------------------------------------------------------------------------------------------
# loading: sharded, strict, hostile files
# ---------------------------------------------------------------------------------------------------------------------

def test_sharded_equals_single_file(tiny, tmp_path):
    folder, single = tiny
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(folder / "config.json", sharded)
    tensors, _ = load_safetensors(folder / "model.safetensors")
    write_shards(sharded, tensors, num_shards=3)
    model = M.load_model(sharded)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(model(ids), single(ids))
    assert len(M.checkpoint_files(sharded)) == 3


def test_tied_checkpoint_may_store_an_equal_lm_head(tmp_path):
    folder = write_checkpoint(tmp_path / "t", tie_word_embeddings=True)
    rewrite_tensors(folder, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = M.load_model(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rewrite_tensors(folder, lambda t: t["lm_head.weight"].mul_(2))
    with pytest.raises(ValueError, match="lm_head.weight.*differs"):
        M.load_model(folder)


def _drop(key):
    return lambda t: t.pop(key)


def _add(key):
    return lambda t: t.__setitem__(key, torch.zeros(3))


def _reshape(key):
    return lambda t: t.__setitem__(key, t[key][:-1].clone())


def _to_int(key):
    return lambda t: t.__setitem__(key, t[key].to(torch.int32))


@pytest.mark.parametrize("config, edit, error", [
    ({}, _drop("model.layers.1.mlp.up_proj.weight"), "missing tensors.*layers.1.mlp.up_proj.weight"),
    ({}, _add("model.layers.0.extra.weight"), "unexpected tensors.*model.layers.0.extra.weight"),
    ({}, _reshape("model.layers.0.self_attn.k_proj.weight"), "'model.layers.0.self_attn.k_proj.weight' has shape"),
    ({}, _to_int("model.norm.weight"), "'model.norm.weight' has dtype torch.int32"),
    ({}, _drop("lm_head.weight"), "lm_head.weight.*tie_word_embeddings false"),
    ({"model_type": "qwen2"}, _drop("model.layers.0.self_attn.q_proj.bias"), "q_proj.bias.*qwen2 has q/k/v biases"),
    ({"attention_bias": True}, _drop("model.layers.1.self_attn.o_proj.bias"), "missing tensors.*o_proj.bias"),
    ({"tie_word_embeddings": True}, _add("model.layers.0.self_attn.o_proj.bias"), "unexpected tensors.*o_proj.bias"),
])
def test_checkpoint_mismatch_names_the_key(tmp_path, config, edit, error):
    folder = write_checkpoint(tmp_path / "c", **config)
    rewrite_tensors(folder, edit)
    with pytest.raises(ValueError, match=error):
        M.load_model(folder)


def test_bad_index_is_refused(tiny, tmp_path):
    folder, _ = tiny
    tensors, _ = load_safetensors(folder / "model.safetensors")
    shard_dir = tmp_path / "s"
    shard_dir.mkdir()
    shutil.copy(folder / "config.json", shard_dir)
    weight_map = write_shards(shard_dir, tensors)
    index = shard_dir / safetensors_file.INDEX_FILE

    def load_with(mapping):
        index.write_text(json.dumps({"weight_map": mapping}))
        M.load_model(shard_dir)

    name = "model.norm.weight"
    for evil in ("../model-00001-of-00002.safetensors", "/etc/passwd", ".."):
        with pytest.raises(ValueError, match="plain file names"):
            load_with(dict(weight_map, **{name: evil}))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_with(dict(weight_map, **{name: "missing.safetensors"}))
    other = next(s for s in set(weight_map.values()) if s != weight_map[name])
    with pytest.raises(ValueError, match=f"does not match.*{name}"):
        load_with(dict(weight_map, **{name: other}))  # the tensor sits in the other shard
    with pytest.raises(ValueError, match="index.json: a JSON list, where a JSON object"):
        index.write_text("[1, 2]")
        M.load_model(shard_dir)
    with pytest.raises(ValueError, match="'weight_map' must map tensor names"):
        index.write_text('{"weight_map": [1, 2]}')
        M.load_model(shard_dir)
    index.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load_model(shard_dir)


@pytest.mark.parametrize("corrupt, error", [
    ("truncated", "the tensors cover \\d+ bytes but the data section has \\d+"),
    ("huge_header", "header length 4611686018427387904 does not fit"),
    ("offset_past_end", "starts at byte \\d+, expected \\d+ \\(overlap or hole\\)"),
    ("overlap", "overlap or hole"),
    ("bad_dtype", "'model.norm.weight' has dtype 'F12'"),
    ("duplicate_name", "duplicate names in header: \\['model.norm.weight'\\]"),
])
def test_hostile_safetensors_file_is_refused(tiny, tmp_path, corrupt, error):
    """A few reader cases through load_model (the reader itself is tested in test_safetensors_file.py); errors
    name the file."""
    folder = copy_checkpoint(tiny[0], tmp_path / "h")
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    name = "model.norm.weight"
    if corrupt == "truncated":
        raw = raw[:-100]
    elif corrupt == "huge_header":
        raw = (2 ** 62).to_bytes(8, "little") + raw[8:]
    else:
        info = json.loads(raw[8:8 + n])
        if corrupt == "offset_past_end":
            info[name]["data_offsets"] = [o + 10 ** 9 for o in info[name]["data_offsets"]]
        elif corrupt == "overlap":  # same size, so only the overlap is wrong
            info[name]["data_offsets"] = info["model.layers.0.input_layernorm.weight"]["data_offsets"]
        elif corrupt == "bad_dtype":
            info[name]["dtype"] = "F12"  # F8_E4M3 is valid (and loads)
        text = json.dumps(info)
        if corrupt == "duplicate_name":
            text = text[:-1] + f', "{name}": ' + json.dumps(info[name]) + "}"
        raw = len(text).to_bytes(8, "little") + text.encode() + raw[8 + n:]  # data offsets count from the header's end
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{error}"):
        M.load_model(folder)


# ---------------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------------

def test_mistral_7b_parameter_count_on_meta_device():
    model = M.build_model(M.ModelConfig.from_hf(MISTRAL_7B))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 7_241_732_096


def test_config_reads_both_rope_layouts():
    base = {k: v for k, v in MISTRAL_7B.items() if k not in ("rope_theta", "sliding_window")}
    base["model_type"] = "llama"
    old = dict(base, rope_theta=500000.0, rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    old["rope_scaling"]["type"] = old["rope_scaling"].pop("rope_type")  # the oldest spelling
    new = dict(base, rope_parameters=LLAMA3_ROPE)
    assert M.ModelConfig.from_hf(old) == M.ModelConfig.from_hf(new)
    assert M.ModelConfig.from_hf(new).rope_llama3["factor"] == 8.0 and M.ModelConfig.from_hf(new).rope_theta == 5e5
    plain = M.ModelConfig.from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain.rope_llama3 is None and plain.rope_theta == 1e6
    qwen = dict(base, model_type="qwen2", sliding_window=4096)
    assert M.ModelConfig.from_hf(qwen).sliding_window is None  # only with use_sliding_window
    assert M.ModelConfig.from_hf(dict(qwen, use_sliding_window=True)).sliding_window == 4096
    assert M.ModelConfig.from_hf(qwen).qkv_bias and not M.ModelConfig.from_hf(qwen).o_bias
    assert M.ModelConfig.from_hf(dict(base, head_dim=128, hidden_size=5120)).head_dim == 128  # Mistral-Nemo style


def test_eos_ids_from_config_and_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(MISTRAL_7B, eos_token_id=[2, 7])))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert M.load_config(tmp_path).eos_token_ids == (2, 7, 9)


@pytest.mark.parametrize("change, error", [
    (dict(model_type="gemma2"), "model_type 'gemma2' is not supported; supported: llama"),
    (dict(hidden_act="gelu_pytorch_tanh"), "only 'silu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported; supported: 'default'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "'linear' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "lacks.*low_freq_factor"),
    (dict(num_key_value_heads=5), "not a multiple"),
    (dict(vocab_size=None), "lacks \\['vocab_size'\\]"),
])
def test_unsupported_config_is_refused(change, error):
    with pytest.raises(ValueError, match=error):
        M.ModelConfig.from_hf(dict(MISTRAL_7B, **change))


def write_config(folder: Path, **changes) -> Path:
    """folder/config.json: the tiny checkpoint's config (write_checkpoint's), with `changes`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**TINY, "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


@pytest.mark.parametrize("change, error", [
    (dict(head_dim=0), "'head_dim' is 0, but it must be an integer >= 1 \\(or null\\)"),
    (dict(tie_word_embeddings="false"), "'tie_word_embeddings' is \"false\", but it must be true or false"),
    (dict(rope_theta=0), "'rope_theta' is 0, but it must be a finite number > 0"),
    (dict(rope_theta=-1), "'rope_theta' is -1, but"),
    (dict(rope_theta="abc"), "'rope_theta' is \"abc\", but"),
    (dict(rms_norm_eps=-1), "'rms_norm_eps' is -1, but it must be a finite number > 0"),
    (dict(rope_parameters=dict(LLAMA3_ROPE, factor=0)), "'rope_parameters.factor' is 0, but"),
    (dict(rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=0.5)),
     "'rope_scaling.original_max_position_embeddings' is 0.5, but it must be an integer >= 1"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(vocab_size=True), "'vocab_size' is true, but it must be an integer >= 1"),
    (dict(hidden_size="64"), "'hidden_size' is \"64\", but it must be an integer >= 1"),
    (dict(num_hidden_layers=2.0), "'num_hidden_layers' is 2.0, but it must be an integer >= 1"),
    (dict(head_dim=7), "the head size 7 .* is odd"),
    (dict(model_type="mistral", sliding_window=0), "'sliding_window' is 0, but"),
    (dict(eos_token_id=[2, 128]), "'eos_token_id' is \\[2, 128\\], but token ids must be below vocab_size 128"),
    (dict(rms_norm_eps=None), "lacks \\['rms_norm_eps'\\]"),
])
def test_config_fields_of_the_wrong_type_or_range_are_refused_naming_file_field_and_value(tmp_path, change, error):
    """Before this check, head_dim 0 and tie_word_embeddings "false" trained to the end, and rope_theta 0 or a negative
    rms_norm_eps failed only as NaN gradients. The folder holds no weights: the refusal comes before any is read."""
    path = write_config(tmp_path, **change)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{error}"):
        M.load_model(tmp_path)


@pytest.mark.parametrize("text, error", [
    ("{not json", "not valid JSON \\(Expecting property name"),
    ("[1, 2]", "a JSON list, where a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"model_type": "llama", "vocab_size": "1" ', "not valid JSON"),
], ids=["not JSON", "a list", "nested 100k deep", "cut short"])
def test_a_malformed_config_json_is_one_value_error_naming_the_file(tmp_path, text, error):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'config.json'))}: {error}"):
        M.load_config(tmp_path)


@pytest.mark.parametrize("generation, error", [
    ('{"eos_token_id": "2"}', "'eos_token_id' is \"2\", but it must be a token id"),
    ('{"eos_token_id": [2, 128]}', "'eos_token_id' is \\[2, 128\\], but token ids must be below vocab_size 128"),
    ("[2]", "a JSON list, where a JSON object"),
])
def test_a_bad_generation_config_is_refused_naming_it(tmp_path, generation, error):
    write_config(tmp_path)
    (tmp_path / "generation_config.json").write_text(generation)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'generation_config.json'))}: {error}"):
        M.load_config(tmp_path)


@pytest.mark.parametrize("stored, configured", [(2, 1_000_000), (3, 2)])
def test_a_layer_count_the_checkpoint_lacks_is_refused_before_any_model_is_built(tmp_path, stored, configured):
    """A skeleton of a million layers takes an hour to build, even on "meta": the headers are compared first."""
    folder = write_checkpoint(tmp_path / "m", num_hidden_layers=stored)
    write_config(folder, num_hidden_layers=configured)
    start = time.perf_counter()
    with deadline(20), pytest.raises(ValueError, match=f"{re.escape(str(folder / 'config.json'))}: 'num_hidden_layers' "
                                                       f"is {configured}, but the checkpoint holds {stored} layers"):
        M.load_model(folder)
    assert time.perf_counter() - start < 2


def test_weights_that_do_not_fit_the_config_are_refused_before_the_model_is_allocated(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "m")
    write_config(folder, intermediate_size=256)
    devices, build = [], M.build_model
    monkeypatch.setattr(M, "build_model", lambda config, device="meta", dtype=torch.float32: devices.append(
        torch.device(device).type) or build(config, device, dtype))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.gate_proj.weight' has shape \\(128, 64\\), config.json "
                                         "implies \\(256, 64\\)"):
        M.load_model(folder)
    assert devices == ["meta"]


def test_load_model_checks_the_checkpoint_once_and_not_when_told_it_was_checked(tmp_path, monkeypatch):
    """The trainer checks the checkpoint before it prepares --out_dir, then loads with checked=True: once per load."""
    folder = write_checkpoint(tmp_path / "m")
    calls, check = [], M.check_checkpoint
    monkeypatch.setattr(M, "check_checkpoint", lambda *args: calls.append(1) or check(*args))
    M.load_model(folder)
    assert calls == [1]
    M.load_model(folder, checked=True)
    assert calls == [1]


@pytest.mark.parametrize("links", [{"model.safetensors": "model.safetensors"},
                                   {"model.safetensors": "other.safetensors", "other.safetensors": "model.safetensors"},
                                   {"model-00001-of-00002.safetensors": "model-00001-of-00002.safetensors"}])
def test_a_safetensors_symlink_loop_is_refused_naming_the_file(tiny, tmp_path, links):
    """A symlink to itself, two pointing at each other, or a looping shard: one ValueError naming the file, not an
    OSError (Errno 40) traceback nor "no model.safetensors"."""
    folder = copy_checkpoint(tiny[0], tmp_path / "loop")
    if "model.safetensors" not in links:  # a sharded checkpoint whose first shard loops
        write_shards(folder, load_safetensors(folder / "model.safetensors")[0])
    (folder / "model.safetensors").unlink()
    for name, target in links.items():
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(target)
    looping = folder / next(iter(links))
    with deadline(20), pytest.raises(ValueError, match=f"{re.escape(str(looping))}: a symlink that loops"):
        M.load_model(folder)


def test_missing_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(MISTRAL_7B, num_hidden_layers=1, vocab_size=8,
                                                          hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                                          num_key_value_heads=1)))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct checkpoint, when present
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    if not has_file(SMOLLM2, "model.safetensors"):
        pytest.skip("set LORASB_SMOLLM2_DIR to the SmolLM2-135M-Instruct folder")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    tokenizer = tokenizers.Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    prompts = [tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids for q in
               ("What is 12 + 7?", "Write a haiku about the sea.")]
    return M.load_model(SMOLLM2), hf, prompts


def test_smollm2_logits_match_transformers(smollm2):
    ours, hf, prompts = smollm2
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        got, expected = ours(ids), hf(ids).logits
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    transformers = pytest.importorskip("transformers")
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        diff = (M.load_model(SMOLLM2, dtype=torch.bfloat16)(ids).float() - hf_bf16(ids).logits.float()).abs().max()
    assert diff <= 1e-2 * expected.abs().max()


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    ours, hf, prompts = smollm2
    n = 20
    got = M.generate(ours, prompts, n, eos_ids=[], pad_id=2, batch_size=2)  # batched, left-padded
    for prompt, new in zip(prompts, got):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
        assert new == expected
