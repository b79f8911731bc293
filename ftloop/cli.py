"""How every ftloop command ends: `python -m ftloop.train`, `ftloop.plan`, `ftloop.export` and `ftloop.data.check`
each run their `main(argv)` through `run_command`, the one way out.

- A user error (ftloop.errors: a bad flag, file or row, a run that cannot go on, a stop signal) is its one line
  on stderr, said once for the whole run (a row that failed on one rank is said by that rank), and its exit code:
  2 for flags and data, 1 for a run that cannot go on, 128 + the signal for a stop.
- Anything else (a bug, a lost peer, a second Ctrl-C) is Python's traceback and exit 1 (130 for Ctrl-C).
- Under torchrun the line also goes to torch elastic's error file, so the launcher's closing summary says it.
- A wandb run still open is closed with the code, the process group is taken down, and the process leaves with
  `ftloop.distributed.leave` (not through the interpreter's teardown, where gloo's threads can abort it).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Callable, NoReturn

import torch.distributed as dist

from ftloop.distributed import leave
from ftloop.errors import ConfigError, DataError, Stopped, TrainingError, one_line

USER_ERRORS = (ConfigError, DataError, TrainingError, Stopped)


def run_command(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run `main(argv)` and leave the process with its exit code (its return value, 0 for None)."""
    try:
        code = main(argv) or 0
    except SystemExit as err:  # tyro's --help and usage errors have said what they had to say
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
        code = err.code if isinstance(err.code, int) else 0 if err.code is None else 1
    except USER_ERRORS as err:
        code = err.exit_code
        say(err)
    except BaseException as err:
        traceback.print_exc()
        code = 130 if isinstance(err, KeyboardInterrupt) else 1
    finish_reporting(code)
    if dist.is_initialized():
        dist.destroy_process_group()
    leave(code)


def finish_reporting(exit_code: int) -> None:
    """Close a wandb run still open (a run that failed), with its exit code: the process leaves with os._exit, so
    wandb's own exit hook does not run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def say(err: BaseException) -> None:
    """A user error's lines on stderr: by rank 0 (every rank stops with the same one), or by the rank whose row
    failed; and its last word (its one line, or the first bad rows and their count) to the launcher, from every
    rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    on_this_rank = getattr(err, "on_this_rank", False)
    prefix = "ftloop: " if isinstance(err, Stopped) else "ftloop: error: "
    prefix += f"[rank {rank}] " if on_this_rank else ""
    said = getattr(err, "lines", None) or [one_line(err)]
    lines = [prefix + line for line in said]
    last_word = [prefix + line for line in getattr(err, "last_word", None) or said[-1:]]
    if len(lines) > len(last_word):  # many bad rows: all of them, then the first few again and the count
        lines = lines[:-1] + last_word[:-1] + lines[-1:]
    if rank == 0 or on_this_rank:
        print("\n" + "\n".join(lines), file=sys.stderr, flush=True)
    tell_launcher("\n".join(last_word))  # one line, or the first bad rows and their count


def tell_launcher(line: str) -> None:
    """Under torchrun, leave `line` in the worker's error file (torch.distributed.elastic's), so that the
    launcher's closing failure summary says what went wrong instead of `error_file: <N/A>`."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                              "timestamp": str(int(time.time()))}}}, f)
