"""How a command (train_gsm8k.py, the experiments) ends on a failure a user meets and fixes: one paragraph, the error's
message and what to do, exit status 1; the traceback only on request ($LORASB_TRACEBACK=1). A bug keeps its
traceback. Bad arguments are refused all at once (refuse), and a write that fails (a full disk) says so plainly."""

import errno
import os
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from machinery.hub import DownloadError

# What each expected failure asks of the user; the error's own message names the file or input.
WHAT_TO_DO = ((DownloadError, "Check the connection, or use local files as it says"),
              (FileNotFoundError, "Check the path it names"), (ValueError, "Fix the input it names"))
REPOSITORY = Path(__file__).resolve().parents[1]
PROJECT_FOLDERS = {REPOSITORY / name for name in ("", "machinery", "experiments")}


def expected_failure(e: BaseException) -> bool:
    """Whether an error is one a user meets and fixes rather than a bug: a failed download (offline), a missing file,
    or a ValueError raised by this project's own checks of an input (not one from inside torch)."""
    if isinstance(e, (DownloadError, FileNotFoundError)):
        return True
    raised_in = Path(traceback.extract_tb(e.__traceback__)[-1].filename).resolve().parent
    return isinstance(e, ValueError) and raised_in in PROJECT_FOLDERS


def run(main_function: Callable[[], object]) -> None:
    """Run main_function as a command: an expected failure (expected_failure) ends it with one paragraph and exit
    status 1, its traceback only when $LORASB_TRACEBACK is 1; any other error keeps its traceback."""
    try:
        main_function()
    except (DownloadError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LORASB_TRACEBACK") == "1" or not expected_failure(e):
            raise
        what_to_do = next(hint for kind, hint in WHAT_TO_DO if isinstance(e, kind))
        sys.exit(f"Stopped: {e}\n{what_to_do}, then run again. (LORASB_TRACEBACK=1 shows the traceback.)")


def refuse(problems: list[str]) -> None:
    """Exit with the problems listed; under torchrun every process finds them, process 0 prints them."""
    sys.exit("Cannot start:\n" + "\n".join(f"  - {p}" for p in problems) if os.environ.get("RANK", "0") == "0" else 1)


class MissingInputs:
    """Call it with a function that fetches an input (the model folder, a data file): its result, or None once the
    input is found missing (offline: a DownloadError; a path that does not exist), noted so that refuse_if_any
    reports every missing input in one run. $LORASB_TRACEBACK=1 shows the first one's traceback instead."""

    def __init__(self):
        self.missing = []

    def __call__(self, fetch: Callable[[], object]):
        try:
            return fetch()
        except (DownloadError, FileNotFoundError) as e:
            if os.environ.get("LORASB_TRACEBACK") == "1":
                raise
            self.missing.append(str(e))

    def refuse_if_any(self) -> None:
        if self.missing:
            refuse([*dict.fromkeys(self.missing), "check the connection, or pass local files as each line says"])


def why_not_written(e: BaseException, folder: Path) -> str:
    """A failed write, said plainly: the disk is full (with the free space), or the error."""
    free = shutil.disk_usage(folder).free / 2**20
    return f"{'the disk is full' if disk_is_full(e) else e} ({free:.0f} MiB free there)"


def remedy(e: BaseException) -> str:
    """What to do about a failed write."""
    return "make room" if disk_is_full(e) else "fix that"


@contextmanager
def stop_if_a_write_fails(out: Path, resumable: bool, what: str = "the outputs") -> Iterator[None]:
    """What a run writes besides its checkpoints (the run record before the first step; after training the adapter,
    its PEFT export or the model folder, the predictions, summary.json): a write that fails (a full disk) stops the
    run with one message, not a traceback. The checkpoints stay as they are, so --resume redoes the end; a run
    without one (an --eval_only run, or one stopped before its first step) is run again."""
    try:
        yield
    except OSError as e:
        again = ("run again with --resume: it writes them from the last checkpoint (which is intact)" if resumable
                 else "run again with --overwrite")
        sys.exit(f"Stopped: {what} could not be written to {out}: {why_not_written(e, out)}. "
                 f"{remedy(e).capitalize()}, then {again}.")


def disk_is_full(e: BaseException | None) -> bool:
    """Whether ENOSPC (or a full quota) is anywhere in an exception's chain."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False
