"""Faults the tests inject into real runs, passed in as an object: ftloop never reads them from a flag or the
environment.

`ftloop.train.main(argv, faults)` takes a `Faults`; the tests' `tests/faulty_train.py` builds one from its
own options and runs the real entry point under torchrun. Every other run gets `NO_FAULTS`, whose hooks do
nothing.
"""

from __future__ import annotations

import math
import time

import torch.distributed as dist
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    nan_gradient_at_steps: frozenset[int] = frozenset()
    """Optimizer steps (1-based) whose gradient gets a NaN after backward (the non-finite-step guard's test)."""
    nan_gradient_on_rank: int | None = None
    """Only this rank's gradient gets the NaN (None: every rank's)."""
    raise_at_step: int = 0
    """The optimizer step (1-based) after whose backward every rank raises a RuntimeError: the way out of a bug."""
    pause_after_shards_s: float = 0.0
    """Seconds each rank waits after writing its checkpoint shards, before the folder is renamed (the window in
    which a kill test strikes)."""

    def after_backward(self, model, step: int) -> None:
        if step == self.raise_at_step:
            raise RuntimeError(f"fault injected at step {step}")
        if step in self.nan_gradient_at_steps and self.nan_gradient_on_rank in (None, dist.get_rank()):
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan

    def after_shards_written(self) -> None:
        if self.pause_after_shards_s:
            time.sleep(self.pause_after_shards_s)


NO_FAULTS = Faults()
