"""The trainer's --out_dir: checked before anything loads, held by one run at a time (a lock), prepared (cleared with
--overwrite, rid of what interrupted writes left), and written with strict JSON only, each file complete or absent
(machinery.files.atomic_write)."""

import errno
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import socket
import stat
import sys
import time
from contextlib import ExitStack, contextmanager
from itertools import takewhile
from pathlib import Path
from typing import Iterator

from machinery import distributed, input_files
from machinery.command import refuse
from machinery.files import atomic_write

CHECKPOINTS = "checkpoints"  # the subfolder machinery.checkpoints writes
INTERRUPTED_FOLDER = ".tmp-"  # the prefix of a checkpoint folder being written (or deleted), renamed once complete
METRICS = "metrics.jsonl"  # the run's log, one JSON line per logged step; read back on --resume
LOCK = ".lock"  # held by the run writing the folder; it stays there, and is never an output of a run
# The options that name what a run reads; --out_dir may hold none of them (held_inputs). A new input option goes here.
INPUTS = ("model", "adapter", "data_dir", "metamathqa_path", "math_path", "commonsense_dir")
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's names: mkstemp's 8 random characters


def check(args) -> list[str]:
    """--out_dir must be a path the run can write, must hold none of the run's inputs, and must not silently mix two
    runs (--resume continues, --overwrite starts over)."""
    named = [("out_dir", args.out_dir), *((name, getattr(args, name)) for name in INPUTS if getattr(args, name, None))]
    problems = [f"--{name} {os.fsencode(value)!r}: the path holds bytes that are not UTF-8 (shown as \\x..), which "
                f"the run cannot print or record; rename it in UTF-8" for name, value in named if not utf8(value)]
    if problems:
        return problems
    out = Path(args.out_dir)
    problems += held_inputs(args)
    if args.resume and args.eval_only:
        problems.append("--resume is for training, not --eval_only")
    if args.resume and not any((out / CHECKPOINTS).glob("step-*")):
        problems.append(f"--resume: no checkpoint in {out / CHECKPOINTS}; to start over, run without --resume "
                        f"(adding --overwrite if {out} is not empty)")
    if args.resume and (problem := not_the_run_s_file(out / METRICS)):
        problems.append(problem)
    if not args.resume and not args.overwrite and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        problems.append(not_empty(args, out))
    existing = next((p for p in [out, *out.parents] if os.path.lexists(p)), Path("."))
    if existing.is_symlink() and not existing.exists():
        problems.append(f"--out_dir {out}: {existing} is a symbolic link to {os.readlink(existing)}, which does not "
                        f"exist or leads back to itself; remove the link, or make it point to a folder")
    elif not existing.is_dir():
        problems.append(f"--out_dir {out}: {existing} is a file, not a folder")
    elif not os.access(existing, os.W_OK):
        problems.append(f"--out_dir {out}: {existing} is not writable")
    return problems


