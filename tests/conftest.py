"""Shared fixtures: a tiny Llama checkpoint folder with a byte-level tokenizer, a tiny GSM8K-format data folder and a
tiny MATH test file, all written by the tests themselves (no download, no reference library)."""

import errno
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import lorasb

REPO = Path(__file__).resolve().parent.parent

# The real SmolLM2-135M checkpoint folder and the GSM8K data folder, when the environment names them (.ci/run does);
# the tests that need them skip otherwise.
SMOLLM2_DIR = Path(os.environ["LORASB_SMOLLM2_DIR"]) if os.environ.get("LORASB_SMOLLM2_DIR") else None
GSM8K_DIR = Path(os.environ["LORASB_GSM8K_DIR"]) if os.environ.get("LORASB_GSM8K_DIR") else None


def has_file(folder: Path | None, name: str) -> bool:
    return folder is not None and (folder / name).is_file()


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the body once it has run `seconds`, so that a regression that blocks (opening a FIFO) or
    builds a model for an hour fails its test instead of hanging the suite. Needs SIGALRM (POSIX); elsewhere the body
    runs unguarded."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


needs_gsm8k = pytest.mark.skipif(not has_file(GSM8K_DIR, "test.jsonl"), reason="set LORASB_GSM8K_DIR to GSM8K's folder")
needs_smollm2 = pytest.mark.skipif(not has_file(SMOLLM2_DIR, "model.safetensors"),
                                   reason="set LORASB_SMOLLM2_DIR to the SmolLM2-135M-Instruct folder")

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 264, "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024, "hidden_act": "silu",
               "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": 256, "torch_dtype": "float32"}


def full_disk_during(monkeypatch, owner, name: str) -> None:
    """Make owner.<name> run on a full disk: while it runs, every os.fdopen (how atomic_write opens its temporary file)
    raises ENOSPC. monkeypatch.undo() (or the test's end) restores both."""
    real = getattr(owner, name)

    def no_space(fd, mode):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    def on_a_full_disk(*args):
        monkeypatch.setattr(os, "fdopen", no_space)
        return real(*args)

    monkeypatch.setattr(owner, name, on_a_full_disk)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json with the 256 byte tokens, a few merges and one special token (EOS, id 256)."""
    table = bytes_to_unicode()
    vocab = {**{table[b]: b for b in range(256)}, "<|endoftext|>": 256}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None}))


def write_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors of a 2-layer random Llama (hidden 32) + the byte-level tokenizer."""
    import model as model_lib

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    skeleton = model_lib.build_model(model_lib.ModelConfig.from_hf(TINY_CONFIG), device="meta")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in skeleton.named_parameters():
        is_norm = name.endswith("norm.weight")
        tensors[name] = torch.ones(p.shape) if is_norm else torch.randn(p.shape, generator=g) * 0.1
    lorasb.save_safetensors(folder / "model.safetensors", tensors)
    write_byte_tokenizer(folder)
    return folder


def write_tiny_gsm8k(folder: Path, num_train: int = 48, num_test: int = 6) -> Path:
    """GSM8K-format train.jsonl / test.jsonl with short arithmetic problems (calculator annotations included)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", num_train, 0), ("test", num_test, 1000)):
        rows = []
        for i in range(offset, offset + n):
            a, b = i % 7 + 1, i % 5 + 2
            rows.append({"question": f"Tom has {a} apples and gets {b} more. How many?",
                         "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# (instruction, output, type, level) of a MetaMath-format MATH test file; the answers are the last \boxed{...}
TINY_MATH = [
    ("What is $1/2$ as a fraction?", "Half is $\\frac{1}{\\boxed{2}}$, so it is $\\boxed{\\frac{1}{2}}$.", "Algebra",
     "Level 1"),
    ("What is $2+3$?", "$2+3=\\boxed{5}$.", "Prealgebra", "Level 1"),
    ("Write $x$ over 3.", "It is $\\boxed{\\frac{x}{3}}$.", "Algebra", "Level 2"),
    ("Compute $\\sqrt{9}$.", "$\\sqrt{9} = \\boxed{3}$", "Prealgebra", "Level 2"),
]


def write_tiny_math(path: Path) -> Path:
    """MATH_test.jsonl in MetaMath's format (idx, instruction, output, input, type) plus a level, one line each."""
    rows = [{"idx": f"hendrycks_math_{i + 1}", "instruction": q, "output": s, "input": "", "type": t, "level": lv}
            for i, (q, s, t, lv) in enumerate(TINY_MATH)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gsm8k_dir(tmp_path_factory) -> Path:
    return write_tiny_gsm8k(tmp_path_factory.mktemp("tiny-gsm8k"))


@pytest.fixture(scope="session")
def tiny_math_file(tmp_path_factory) -> Path:
    return write_tiny_math(tmp_path_factory.mktemp("tiny-math") / "MATH_test.jsonl")
