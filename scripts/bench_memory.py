"""Per-rank host memory of a real `ftloop.train` run on CPU, beside the memory plan: `python scripts/bench_memory.py`.

Builds random Qwen2.5-VL folders of one width (one decoder layer is the same FSDP unit in every folder) and
several depths (no download), then runs `torchrun --nproc_per_node W -m ftloop.train` for a few optimizer steps
(fp32 on the CPU, gloo, gradient checkpointing, micro-batches of one row) for every world size and gradient
accumulation asked for. Each rank records
  - load: its peak RSS growth from just before `prepare()` (config, data, model loading, FSDP wrapping) to its end,
  - train: its peak RSS over the training steps (the end-of-run export excluded), the peak reset after loading,
  - after step: its RSS after the last optimizer step minus its RSS before loading: what the parameters,
    gradients and optimizer state hold (large blocks go straight to mmap, so freed memory leaves the RSS),
and prints them with the plan's figures (`ftloop.plan`, from this checkout) for the same flags.

`--code DIR` runs another checkout of ftloop (e.g. `git worktree add /tmp/before HEAD~5`) with the same folders,
flags and measurement, for before/after tables measured in one run. Peak RSS is the kernel's VmHWM, reset through
/proc/self/clear_refs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(out: str, flags: list[str]) -> None:
    """Under torchrun: ftloop.train.main with probes around loading, the optimizer step and the export."""
    import ftloop.train as train

    rank = int(os.environ["RANK"])
    record: dict = {}
    prepare, build_optimizer, export_model = train.prepare, train.build_optimizer, train.export_model
    wrap_fsdp = train.wrap_fsdp

    def timed_wrap(*args, **kwargs):  # reading the weights happens while FSDP wraps the skeleton
        started = time.perf_counter()
        model = wrap_fsdp(*args, **kwargs)
        record["load_s"] = time.perf_counter() - started
        return model

    def probed_prepare(*args, **kwargs):
        record["before_mib"] = status_mib("VmRSS")
        reset_peak()
        setup = prepare(*args, **kwargs)
        record["load_peak_mib"] = status_mib("VmHWM") - record["before_mib"]
        reset_peak()
        return setup

    def probed_build_optimizer(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        step = type(optimizer).step

        def probed_step(self, *step_args, **step_kwargs):  # the RSS right after an update, gradients still held
            result = step(self, *step_args, **step_kwargs)
            record["after_step_mib"] = status_mib("VmRSS") - record["before_mib"]
            return result

        optimizer.step = types.MethodType(probed_step, optimizer)  # a bound method, as LR schedulers expect
        return optimizer

    def probed_export(*args, **kwargs):
        record.setdefault("train_peak_mib", status_mib("VmHWM") - record["before_mib"])
        return export_model(*args, **kwargs)

    train.prepare, train.build_optimizer, train.export_model = probed_prepare, probed_build_optimizer, probed_export
    train.wrap_fsdp = timed_wrap
    train.main(flags)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(record, f)


def run_flags(folder: str, bundle: dict, out: str, accumulation: int, steps: int) -> list[str]:
    return ["--model-name-or-path", folder, "--train-data", bundle["train_json"], "--image-folder",
            bundle["image_folder"], "--output-dir", out, "--max-steps", str(steps), "--no-bf16",
            "--gradient-accumulation-steps", str(accumulation), "--per-device-train-batch-size", "1",
            "--max-seq-length", "256", "--logging-steps", "1", "--eval-steps", "1000", "--save-steps", "0",
            "--max-shard-size", "50MB", "--report-to", "none", "--dataloader-num-workers", "0"]


def measure(code: str, world: int, flags: list[str], tmp: str) -> dict:
    """Every rank's record of one torchrun (a list of dicts by rank)."""
    prefix = os.path.join(tmp, "probe")
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", PYTHONPATH=code + os.pathsep + REPO)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               os.path.abspath(__file__), "--worker", prefix, "--", *flags]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    ranks = []
    for rank in range(world):
        with open(f"{prefix}.rank{rank}.json") as f:
            ranks.append(json.load(f))
        os.remove(f"{prefix}.rank{rank}.json")
    return {"ranks": ranks, "seconds": time.perf_counter() - started}


