"""How a command (train_gsm8k.py, the experiments) ends on a failure a user meets and fixes: one paragraph, the error's
message and what to do, exit status 1; the traceback only on request ($LORASB_TRACEBACK=1). A bug keeps its
traceback."""

import os
import sys
import traceback
from pathlib import Path
from typing import Callable

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
