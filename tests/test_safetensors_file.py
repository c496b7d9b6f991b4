"""Tests of machinery/safetensors_file.py: the strict checks of untrusted safetensors files, hand-made hostile files
and a seeded fuzz compared with the reference library where it is installed."""

import json
import math
import random
import re

import pytest
import torch

import lorasb
from machinery.safetensors_file import check_safetensors, load_safetensors_strict


def write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, data, length, message", [
    (b"{}", b"", 10**12, "header length"),
    (b"[1]", b"", None, "not an object"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, b"", None, "nested too deeply", id="deep-nesting"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4, None, "duplicate"),
    ({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None, "dtype 'F4'.*not supported here"),
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, r"dtype \['F32'\]"),
    ({"a": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}}, b"", None, "overflows"),
    (b'{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b"", None, "'-0'"),
    (b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None, "lone UTF-16 surrogate"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "4 bytes for shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2, None, "data section"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6, None, "overlap or hole"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlap or hole"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "must have 'dtype', 'shape' and 'data_offsets'"),
    ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
])
def test_hostile_safetensors_files_are_refused_with_the_reason(tmp_path, header, data, length, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(ValueError, match=message) as refused:
        load_safetensors_strict(path)
    assert str(path) in str(refused.value)


def test_a_symlink_loop_is_refused_by_both_readers_naming_it(tmp_path):
    (tmp_path / "self.safetensors").symlink_to("self.safetensors")
    (tmp_path / "a.safetensors").symlink_to("b.safetensors")
    (tmp_path / "b.safetensors").symlink_to("a.safetensors")
    for path in (tmp_path / "self.safetensors", tmp_path / "a.safetensors"):
        for reader in (load_safetensors_strict, lorasb.load_safetensors):
            with pytest.raises(ValueError, match=f"{re.escape(str(path))}: a symlink that loops"):
                reader(path)


def test_what_the_reference_library_accepts_loads(tmp_path):
    """Valid files the reference library reads: the dtypes torch has, a null __metadata__, whitespace around the
    header, an extra key in a tensor entry, and a tensor at an offset its dtype does not align with."""
    body = {"u16": ("U16", [2], 4), "u32": ("U32", [1], 4), "u64": ("U64", [1], 8), "e4m3": ("F8_E4M3", [3], 3),
            "e5m2": ("F8_E5M2", [1], 1), "c64": ("C64", [1], 8)}
    header, offset = {"__metadata__": None}, 0
    for name, (dtype, shape, nbytes) in body.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes], "note": "x"}
        offset += nbytes
    data = bytes(range(offset))
    path = write_raw(tmp_path / "valid.safetensors", b" \t\n" + json.dumps(header).encode() + b"\n  ", data)
    check_safetensors(path)
    for reader in (load_safetensors_strict, lorasb.load_safetensors):
        tensors, metadata = reader(path)
        assert metadata == {} and list(tensors) == list(body)
        assert b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values()) == data
        assert tensors["u16"].dtype == torch.uint16 and tensors["c64"].dtype == torch.complex64


