"""The trainer's --out_dir: checked before anything loads, prepared (cleared with --overwrite, rid of what interrupted
writes left), and written with strict JSON only, each file complete or absent (lorasb.atomic_write)."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import lorasb

CHECKPOINTS = "checkpoints"  # the subfolder machinery.checkpoints writes
INTERRUPTED_FOLDER = ".tmp-"  # the prefix of a checkpoint folder being written, renamed into place once complete


def check(args) -> list[str]:
    """--out_dir must be writable, and must not silently mix two runs (--resume continues, --overwrite starts over)."""
    problems = []
    if args.resume and args.eval_only:
        problems.append("--resume is for training, not --eval_only")
    out = Path(args.out_dir)
    if args.resume and not any((out / CHECKPOINTS).glob("step-*")):
        problems.append(f"--resume: no checkpoint in {out / CHECKPOINTS}; to start over, run without --resume "
                        f"(adding --overwrite if {out} is not empty)")
    if not args.resume and not args.overwrite and out.is_dir() and any(out.iterdir()):
        problems.append(f"--out_dir {out} exists and is not empty: pass --resume to continue it, --overwrite to "
                        f"start over, or choose another --out_dir")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        problems.append(f"--out_dir {out}: {parent} is a file, not a folder")
    elif not os.access(parent, os.W_OK):
        problems.append(f"--out_dir {out}: {parent} is not writable")
    return problems


def prepare(out_dir: str, overwrite: bool, outputs: tuple[str, ...], writer: bool) -> Path:
    """--out_dir, created by the writing process; with --overwrite, first rid of the checkpoints and the `outputs` an
    earlier run left there. What interrupted writes left goes too (model-sized for full fine-tuning)."""
    out = Path(out_dir)
    if writer:
        if overwrite:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            for stale in outputs:
                (out / stale).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(out)
    return out


def remove_interrupted_writes(folder: str | os.PathLike) -> list[str]:
    """Delete what a kill mid-write leaves anywhere under `folder` (which no other process may be writing to): the
    temporary files of lorasb.atomic_write and the temporary checkpoint folders; returns their paths."""
    folders = [p for p in Path(folder).rglob(f"{INTERRUPTED_FOLDER}*") if p.is_dir()]
    for path in folders:
        shutil.rmtree(path)
    pattern = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # mkstemp's names: prefix, 8 random characters, suffix
    files = [p for p in Path(folder).rglob(".*.tmp") if p.is_file() and pattern.fullmatch(p.name)]
    for path in files:
        path.unlink()
    return [str(p) for p in folders + files]


def strict_json(obj, **options) -> str:
    """JSON that every parser reads: json.dumps writes NaN and infinity as bare NaN / Infinity, which is not JSON; here
    they become null (e.g. the held-out loss of a test set whose answers --max_length cuts off entirely)."""
    def finite(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(obj), allow_nan=False, **options)


def write_json(path: Path, obj) -> None:
    lorasb.atomic_write(path, lambda f: f.write((strict_json(obj, indent=2) + "\n").encode()))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    lorasb.atomic_write(path, lambda f: f.write("".join(strict_json(r) + "\n" for r in rows).encode()))


def append_jsonl(path: Path, row: dict) -> None:
    """One line more; a crash or a full disk can cut it short, which cut_metrics then drops."""
    with open(path, "a") as f:
        f.write(strict_json(row) + "\n")


def cut_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of metrics.jsonl up to `last_step` (a resumed run rewrites what came after), dropping any line a
    crash or a full disk cut short."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    kept = [line for line in lines if metrics_step(line) <= last_step]
    lorasb.atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not whole."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