def utf8(path: str) -> bool:
    """Whether a path from the command line is UTF-8 (Python holds a byte that is not as a lone surrogate)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def held_inputs(args) -> list[str]:
    """An input at or inside --out_dir would be lost: --overwrite deletes the outputs of a run there (an adapter, a
    fine-tuned model, checkpoints, config.json) and a run writes its own over them. An --out_dir inside an input folder
    is allowed: the run writes only its own names (OUTPUTS) in its own folder, which no input reads."""
    out = Path(os.path.realpath(args.out_dir))
    problems = []
    for name in INPUTS:
        value = getattr(args, name, None)
        if not value or not os.path.lexists(os.path.expanduser(value)):  # a hub name for --model is no path
            continue
        real = Path(os.path.realpath(os.path.expanduser(value)))
        if real.is_relative_to(out):
            where = "is" if real == out else "holds"
            problems.append(f"--out_dir {args.out_dir} {where} --{name} {value}, which this run reads: the run writes "
                            f"its outputs there, and --overwrite deletes them; choose an --out_dir outside it")
    return problems


def not_empty(args, out: Path) -> str:
    """Why a folder that holds files is refused, and the options that work."""
    if not args.eval_only:
        return (f"--out_dir {out} exists and is not empty: pass --resume to continue it, --overwrite to start over, "
                f"or choose another --out_dir")
    adapter = out / "adapter.safetensors"
    evaluate = f" (to evaluate its adapter: --adapter {adapter} --out_dir {out}-eval)" if adapter.is_file() else ""
    return (f"--out_dir {out} exists and is not empty: choose another --out_dir for --eval_only{evaluate}, or pass "
            f"--overwrite to delete the outputs there (a training run's checkpoints and adapter among them)")


def not_the_run_s_file(path: Path) -> str | None:
    """Why a file the run reads back from its own folder cannot be read (a FIFO would block the read forever, a
    device never end), or None: the run reads only regular files there (symlinks followed; reading one harms
    nothing, and the run replaces rather than writes through it)."""
    try:
        input_files.regular_file(path)
    except FileNotFoundError:
        return None
    except (ValueError, OSError):  # OSError: a symlink that loops
        return (f"{path} is not a regular file (a FIFO, a folder, a device or a broken symlink), so it is not the file "
                f"this trainer wrote: remove it, then run again")
    return None


@contextmanager
def lock(out_dir: str, writer: bool) -> Iterator[None]:
    """Hold --out_dir for the run (the writing process takes the lock; under torchrun every process learns whether it
    could): a second run on the same folder is refused, naming the run that holds it. The lock is an flock on
    <out_dir>/.lock, which the kernel releases when the process ends, however it ends: a killed run leaves nothing that
    blocks the next one. A run that ends having written nothing there (refused before it began: an input missing,
    a download that failed) leaves no folder behind: its .lock goes, and the folders it made."""
    with ExitStack() as held:
        problem = take_lock(Path(out_dir), held) if writer else None
        if distributed.largest(problem is not None):  # process 0 says why; the others just stop
            refuse([problem or "process 0 could not take the lock"])
        yield


def take_lock(out: Path, held: ExitStack) -> str | None:
    """Lock out/.lock for as long as `held` lasts and write who holds it there; returns why not instead: another
    process holds it (its pid, host, start time and command), or .lock is not a file this trainer made. The folders
    made here, and .lock, are removed at the end if the run left nothing else in them, while the lock is still held
    (a run that opened the old .lock meanwhile sees that it is gone, and takes the lock anew)."""
    while True:
        made = list(takewhile(lambda p: not os.path.lexists(p), [out, *out.parents]))  # innermost first
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK
        try:  # O_NOFOLLOW: a symlink there is refused, not followed to a user's file; O_NONBLOCK: a FIFO opens at once
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a symlink, a folder, a socket
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            return (f"{path} is {kind_of(path)}, not the lock file this trainer makes, and is not followed or "
                    f"replaced: remove it (the run makes its own), or choose another --out_dir")
        f = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().decode(errors="replace").strip() or "a process that has not yet said who it is"
            f.close()
            return (f"--out_dir {out} is in use by another run ({holder}): wait for it to end, or choose another "
                    f"--out_dir")
        if same_file(path, fd):
            break
        f.close()  # the run that held it removed it after we opened it: take the new one
    held.enter_context(f)
    held.callback(leave_nothing_behind, out, made)
    f.truncate(0)
    record = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: " \
             f"{shlex.join([sys.executable, *sys.argv])}\n"
    f.write(record.encode("utf-8", "surrogateescape"))  # an argument in bytes that are not UTF-8, as given
    f.flush()
    return None


def kind_of(path: Path) -> str:
    info = os.lstat(path)
    return ("a symbolic link" if stat.S_ISLNK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a special file")


def same_file(path: Path, fd: int) -> bool:
    """Whether `path` is still the file open as `fd`."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return (info.st_dev, info.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)


def leave_nothing_behind(out: Path, made: list[Path]) -> None:
    """When out holds nothing but .lock, remove .lock and the folders in `made` (innermost first) that are empty."""
    if any(p.name != LOCK for p in out.iterdir()):
        return
    (out / LOCK).unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty: another run's now
            return


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
    """One line more; a crash or a full disk can cut it short, which cut_metrics then drops. A symlink put there is not
    followed (O_NOFOLLOW), and a FIFO does not block (O_NONBLOCK): both are errors naming the file."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    with open(fd, "a") as f:
        f.write(strict_json(row) + "\n")


def cut_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of metrics.jsonl up to `last_step` (a resumed run rewrites what came after), dropping any line a
    crash or a full disk cut short. Read only when it is a regular file (check refuses anything else first)."""
    if problem := not_the_run_s_file(path):
        raise ValueError(problem)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    kept = [line for line in lines if metrics_step(line) <= last_step]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not whole."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