def hostile_safetensors(rng) -> bytes:
    """A valid file of a few tensors with one or two random defects: in a tensor entry (dtype, shape, offsets, keys),
    the metadata, a name, the JSON text (whitespace, a flipped byte, a duplicate, deep nesting), the length field or
    the data section."""
    tensors, offset = {}, 0
    for name in rng.sample(["w", "b", "x.y", "e"], rng.randint(1, 3)):
        dtype, itemsize = rng.choice([("F32", 4), ("BF16", 2), ("U8", 1), ("I64", 8), ("BOOL", 1), ("U32", 4)])
        shape = rng.choice([[], [0], [3], [2, 2], [1, 3, 1]])
        nbytes = math.prod(shape) * itemsize
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    offsets = {name: tuple(t["data_offsets"]) for name, t in tensors.items()}
    header = {"__metadata__": {"format": "pt"}, **tensors}
    data = bytes(rng.randrange(256) for _ in range(offset))
    if data and any(t["dtype"] == "BOOL" for t in tensors.values()):
        data = bytes(b % 2 for b in data)  # the reference refuses bool bytes other than 0 and 1; so do we, via torch
    odd_values = [None, -1, "-0", 1.0, 2**64, 2**63, "3", [], [1], [[1]], {"a": 1}, True, "\ud800"]
    for _ in range(rng.randint(1, 2)):
        name = rng.choice(list(tensors))
        kind = rng.randrange(12)
        if kind == 0:
            tensors[name]["dtype"] = rng.choice(["F64", "F16", "I8", "U16", "U64", "F8_E4M3", "F8_E5M2", "C64",
                                                 "F8_E8M0", "F4", "F6_E2M3", "f32", "", *odd_values])
        elif kind == 1:
            tensors[name]["shape"] = rng.choice([[-1], ["-0"], [1.0], [2**62, 0], [2**62, 2**62, 0], [0, 2**62, 2**62],
                                                 [2**63, 0], [2**64], [True], *odd_values])
        elif kind == 2:
            begin, end = offsets[name]
            tensors[name]["data_offsets"] = rng.choice([[begin, end + 1], [begin + 1, end], [end, begin], [begin],
                                                        [begin, end, 0], [-1, end], [begin, 1.0 * end], odd_values])
        elif kind == 3:
            tensors[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif kind == 4:
            tensors[name]["extra"] = rng.choice(odd_values)
        elif kind == 5:
            header["__metadata__"] = rng.choice([None, {}, {"k": 1}, {"\ud800": "v"}, {"k": "\udfff"}, "x", [],
                                                 {"k": None}])
        elif kind == 6:
            header[rng.choice(["\ud800", "", "\u00e9\u4e2d", "__metadata__x"])] = header.pop(name)
        elif kind == 7:
            header[name] = rng.choice(odd_values)
        else:
            break
    raw = json.dumps(header).replace('"-0"', "-0").encode()  # ensure_ascii keeps "\ud800" an escape, as hostile
    if kind == 8:
        raw = rng.choice([b" \t", b"\n", b"\r\n "]) + raw + rng.choice([b"", b" ", b"\n", b"\0", b"x", b"}"])
    elif kind == 9 and raw:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    elif kind == 10:
        raw = rng.choice([raw[:-1] + b', "w": {}}', b"[" * 3000 + b"]" * 3000, b'{"a": ' * 3000 + b"1" + b"}" * 3000,
                          b"", b"null", b'"text"', b"{" + b"1" * 5000 + b"}"])
    length = len(raw)
    if kind == 11:
        length = rng.choice([0, length - 1, length + 1, 2**63, 100_000_001])
        data = rng.choice([data, data[:-1], data + b"\0", b""])
    return length.to_bytes(8, "little") + raw + data


def same_tensors(a: dict, b: dict) -> bool:
    as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a)


def test_hostile_safetensors_fuzz_is_refused_with_a_value_error_and_agrees_with_the_reference(tmp_path):
    """300 seeded hostile files: ours raises ValueError or loads; where the reference library is installed, it refuses
    what the reference refuses and loads what it loads (byte for byte), except the two deliberate refusals.
    lorasb's own compact reader raises nothing but ValueError either, and loads the same tensors wherever the strict
    checks pass."""
    try:
        from safetensors.torch import load as reference_load
    except ImportError:
        reference_load = None
    rng, disagreements = random.Random(0), []
    for case in range(300):
        raw = hostile_safetensors(rng)
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(raw)
        try:
            ours, error = load_safetensors_strict(path)[0], None
        except ValueError as e:
            ours, error = None, str(e)
        try:
            compact = lorasb.load_safetensors(path)[0]
        except ValueError:
            compact = None
        if ours is not None and (compact is None or not same_tensors(ours, compact)):
            disagreements.append((case, raw[:300], "lorasb.load_safetensors read it otherwise"))
        if reference_load is None:
            continue
        try:
            theirs = reference_load(raw)
        except Exception:  # the reference raises SafetensorError, and KeyError or TypeError from torch
            theirs = None
        if theirs is None and ours is not None:
            disagreements.append((case, raw[:300], "loaded what the reference refuses"))
        elif theirs is not None and ours is None and not re.search("duplicate names|not supported here", error):
            disagreements.append((case, raw[:300], error))
        elif theirs is not None and ours is not None and not same_tensors(theirs, ours):
            disagreements.append((case, raw[:300], "loaded other tensors than the reference"))
    assert not disagreements, disagreements[:5]
