"""`ftloop.train` with faults injected, for the tests: the real entry point, with functions of the loop patched
here (ftloop itself has no test hooks):

    torchrun ... tests/faulty_train.py [--fault-nan-gradient-at-steps 3,5 [--fault-nan-gradient-on-rank 1]]
        [--fault-raise-at-step 2] [--fault-pause-after-shards-s 5] [--fault-touch-mib-at-step 2:1:300] FLAGS

- `--fault-nan-gradient-at-steps`: these optimizer steps (1-based) get a NaN in their gradient after backward, on
  every rank or only on `--fault-nan-gradient-on-rank` (the non-finite-step guard's test);
- `--fault-raise-at-step`: every rank raises a RuntimeError after that step's backward (the way out of a bug);
- `--fault-pause-after-shards-s`: each rank waits that long after writing its checkpoint shards, before the folder
  is renamed (the window in which a kill test strikes);
- `--fault-touch-mib-at-step STEP:RANK:MIB`: that rank fills and frees MIB of memory after that step's backward
  (the memory peaks' test: one rank's passing peak in one logging window).

Steps are counted from the start of this process (the runs that use them do not resume). The fault options come
first; everything after them goes to ftloop.train as a user would write it.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

import ftloop.fsdp.checkpoint
import ftloop.train
from ftloop.cli import run_command


def split(argv: list[str]) -> tuple[dict, list[str]]:
    options = {}
    while argv and argv[0].startswith("--fault-"):
        options[argv[0].removeprefix("--fault-").replace("-", "_")] = argv[1]
        argv = argv[2:]
    return options, argv


def inject(options: dict) -> None:
    nan_steps = {int(s) for s in options.pop("nan_gradient_at_steps", "").split(",") if s}
    nan_rank = options.pop("nan_gradient_on_rank", None)
    raise_at = int(options.pop("raise_at_step", 0))
    pause = float(options.pop("pause_after_shards_s", 0))
    touch_step, touch_rank, touch_mib = (int(x) for x in options.pop("touch_mib_at_step", "0:0:0").split(":"))
    assert not options, f"unknown fault options: {sorted(options)}"
    clip, write_rank_files, steps = ftloop.train.clip_gradients, ftloop.fsdp.checkpoint.write_rank_files, [0]

    def faulty_clip(model, max_grad_norm):  # runs once per step, right after its backward
        steps[0] += 1
        if steps[0] == raise_at:
            raise RuntimeError(f"fault injected at step {steps[0]}")
        if steps[0] == touch_step and dist.get_rank() == touch_rank:
            torch.ones(touch_mib * 2**18).sum()  # float32: 4 bytes each, every page written, then freed
        if steps[0] in nan_steps and nan_rank in (None, str(dist.get_rank())):
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
        return clip(model, max_grad_norm)

    def pausing_write_rank_files(*args, **kwargs):
        dtypes = write_rank_files(*args, **kwargs)
        time.sleep(pause)
        return dtypes

    ftloop.train.clip_gradients = faulty_clip
    ftloop.fsdp.checkpoint.write_rank_files = pausing_write_rank_files


if __name__ == "__main__":
    faults, flags = split(sys.argv[1:])
    inject(faults)
    run_command(ftloop.train.main, flags)