def plan_for(flags: list[str], world: int) -> dict:
    """The plan's per-rank figures (MiB) for the same flags, from this checkout's ftloop.plan."""
    sys.path.insert(0, REPO)
    from ftloop.plan import parse

    _, plan = parse(flags + ["--nproc-per-node", str(world)]).plan()
    persistent = plan.sharded_parameters.nbytes + plan.gradients.nbytes + plan.optimizer_state.nbytes
    # The CUDA reserve means nothing on a CPU run: the peak without it.
    return {"persistent_mib": persistent / 2**20, "total_mib": (plan.peak_bytes - plan.reserve.nbytes) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[11, 33], help="depths (one folder each)")
    parser.add_argument("--hidden", type=int, default=1024, help="text width (multiple of 64)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--every-rank", action="store_true",
                        help="also load with --load-weights-on every-rank and compare the load times")
    parser.add_argument("--code", default=REPO, help="the ftloop checkout to run (default: this one)")
    parser.add_argument("--train-flags", default="", help="more ftloop.train flags for every run, as one string "
                        "(e.g. '--freeze-llm --unfreeze-topk-llm 1'); the plan gets them too")
    parser.add_argument("--worker", metavar="PREFIX", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, rest[rest.index("--") + 1:] if "--" in rest else rest)
        return

    sys.path.insert(0, REPO)
    import torch
    from bench_export import build_folder

    from ftloop.demo.bundle import build_demo_bundle

    code = os.path.abspath(args.code)
    rows, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rows_needed = 16 * max(args.worlds) * max(args.accumulation)
        bundle = build_demo_bundle(os.path.join(tmp, "bundle"), num_train=rows_needed, num_eval=4, image_size=56,
                                   seed=0, model_size="test")
        for layers in args.layers:
            folder = os.path.join(tmp, f"model-{layers}")
            params = build_folder(folder, layers, args.hidden, torch.bfloat16, "200MB")  # bf16, as hub checkpoints
            for world in args.worlds:
                for accumulation in args.accumulation:
                    flags = run_flags(folder, bundle, os.path.join(tmp, "run"), accumulation, args.steps)
                    flags += shlex.split(args.train_flags)
                    result = measure(code, world, flags, tmp)
                    shutil.rmtree(os.path.join(tmp, "run"), ignore_errors=True)
                    rows.append((params, world, accumulation, result, plan_for(flags, world)))
                    print_row(*rows[-1])
                if args.every_rank:  # the other way to read the weights, for the load times
                    flags = run_flags(folder, bundle, os.path.join(tmp, "run"), 1, 1) + ["--load-weights-on",
                                                                                          "every-rank"]
                    result = measure(code, world, flags, tmp)
                    shutil.rmtree(os.path.join(tmp, "run"), ignore_errors=True)
                    rank0 = next(r for r in rows if r[0] == params and r[1] == world)[3]
                    loads.append((params, world, rank0, result))
            shutil.rmtree(folder)
    if loads:
        print("\nloading (wrap_fsdp, weights read one tensor at a time): seconds, slowest rank, and peak RSS growth")
        print(f"{'params':>7} {'W':>2} {'rank0 s':>8} {'every-rank s':>12} {'rank0: r0 MiB':>13} "
              f"{'every-rank: r0 MiB':>18}")
        for params, world, rank0, every in loads:
            print(f"{params / 1e6:>6.0f}M {world:>2} {max(r['load_s'] for r in rank0['ranks']):>8.1f} "
                  f"{max(r['load_s'] for r in every['ranks']):>12.1f} {rank0['ranks'][0]['load_peak_mib']:>13.0f} "
                  f"{every['ranks'][0]['load_peak_mib']:>18.0f}")


def print_row(params: int, world: int, accumulation: int, result: dict, plan: dict | None) -> None:
    ranks = result["ranks"]
    others = ranks[1:] or ranks
    planned = (f"{plan['persistent_mib']:>9.0f} {plan['total_mib']:>9.0f}" if plan else f"{'-':>9} {'-':>9}")
    if not hasattr(print_row, "header"):
        print_row.header = True
        print(f"{'params':>7} {'W':>2} {'acc':>3} {'load r0':>8} {'load r>0':>8} {'train r0':>8} {'train r>0':>9} "
              f"{'step r0':>8} {'step r>0':>8} {'plan p+g+s':>9} {'plan tot':>9} {'run s':>6}   (MiB per rank)")
    print(f"{params / 1e6:>6.0f}M {world:>2} {accumulation:>3} {ranks[0]['load_peak_mib']:>8.0f} "
          f"{max(r['load_peak_mib'] for r in others):>8.0f} {ranks[0]['train_peak_mib']:>8.0f} "
          f"{max(r['train_peak_mib'] for r in others):>9.0f} {ranks[0]['after_step_mib']:>8.0f} "
          f"{max(r['after_step_mib'] for r in others):>8.0f} {planned} {result['seconds']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
