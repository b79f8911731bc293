"""Run under torchrun by the tests: a rank's host memory while ftloop loads a model and takes one step.

Usage: torchrun ... tests/memory_worker.py OUT_PREFIX -- <ftloop.train flags>
Each rank writes OUT_PREFIX.rank<R>.json with (MiB) its peak RSS growth while FSDP wraps the model and its
weights are read, its RSS after the first optimizer step minus its RSS before that (the parameters, gradients
and optimizer state it holds), and the memory plan's figures for the same flags. Run with MALLOC_MMAP_THRESHOLD_ low, so
that freed memory leaves the RSS.
"""

import json
import re
import sys

import torch.distributed as dist

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
    with open(f"{prefix}.rank{d.rank}.json", "w") as f:
        json.dump({"load_peak_mib": measured["load_peak"], "after_step_mib": after_step,
                   "plan_persistent_mib": (plan.sharded_parameters.nbytes + plan.gradients.nbytes
                                           + plan.optimizer_state.nbytes) / 2**20}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
