"""The trainer's --out_dir: checked before anything loads, held by one run at a time (a lock), prepared (cleared with
--overwrite, rid of what interrupted writes left), and written with strict JSON only, each file complete or absent
(machinery.files.atomic_write)."""

import fcntl
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from machinery import distributed
from machinery.distributed import refuse
from machinery.files import atomic_write

CHECKPOINTS = "checkpoints"  # the subfolder machinery.checkpoints writes
INTERRUPTED_FOLDER = ".tmp-"  # the prefix of a checkpoint folder being written (or deleted), renamed once complete
LOCK = ".lock"  # held by the run writing the folder; it stays there, and is never an output of a run
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's names: mkstemp's 8 random characters


def check(args) -> list[str]:
    """--out_dir must be writable, and must not silently mix two runs (--resume continues, --overwrite starts over)."""
    problems = []
    if args.resume and args.eval_only:
        problems.append("--resume is for training, not --eval_only")
    out = Path(args.out_dir)
    if args.resume and not any((out / CHECKPOINTS).glob("step-*")):
        problems.append(f"--resume: no checkpoint in {out / CHECKPOINTS}; to start over, run without --resume "
                        f"(adding --overwrite if {out} is not empty)")
    if not args.resume and not args.overwrite and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        problems.append(f"--out_dir {out} exists and is not empty: pass --resume to continue it, --overwrite to "
                        f"start over, or choose another --out_dir")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        problems.append(f"--out_dir {out}: {parent} is a file, not a folder")
    elif not os.access(parent, os.W_OK):
        problems.append(f"--out_dir {out}: {parent} is not writable")
    return problems


@contextmanager
def lock(out_dir: str, writer: bool) -> Iterator[None]:
    """Hold --out_dir for the run (the writing process takes the lock; under torchrun every process learns whether it
    could): a second run on the same folder is refused, naming the run that holds it. The lock is an flock on
    <out_dir>/.lock, which the kernel releases when the process ends, however it ends: a killed run leaves nothing that
    blocks the next one."""
    with ExitStack() as held:
        holder = take_lock(Path(out_dir), held) if writer else None
        if distributed.largest(holder is not None):  # process 0 says why; the others just stop
            refuse([f"--out_dir {out_dir} is in use by another run ({holder}): wait for it to end, or choose another "
                    f"--out_dir"])
        yield


def take_lock(out: Path, held: ExitStack) -> str | None:
    """Lock out/.lock for as long as `held` lasts and write who holds it there; if another process holds it, returns
    who (its pid, host, start time and command) instead."""
    out.mkdir(parents=True, exist_ok=True)
    f = held.enter_context(open(out / LOCK, "a+"))  # "a+": a run that is refused must not erase the holder's record
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        return f.read().strip() or "a process that has not yet said who it is"
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{shlex.join([sys.executable, *sys.argv])}\n")
    f.flush()
    return None


def prepare(out_dir: str, overwrite: bool, outputs: tuple[str, ...], writer: bool) -> Path:
    """--out_dir, created by the writing process; with --overwrite, first rid of every output (`outputs`: files and
    folders, the checkpoints among them) an earlier run left there, and of nothing else. The temporaries of writes that
    were interrupted go too (model-sized for full fine-tuning)."""
    out = Path(out_dir)
    if writer:
        if overwrite:
            for name in outputs:
                remove(out / name)
        out.mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(out, outputs)
    return out


def remove(path: Path) -> None:
    """A file or a folder (a link: itself, not what it points to), if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_interrupted_writes(out: str | os.PathLike, outputs: tuple[str, ...]) -> list[str]:
    """Delete what a kill mid-write leaves where the trainer writes (no other process may be writing there): the
    temporary file of an output beside it in `out` (.summary.json.a1b2c3d4.tmp), the temporary files inside an
    output folder (checkpoints/, peft_adapter/, model/) and the temporary checkpoint folders; returns their paths. A
    user's file elsewhere that looks like one is not the trainer's: it stays."""
    out = Path(out)
    folders = [out / name for name in outputs if (out / name).is_dir() and not (out / name).is_symlink()]
    found = [p for name in outputs for p in out.glob(f".{name}.*.tmp")]
    found += [p for folder in folders for p in folder.iterdir()]
    files = [p for p in found if p.is_file() and not p.is_symlink() and TEMPORARY.fullmatch(p.name)]
    temporary_folders = [p for p in (out / CHECKPOINTS).glob(f"{INTERRUPTED_FOLDER}*") if p.is_dir()]
    for path in temporary_folders:
        shutil.rmtree(path)
    for path in files:
        path.unlink()
    return [str(p) for p in temporary_folders + files]


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
    atomic_write(path, lambda f: f.write((strict_json(obj, indent=2) + "\n").encode()))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(strict_json(r) + "\n" for r in rows).encode()))


def append_jsonl(path: Path, row: dict) -> None:
    """One line more; a crash or a full disk can cut it short, which cut_metrics then drops."""
    with open(path, "a") as f:
        f.write(strict_json(row) + "\n")


def cut_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of metrics.jsonl up to `last_step` (a resumed run rewrites what came after), dropping any line a
    crash or a full disk cut short."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    kept = [line for line in lines if metrics_step(line) <= last_step]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not whole."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
