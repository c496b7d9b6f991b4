"""A checkpoint's config.json is untrusted input: every field model.ModelConfig.from_hf reads is checked here against a
rule (its type and range) and against the others (head counts, token ids), so that a config that makes no sense is
one ValueError naming the file, the field and the value, instead of a model that loads and fails much later (a
rope_theta of 0 or a negative rms_norm_eps: NaN losses) or never ("false" is a true string, and a head_dim of 0 fell
back to another value). generation_config.json's eos_token_id gets the same rule; check_layer_count compares the
config with the checkpoint's headers before a model of the wrong size is built.
"""

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from machinery.input_files import read_json_object, shown
from machinery.safetensors_file import check_safetensors

Rule = tuple[str, Callable[[Any], bool]]  # (what the value must be, in words; the test)
POSITIVE_INT: Rule = ("an integer >= 1", lambda v: type(v) is int and v >= 1)  # bool is an int subclass: excluded
POSITIVE_NUMBER: Rule = ("a finite number > 0",
                         lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0)
BOOLEAN: Rule = ("true or false", lambda v: type(v) is bool)
STRING: Rule = ("a string", lambda v: type(v) is str)
OBJECT: Rule = ("a JSON object", lambda v: type(v) is dict)
TOKEN_IDS: Rule = ("a token id or a list of token ids (integers >= 0)",
                   lambda v: all(type(i) is int and i >= 0 for i in (v if type(v) is list else [v])))

# field: (rule, may be null). An absent field takes from_hf's default, unless it is in REQUIRED; null is that default
# where from_hf reads it so.
CONFIG_FIELDS: dict[str, tuple[Rule, bool]] = {
    "model_type": (STRING, False),
    "vocab_size": (POSITIVE_INT, False),
    "hidden_size": (POSITIVE_INT, False),
    "intermediate_size": (POSITIVE_INT, False),
    "num_hidden_layers": (POSITIVE_INT, False),
    "num_attention_heads": (POSITIVE_INT, False),
    "num_key_value_heads": (POSITIVE_INT, True),
    "head_dim": (POSITIVE_INT, True),
    "rms_norm_eps": (POSITIVE_NUMBER, False),
    "hidden_act": (STRING, False),
    "rope_theta": (POSITIVE_NUMBER, False),
    "rope_scaling": (OBJECT, True),
    "rope_parameters": (OBJECT, True),
    "tie_word_embeddings": (BOOLEAN, False),
    "attention_bias": (BOOLEAN, False),
    "mlp_bias": (BOOLEAN, False),
    "use_sliding_window": (BOOLEAN, False),
    "sliding_window": (POSITIVE_INT, True),
    "eos_token_id": (TOKEN_IDS, True),
}
REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "rms_norm_eps")
# The fields of rope_scaling / rope_parameters (a llama3 scaling needs the last four; from_hf says so).
ROPE_FIELDS: dict[str, Rule] = {"rope_type": STRING, "type": STRING, "rope_theta": POSITIVE_NUMBER,
                                "factor": POSITIVE_NUMBER, "low_freq_factor": POSITIVE_NUMBER,
                                "high_freq_factor": POSITIVE_NUMBER, "original_max_position_embeddings": POSITIVE_INT}
FIX = "fix it, or use the config.json that came with the checkpoint"


def check_config(hf: dict, where: str) -> None:
    """Raise one ValueError naming `where` (the file), and each field at fault with its value, unless every field
    from_hf reads has the type and range of CONFIG_FIELDS and ROPE_FIELDS, and the fields agree: the query heads
    divide into the key/value heads, the head size is even (RoPE rotates pairs) and, without head_dim, hidden_size
    divides into the heads, and every EOS id is below vocab_size."""
    missing = [k for k in REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"{where}: lacks {missing} (or they are null), which every supported model needs; {FIX}")
    problems = [problem(name, hf[name], rule, nullable) for name, (rule, nullable) in CONFIG_FIELDS.items()
                if name in hf]
    for key in ("rope_scaling", "rope_parameters"):
        if type(hf.get(key)) is dict:
            problems += [problem(f"{key}.{name}", hf[key][name], rule) for name, rule in ROPE_FIELDS.items()
                         if name in hf[key]]
    problems = [p for p in problems if p]
    if not problems:
        problems = consistency_problems(hf)
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}; {FIX}")


def problem(name: str, value: Any, rule: Rule, nullable: bool = False) -> str | None:
    """What is wrong with one field's value, in words, or None."""
    what, test = rule
    if (value is None and nullable) or (value is not None and test(value)):
        return None
    return f"'{name}' is {shown(value)}, but it must be {what}{' (or null)' if nullable else ''}"


def consistency_problems(hf: dict) -> list[str]:
    """check_config's checks across fields, once each field is of its type."""
    problems = []
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = hf.get("head_dim")
    if head_dim is None and hf["hidden_size"] % heads:
        problems.append(f"hidden_size {hf['hidden_size']} is not a multiple of num_attention_heads {heads} and "
                        f"there is no head_dim")
    elif (head_dim or hf["hidden_size"] // heads) % 2:
        problems.append(f"the head size {head_dim or hf['hidden_size'] // heads} (head_dim, or hidden_size / "
                        f"num_attention_heads) is odd; RoPE needs an even one")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        if "low_freq_factor" in rope and "high_freq_factor" in rope and \
                rope["high_freq_factor"] <= rope["low_freq_factor"]:
            problems.append(f"{key}.high_freq_factor {rope['high_freq_factor']} is not above low_freq_factor "
                            f"{rope['low_freq_factor']} (llama3 scaling divides by their difference)")
    problems += eos_problems(hf.get("eos_token_id"), hf["vocab_size"])
    return problems


def eos_problems(eos_token_id: Any, vocab_size: int) -> list[str]:
    """An eos_token_id (of TOKEN_IDS' type) whose ids are not all below vocab_size, in words."""
    ids = eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id]
    if all(i < vocab_size for i in ids):
        return []
    return [f"'eos_token_id' is {shown(eos_token_id)}, but token ids must be below vocab_size {vocab_size}"]


def read_generation_eos(path: Path, vocab_size: int) -> int | list[int] | None:
    """The eos_token_id of a generation_config.json, checked as config.json's is (a token id or a list of them, each
    below the config's vocab_size)."""
    eos = read_json_object(path).get("eos_token_id")
    wrong = problem("eos_token_id", eos, TOKEN_IDS, nullable=True)
    problems = [wrong] if wrong else eos_problems(eos, vocab_size)
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}; fix it, or remove the file (config.json's EOS ids remain)")
    return eos


LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def check_layer_count(weight_files: Iterable[Path], num_hidden_layers: int, config_path: Path) -> None:
    """Refuse a config whose num_hidden_layers differs from the layers the checkpoint holds (one more than the highest
    model.layers.N in its safetensors headers, which are all that is read), before a model is built: building the
    skeleton of a million layers takes an hour even on "meta"."""
    layers = [int(m.group(1)) for path in weight_files for name in check_safetensors(path)
              if (m := LAYER_NAME.match(name))]
    stored = max(layers, default=-1) + 1
    if stored != num_hidden_layers:
        held = f"{stored} layers (model.layers.0 to model.layers.{stored - 1})" if stored else "no model.layers.N"
        raise ValueError(f"{config_path}: 'num_hidden_layers' is {num_hidden_layers}, but the checkpoint holds {held}; "
                         f"{FIX}")
