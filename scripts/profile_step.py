"""Two training steps under torch.profiler: what the optimizer, the vision tower and the whole step cost the host.

    python scripts/profile_step.py <ftloop.train flags>           # one process (scripts/gpu_smoke.py runs this)
    torchrun --nproc_per_node N scripts/profile_step.py <flags>   # or several

It builds the run as ftloop.train does (ftloop.train.prepare, the optimizer), takes one step to warm up, then
profiles two, and prints one line, `profile_step: {json}`, per step averages:

- optimizer_s, optimizer_launches: the optimizer step's time and its kernel launches (on CUDA the runtime's
  `cudaLaunchKernel` calls; on the CPU, where nothing is launched, the aten ops it calls instead);
- vision_launches: the same inside the vision tower's forward (ftloop.model.VisionLanguageSFT._vision);
- host_syncs: the calls that make the host wait for the device (cudaStreamSynchronize, cudaDeviceSynchronize,
  cudaEventSynchronize; on the CPU, the aten ops that would: `_local_scalar_dense`, `nonzero`), outside the
  fetch of the step's batches (the collate's host work, which a run does in its loader workers);
- step_s and mfu: the step's time (under the profiler: a little slower than without) and the model FLOPs' share
  of the devices' peak (ftloop.flops; null without a known peak: --peak-tflops on a CPU).

On CUDA the launch and sync counts are what issue 24 asks a GPU to confirm; on the CPU they are the same
mechanism counted as aten ops, which tests/test_gpu_smoke.py checks the script reports.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ftloop from this checkout

from ftloop.config import parse_args  # noqa: E402
from ftloop.data.loaders import StepBatches  # noqa: E402
from ftloop.distributed import init_distributed, leave  # noqa: E402
from ftloop.flops import peak_flops  # noqa: E402
from ftloop.model import VisionLanguageSFT  # noqa: E402
from ftloop.optim.build import build_optimizer  # noqa: E402
from ftloop.signals import StopRequest  # noqa: E402
from ftloop.steps import accumulate_gradients, clip_gradients  # noqa: E402
from ftloop.train import prepare  # noqa: E402

PROFILED_STEPS = 2
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
CPU_SYNCS = ("aten::_local_scalar_dense", "aten::nonzero")


def traced(function, name: str):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)
    return wrapper


def within(events, name: str):
    """A test: does an event begin inside one of the events called `name`, on the same thread?"""
    ranges = [(e.thread, e.time_range.start, e.time_range.end) for e in events if e.name == name]
    return lambda e: any(t == e.thread and s <= e.time_range.start < end for t, s, end in ranges)


def launched(events, cuda: bool) -> list:
    """The kernel launches: on CUDA the runtime's launch calls; on the CPU the aten ops called from outside aten
    (an op's own inner ops, `aten::to` calling `aten::copy_`, are one op to a caller)."""
    if cuda:
        return [e for e in events if e.name in LAUNCHES]
    return [e for e in events if e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]


def main() -> None:
    cfg = parse_args(sys.argv[1:])
    cfg.check()
    world = init_distributed()
    cuda = world.device.type == "cuda"
    VisionLanguageSFT._vision = traced(VisionLanguageSFT._vision, "ftloop.vision")
    setup = prepare(cfg, world)
    model = setup.model
    optimizer = build_optimizer(model, cfg.optim, world.device, cfg.train.seed)
    optimizer.step = traced(optimizer.step, "ftloop.optimizer")
    batches = StepBatches(setup.train_loader, setup.sampler, cfg.train.gradient_accumulation_steps, world,
                          StopRequest())
    model.train()

    def one_step():
        step = batches.next_step()
        accumulate_gradients(model, step.micro_batches, step.targets, world)
        clip_gradients(model, cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return setup.flops.step_flops(step.tokens[0], step.targets, step.work[0], step.work[1])

    one_step()  # warm-up: the allocator, the workers, the first all-gathers
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batches.next_step = traced(batches.next_step, "ftloop.data")  # the collate's host work, when it runs here
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        flops = sum(float(one_step()) for _ in range(PROFILED_STEPS))
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    events = profiler.events()
    launches, in_data = launched(events, cuda), within(events, "ftloop.data")
    in_optimizer, in_vision = within(events, "ftloop.optimizer"), within(events, "ftloop.vision")
    optimizer_events = [e for e in events if e.name == "ftloop.optimizer"]
    peak = peak_flops(world.device, cfg.train.peak_tflops)
    report = {
        "device": torch.cuda.get_device_name(world.device) if cuda else "cpu",
        "step_s": elapsed / PROFILED_STEPS,
        "optimizer_s": sum(e.cpu_time_total for e in optimizer_events) / 1e6 / PROFILED_STEPS,
        "optimizer_launches": sum(map(in_optimizer, launches)) / PROFILED_STEPS,
        "vision_launches": sum(map(in_vision, launches)) / PROFILED_STEPS,
        "host_syncs": sum(1 for e in events if e.name in (SYNCS if cuda else CPU_SYNCS) and not in_data(e))
        / PROFILED_STEPS,
        "mfu": flops / elapsed / (peak * world.world_size) if peak else None,
        "launch_unit": "cudaLaunchKernel" if cuda else "aten op",
    }
    if world.is_main:
        print("profile_step: " + json.dumps(report), flush=True)
    leave(0)


if __name__ == "__main__":
    main()
