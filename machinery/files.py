"""Writing files so that each is complete or absent, and hashing them: the file helpers of machinery/. lorasb.py keeps
its own atomic write for its own files (it must run alone); everything else of the project writes through here.
"""

import contextlib
import hashlib
import os
import tempfile
from typing import Any, Callable

from machinery.input_files import open_regular


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so it is either complete or absent: write(f) into a temporary file beside it (named
    .<name>.<8 random characters>.tmp, which run_folder.remove_interrupted_writes recognizes), fsync, then os.replace,
    which replaces a symlink at `path` rather than writing through it."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the permissions a plain open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a regular file, read in 1 MiB blocks (a FIFO or a device, which would never end, is a ValueError
    naming it)."""
    return hash_file(path, hashlib.sha256())


def hash_file(path: str | os.PathLike, h: Any) -> str:
    """The hex digest of a regular file's bytes fed to the hashlib object `h` (see sha256_file)."""
    with open_regular(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
