"""Files from elsewhere (a model folder, a data file) are opened only when they are regular files, and a JSON file is
read only when it is small enough: opening a FIFO waits for a writer forever, a device never ends, and a gigabyte
tokenizer.json would be read whole before it could be refused. A data file is decoded line by line, so that a byte
that is not UTF-8 or a record that is not text is an error naming its file and line. Standard library only, so that
machinery/tokenizer.py stays importable without torch.
"""

import itertools
import json
import os
import stat
from collections.abc import Iterator
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


# ---------------------------------------------------------------------------------------------------------------------
# Data files (GSM8K, MetaMathQA, MATH, the commonsense tasks): JSON lines decoded line by line, each record's text
# fields checked, every error naming the file and the line (or the index in a JSON list).
# ---------------------------------------------------------------------------------------------------------------------

def text_fields(record: object, keys: tuple[str, ...], where: str) -> dict:
    """The `keys` of one record (each a string that is text), or a ValueError naming file:line / file[index]."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(keys)}, got {type(record).__name__}")
    for key in keys:
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: missing string field {key!r} (keys are {sorted(record)})")
        try:  # a JSON escape such as "\ud800" decodes to a lone surrogate, which no tokenizer or file can take
            record[key].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: field {key!r} holds a lone surrogate {record[key][e.start]!r} at character "
                             f"{e.start + 1} (an unpaired \\ud800-\\udfff escape), which is not text") from None
    return {key: record[key] for key in keys}


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line of a text file, decoded as UTF-8 line by line, so that a byte that is not
    UTF-8 is a ValueError naming the file and the line. Only a regular file is opened: a FIFO would block forever."""
    with open_regular(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at byte "
                                 f"{e.start + 1} of the line): save the file as UTF-8") from None
            yield lineno, line


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(where, record) for each line of a JSON-lines file but blank ones; where is "file:line", for error messages."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield f"{path}:{lineno}", record


def read_jsonl(path: str | os.PathLike, keys: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped), each reduced to `keys`; at most `limit` of them."""
    return [text_fields(record, keys, where) for where, record in itertools.islice(jsonl_records(path), limit)]
