"""Run under torchrun by the tests: a rank's host memory while ftloop loads a model and takes one step.

Usage: torchrun ... tests/memory_worker.py OUT_PREFIX -- <ftloop.train flags>
Each rank writes OUT_PREFIX.rank<R>.json with (MiB) its peak RSS growth while FSDP wraps the model and its
weights are read, its RSS after the first optimizer step minus its RSS before that (the parameters, gradients
and optimizer state it holds), and the memory plan's figures for the same flags; then, for one checkpoint save and
one resume from it, the collectives each called (outermost calls of torch.distributed, by name) and its peak RSS
growth, beside the size of the largest FSDP unit. Run with MALLOC_MMAP_THRESHOLD_ low, so that freed memory leaves
the RSS.
"""

import contextlib
import json
import math
import os
import re
import sys
from collections import Counter

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ftloop.fsdp.checkpoint import load_checkpoint, read_trainer_state, save_checkpoint
from ftloop.fsdp.internals import flat_shards

from ftloop.config import parse_args
from ftloop.distributed import init_distributed, leave
from ftloop.optim.build import build_optimizer
from ftloop.plan import plan_memory
from ftloop.data.loaders import count_step
from ftloop.steps import accumulate_gradients
from ftloop.model import build_skeleton, load_config
import ftloop.train as train
from ftloop.fsdp.wrap import wrap_fsdp


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
               "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather", "gather_object",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list")


@contextlib.contextmanager
def counting_collectives(counts: Counter):
    """Count the collectives called through torch.distributed while inside (an object collective once, not the
    tensor collectives it is made of)."""
    depth = [0]
    saved = {}

    def counted(name, fn):
        def call(*args, **kwargs):
            if depth[0] == 0:
                counts[name] += 1
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    for name in COLLECTIVES:
        for module in (dist, c10d):
            if hasattr(module, name):
                saved[(module, name)] = getattr(module, name)
                setattr(module, name, counted(name, saved[(module, name)]))
    try:
        yield counts
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return status_mib("VmRSS")


def checkpoint_records(model, optimizer, cfg, d) -> dict:
    """One save and one resume of the live run: their collectives and peak RSS growth (MiB)."""
    path = os.path.join(cfg.train.output_dir, "checkpoint-1")
    record = {"largest_unit_mib": max(sum(math.prod(s.shape) for s in shard.slices) * shard.flat.element_size()
                                      for shard in flat_shards(model)) / 2**20}
    saves, loads = Counter(), Counter()
    before = reset_peak()
    with counting_collectives(saves):
        save_checkpoint(model, optimizer, path, {"step": 1}, cfg.to_dict(), os.makedirs, d)
    record["save_peak_mib"] = status_mib("VmHWM") - before
    saved = read_trainer_state(path)
    before = reset_peak()
    with counting_collectives(loads):
        load_checkpoint(model, optimizer, path, saved, False, d)
    record["load_peak_mib"] = status_mib("VmHWM") - before
    record["save_collectives"], record["load_collectives"] = dict(saves), dict(loads)
    return record


def main() -> None:
    prefix = sys.argv[1]
    flags = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[2:]
    cfg = parse_args(flags)
    d = init_distributed()
    measured = {}

    def measured_wrap(*args, **kwargs):  # the weights are read while FSDP wraps the skeleton
        measured["before"] = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        model = wrap_fsdp(*args, **kwargs)
        measured["load_peak"] = status_mib("VmHWM") - measured["before"]
        return model

    train.wrap_fsdp = measured_wrap
    setup = train.prepare(cfg, d)
    optimizer = build_optimizer(setup.model, cfg.optim, d.device)
    batches = iter(setup.train_loader)
    micro_batches = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
    targets = count_step(micro_batches, d, len(micro_batches))[0].targets
    accumulate_gradients(setup.model, micro_batches, targets, d)
    optimizer.step()
    after_step = status_mib("VmRSS") - measured["before"]
    plan = plan_memory(build_skeleton(cfg, load_config(cfg.model)), cfg, d.world_size, d.world_size)
    record = {"load_peak_mib": measured["load_peak"], "after_step_mib": after_step,
              "plan_persistent_mib": (plan.sharded_parameters.nbytes + plan.gradients.nbytes
                                      + plan.optimizer_state.nbytes) / 2**20}
    record["checkpoint"] = checkpoint_records(setup.model, optimizer, cfg, d)
    with open(f"{prefix}.rank{d.rank}.json", "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
