"""The errors a user sees, in one place: every ftloop module imports them from here, and this module imports
nothing of ftloop's.

Each is raised with one line that names the flag, file or row and says what to do, and carries the exit code the
process leaves with; `ftloop.cli.run_command` turns them into that line on stderr, never a traceback.
`one_line` is how a library's exception becomes part of such a line.
"""

from __future__ import annotations

import re
import signal

WORKER_TRACEBACK = "Traceback (most recent call last)"  # a DataLoader worker's error carries the worker's traceback


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the flag and what to do."""
    exit_code = 2


class DataError(ValueError):
    """A problem with the user's data; the message names file and row."""
    exit_code = 2


class DataErrors(DataError):
    """Several bad rows: one line each, all reported before the run stops. `last_word` is what the run ends with,
    where a user looks first (the end of the output, torchrun's closing summary): the first few rows and the
    count, not a count whose reasons scrolled away."""
    shown_last = 3

    def __init__(self, lines: list[str], hint: str):
        super().__init__("\n".join(lines + [hint]))
        self.lines = lines + [hint]
        first = lines[:self.shown_last]
        again = [f"the first {len(first)} of them again:", *first] if len(lines) > self.shown_last else []
        self.last_word = again + [hint] if again else first + [hint]


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
    exit_code = 1


class Stopped(Exception):
    """A stop signal reached a rank (every rank raises it at the same step, ftloop.data.loaders.StepBatches); the
    loop saves `checkpoint` and lets it through. The process exits with 128 + the signal number, so that a
    torchrun with --max-restarts starts the job again (and --resume-from-checkpoint auto continues it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.step, self.checkpoint = signum, None, None
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return (f"stopped by {name} after step {self.step}; checkpoint {self.checkpoint} saved; "
                "continue with --resume-from-checkpoint auto")


def one_line(err: BaseException, with_type: bool = False) -> str:
    """The one line of a library's exception that a user's line quotes: its type when it says nothing, the original
    error (the last line) when it arrives wrapped in a DataLoader worker's traceback, else its first line;
    `with_type`: after its type's name, for errors whose message alone does not say what went wrong."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    if WORKER_TRACEBACK in text:  # its last line is "<module>.<Type>: <message>"
        line = re.sub(r"^[A-Za-z_][\w.]*: ", "", text.splitlines()[-1])
    else:
        line = text.splitlines()[0]
    return f"{type(err).__name__}: {line}" if with_type else line
