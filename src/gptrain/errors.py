"""What the user sees when something goes wrong: UserError (a mistake they can fix: one line, exit 2),
a crash report (one line, the traceback in a file, exit 1), and the table of exit codes."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path


class UserError(Exception):
    """Bad input (file, flag, config, corpus). The message says what is wrong and what to do.

    is_echo: the same error that rank 0 already reports (other ranks exit quietly with it).
    """

    def __init__(self, message: str, *, is_echo: bool = False) -> None:
        super().__init__(message)
        self.is_echo = is_echo


def rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", 0)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 0


class RunStopped(Exception):
    """The run cannot go on, for a reason its message states (not a bug, not a mistake in the input):
    the CLI prints it as one line and exits with code 1. The last checkpoint is intact."""


class TrainingDiverged(RunStopped):
    """The run kept producing bad steps after its rollbacks (train/recovery.py)."""


class OutOfSpace(RunStopped):
    """A checkpoint does not fit on the disk, or the disk filled while one was written."""


EXIT_CODES = {0: "finished, or stopped after saving (SIGTERM, SIGHUP, a stop command, torchrun)",
              1: "a crash (not your mistake): the traceback is written to a file named on stderr",
              2: "a mistake in the command, config or input: one line says what to change",
              130: "stopped by Ctrl-C (after saving, when training; a second Ctrl-C leaves at once)"}


def report_crash(e: Exception) -> int:
    """One line for a crash that is not the user's mistake, and the whole traceback in a file: the run
    directory's crash.log when the run had one, else a file in the temporary folder."""
    run_dir = getattr(e, "run_dir", None)
    suffix = f"-rank{rank()}" if rank() else ""
    path = Path(run_dir) / f"crash{suffix}.log" if run_dir and Path(run_dir).is_dir() else \
        Path(tempfile.gettempdir()) / f"gptrain-crash-{os.getpid()}.log"
    text = f"{datetime.now():%Y-%m-%d %H:%M:%S} gptrain {' '.join(sys.argv[1:])}\n" + "".join(
        traceback.format_exception(e))
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
        where = f"the traceback is in {path}"
    except OSError:
        where = "the traceback follows"
        print(text, file=sys.stderr)
    first = (str(e).splitlines() or [""])[0][:300]
    print(f"gptrain: crashed{f' (rank {rank()})' if rank() else ''}: {type(e).__name__}: {first} ({where}; "
          "checkpoints already written are intact: --resume continues from the last one)", file=sys.stderr)
    return 1


def is_lost_peer(e: Exception) -> bool:
    """A collective that failed because a peer process went away (gloo or NCCL), not this rank's bug."""
    text = str(e)
    return "Connection closed by peer" in text or "Connection reset by peer" in text or "NCCL communicator" in text
