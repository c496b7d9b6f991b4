"""Safetensors files from elsewhere (a downloaded checkpoint) are untrusted input: load_safetensors_strict reads them
with lorasb.load_safetensors, the project's one reader of the format, once check_safetensors found the header strictly
valid: the checks of lorasb.tensor_entry_problem on every tensor entry, and on top of them the ones below.

Every check comes from the reference implementation's errors (huggingface/safetensors, SafeTensorError). What the
reference accepts loads (whitespace around the header, "__metadata__": null, extra keys in a tensor entry), except
duplicate tensor names and the UNSUPPORTED_DTYPES, which are refused with a message that says so.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch

import lorasb
from lorasb import MAX_HEADER_BYTES
from machinery.input_files import read_json_object, regular_file

# Valid in the safetensors format, deliberately not read here: sub-byte types (a tensor is not a whole number of bytes)
# and F8_E8M0, which only recent torch versions have.
UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0")
MAX_NUMEL = 2**63 - 1  # torch counts elements in an int64


def load_safetensors_strict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """check_safetensors(path), then lorasb.load_safetensors(path): ({name: tensor}, metadata)."""
    check_safetensors(path)
    return lorasb.load_safetensors(path)


def check_safetensors(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor entries of the file's header, {name: {"dtype", "shape", "data_offsets"}} (no tensor data is read).
    Raise ValueError naming the file and the problem (and the tensor, where one is at fault) unless the header is
    strictly valid: a bounded length, a JSON object with no duplicate names, no '-0' and no lone surrogate, string
    metadata, and tensor entries of supported dtypes whose byte ranges tile the data section exactly."""
    path = os.fspath(path)

    def fail(msg: str):
        raise ValueError(f"{path}: {msg}; the file is not a valid safetensors file (re-download or re-save it)")

    try:
        size = regular_file(path).st_size
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        fail("a symlink that loops back to itself (directly or through other links); point it at the file")
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
    if not isinstance(metadata, (dict, type(None))) or not all(isinstance(v, str) for v in (metadata or {}).values()):
        fail("__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        problem = _strict_entry_problem(name, info)
        if problem:
            fail(problem)
        spans.append((*info["data_offsets"], name))
    end_of_previous = 0
    for begin, end, name in sorted(spans):
        if begin != end_of_previous:
            fail(f"tensor {name!r} starts at byte {begin}, expected {end_of_previous} (overlap or hole)")
        end_of_previous = end
    if end_of_previous != size - 8 - header_len:
        fail(f"the tensors cover {end_of_previous} bytes but the data section has {size - 8 - header_len}")
    return header


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


def _strict_entry_problem(name: str, info: Any) -> str | None:
    """lorasb.tensor_entry_problem, with a dtype the format has but this reader does not named as such, and a shape
    refused whose element count overflows from left to right, as the reference counts (even when a later 0 empties it:
    [2**62, 2**62, 0])."""
    if isinstance(info, dict) and info.get("dtype") in UNSUPPORTED_DTYPES:
        return f"tensor {name!r} has dtype {info['dtype']!r}, which is valid safetensors but not supported here"
    problem = lorasb.tensor_entry_problem(name, info, MAX_NUMEL)  # the tiling check then says what the data misses
    numel = 1
    for d in [] if problem else info["shape"]:
        numel *= d
        if numel > MAX_NUMEL:
            return f"tensor {name!r} has shape {info['shape']}, whose element count overflows"
    return problem


# A checkpoint too large for one file is split into shards named by an index.
INDEX_FILE = "model.safetensors.index.json"


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The {tensor: shard file} map of a model.safetensors.index.json, with every shard a plain file name (the index
    is untrusted: a path in it could point anywhere)."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    for name, shard in weight_map.items():
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise ValueError(f"{index_path}: tensor {name!r} maps to {shard!r}; shards must be plain file names")
    return weight_map
