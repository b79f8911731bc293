"""`ftloop.train` with faults injected (ftloop.faults), for the tests:

    torchrun ... tests/faulty_train.py [--fault-nan-gradient-at-steps 3,5 [--fault-nan-gradient-on-rank 1]] [--fault-pause-after-shards-s 5]
        [--fault-raise-at-step 2] FLAGS

The fault options come first; everything after them goes to ftloop.train as a user would write it.
"""

from __future__ import annotations

import sys

from ftloop.faults import Faults
from ftloop.train import cli


def split(argv: list[str]) -> tuple[Faults, list[str]]:
    options = {}
    while argv and argv[0].startswith("--fault-"):
        options[argv[0].removeprefix("--fault-").replace("-", "_")] = argv[1]
        argv = argv[2:]
    steps = options.pop("nan_gradient_at_steps", "")
    rank = options.pop("nan_gradient_on_rank", None)
    faults = Faults(nan_gradient_at_steps=frozenset(int(s) for s in steps.split(",") if s),
                    nan_gradient_on_rank=None if rank is None else int(rank),
                    pause_after_shards_s=float(options.pop("pause_after_shards_s", 0)),
                    raise_at_step=int(options.pop("raise_at_step", 0)))
    assert not options, f"unknown fault options: {sorted(options)}"
    return faults, argv


if __name__ == "__main__":
    faults, flags = split(sys.argv[1:])
    cli(flags, faults)
