"""The errors a user sees, in one place: every ftloop module imports them from here, and this module imports
nothing of ftloop's.

Each is raised with one line that names the flag, file or row and says what to do; `ftloop.train.main` turns
them into that line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the flag and what to do."""


class DataError(ValueError):
    """A problem with the user's data; the message names file and row."""


class DataErrors(DataError):
    """Several bad rows: one line each, all reported before the run stops."""

    def __init__(self, lines: list[str], hint: str):
        super().__init__("\n".join(lines + [hint]))
        self.lines = lines + [hint]


class RowFailedMidRun(DataError):
    """A row that failed on one rank during training, after the check before training passed it (a file
    changed since). `on_this_rank`: the row is this rank's, which says it; the other ranks stop with a pointer
    to it."""

    def __init__(self, message: str, on_this_rank: bool = True):
        super().__init__(message)
        self.on_this_rank = on_this_rank

    @classmethod
    def elsewhere(cls, ranks: int, what: str = "a row") -> RowFailedMidRun:
        """What the ranks whose rows loaded say: the rank(s) where it failed name the row."""
        return cls(f"{what} failed to load on {ranks} other rank(s), which name it; fix or remove it and resume",
                   on_this_rank=False)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why and what to do."""


class Stopped(Exception):
    """Raised after the checkpoint is saved; main exits with 128 + the signal number, so that a torchrun with
    --max-restarts starts the job again (and --resume-from-checkpoint auto continues it)."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint} saved; "
                         "continue with --resume-from-checkpoint auto")


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit, no traceback: for user errors found before training."""
    print(f"ftloop: error: {message}", file=sys.stderr, flush=True)
    tell_launcher(f"ftloop: error: {message}")
    raise SystemExit(code)


def tell_launcher(line: str) -> None:
    """Under torchrun, leave `line` in the worker's error file (torch.distributed.elastic's), so that the
    launcher's closing failure summary says what went wrong instead of `error_file: <N/A>`."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                              "timestamp": str(int(time.time()))}}}, f)
