"""Files from elsewhere (a model folder, a data file) are opened only when they are regular files, and a JSON file is
read only when it is small enough: opening a FIFO waits for a writer forever, a device never ends, and a gigabyte
tokenizer.json would be read whole before it could be refused. Standard library only, so that machinery/tokenizer.py
stays importable without torch.
"""

import json
import os
import stat
from pathlib import Path

# Far above any JSON file a model ships (Llama-3's tokenizer.json: 9 MB), far below a size that hurts.
MAX_JSON_BYTES = 100_000_000


def regular_file(path: str | os.PathLike) -> os.stat_result:
    """os.stat(path) of a regular file (symlinks followed); a FIFO, a folder, a device or a socket is a ValueError
    naming it, found without opening it. A missing path raises FileNotFoundError, as os.stat does."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device or other special file")
        raise ValueError(f"{path} is {kind}, not a regular file; reading it could block forever or never end. "
                         f"Put the file itself there")
    return info


def open_regular(path: str | os.PathLike, *args, **kwargs):
    """open(path, ...) once regular_file(path) has checked it."""
    regular_file(path)
    return open(path, *args, **kwargs)


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in the file `path`: a regular file of at most MAX_JSON_BYTES (checked before a byte is read),
    UTF-8, JSON, not nested past Python's recursion limit, an object. Anything else is one ValueError naming the file
    (a missing file is FileNotFoundError); what each field must be is left to the caller."""
    path = Path(path)
    size = regular_file(path).st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path} holds {size} bytes, more than the {MAX_JSON_BYTES} a JSON file read here may "
                         f"have; is it the right file?")
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES)  # bounded even if the file grew since it was measured (then it is no JSON)
    fix = "fix the file, or download it again"
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); {fix}"
                         ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read (no real file is); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: a JSON {type(value).__name__}, where a JSON object {{...}} is expected; {fix}")
    return value


def json_depth(value) -> int:
    """How deeply a value read from JSON nests objects and lists (0 for a number or a string), counted without
    recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def shown(value) -> str:
    """A value read from a JSON file, for an error message: as the file spells it (null, true, "false", so that a
    string is not taken for what it spells), cut to 80 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:80] + "..."
