"""Loop overhead: ftloop's optimizer step against a bare forward/backward/optimizer step of the same batches.

    python scripts/bench_step.py [--workdir bench_step] [--steps 80] [--batch 4] [--packing]

On the demo bundle's mixed variant, in one CPU process each (one thread, as OMP_NUM_THREADS=1 gives):
1. `python -m ftloop.train` (FSDP over one process, the DataLoader with --dataloader-num-workers workers,
   token counting, clipping, the schedule, metrics): its logged step_time_s and data_wait_s;
2. the same micro-batches, collated beforehand (ftloop's own sampler and collate), through the plain
   transformers model with ftloop's loss: forward and backward of each micro-batch, gradient clipping and an
   Adafactor step, nothing else; once with the plain Adafactor (transformers' numerics) and once with
   ftloop's shard-aware one over the layout a run hands it (each FSDP unit's parameters in one flat tensor:
   scripts/support.describe_flat_units), which tells the optimizer's cost from the loop's.
Both from the same weights; medians over the steps after the first `--warmup`. Prints both step times,
their ratio (the loop's overhead) and the share of ftloop's step spent waiting for data; then each optimizer's
time and share of its bare step, and what a GPU pays for that does not show in CPU time: the kernels one
optimizer step dispatches (aten ops that compute; views left out) and the ops that make the host wait for the
device (`.item()`, `nonzero`, boolean masks) in a micro-batch's forward and backward and in the optimizer step.
`--model-size test` runs the smaller demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForImageTextToText
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.optimization import Adafactor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ftloop.config import parse_args  # noqa: E402
from ftloop.data.encode import load_tokenizer_and_processor  # noqa: E402
from ftloop.data.loaders import StepBatches, build_loaders  # noqa: E402
from ftloop.demo.bundle import build_demo_bundle  # noqa: E402
from ftloop.demo.models import MODEL_SIZES  # noqa: E402
from ftloop.distributed import World  # noqa: E402
from ftloop.loss import supervised_tokens  # noqa: E402
from ftloop.model import VisionLanguageSFT, load_config  # noqa: E402
from ftloop.optim.adafactor import ShardedAdafactor  # noqa: E402
from ftloop.signals import StopRequest  # noqa: E402
from scripts.support import describe_flat_units  # noqa: E402


def flags(bundle: dict, out: str, args) -> list[str]:
    packing = ["--packing", "--max-seq-length", str(args.max_seq_length)] if args.packing else []
    return ["--model-name-or-path", bundle["model_dir"], "--train-data", bundle["train_json"], "--image-folder",
            bundle["image_folder"], "--output-dir", out, "--report-to", "none", "--save-steps", "0", "--no-bf16",
            "--no-gradient-checkpointing", "--learning-rate", "1e-3", "--logging-steps", "1", "--max-steps",
            str(args.steps), "--per-device-train-batch-size", str(args.batch), "--dataloader-num-workers",
            str(args.workers), *packing]


def ftloop_steps(bundle: dict, out: str, args) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "ftloop.train", *flags(bundle, out, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: ftloop failed:\n{done.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


class Counts(TorchDispatchMode):
    """Kernels (aten ops that compute; views launch nothing) and ops that wait for the device on CUDA."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.kernels = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name in ("index", "index_put_", "index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        self.syncs += name in self.SYNCING or masked
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def bare_step_times(bundle: dict, steps: list[list[dict]], sharded: bool, counts: dict) -> tuple[list, list]:
    """Seconds per step of `steps` through the plain model, and of its optimizer step; `sharded`: with ftloop's
    shard-aware Adafactor (over flat units, as in a run) instead of the plain one, to tell the optimizer's cost from
    the loop's. The second step is counted (`Counts`) into `counts`."""
    model = VisionLanguageSFT(AutoModelForImageTextToText.from_pretrained(bundle["model_dir"], dtype=torch.float32))
    model.train()
    settings = dict(lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    optimizer = ShardedAdafactor(describe_flat_units(model), **settings) if sharded else \
        Adafactor(model.parameters(), **settings)
    times, optimizer_times = [], []
    for number, micro_batches in enumerate(steps):
        started = time.perf_counter()
        targets = sum(supervised_tokens(b["labels"]) for b in micro_batches)
        for batch in micro_batches:
            loss_sum, _ = model(**batch)
            (loss_sum / targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stepping = time.perf_counter()
        optimizer.step()
        optimizer_times.append(time.perf_counter() - stepping)
        optimizer.zero_grad(set_to_none=not sharded)  # the flat units keep their gradients' memory
        times.append(time.perf_counter() - started)
        if number == 1:  # outside the timings: a micro-batch and an optimizer step under the counters
            with Counts() as micro_batch:
                loss_sum, _ = model(**micro_batches[0])
                (loss_sum / targets).backward()
            with Counts() as stepped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=not sharded)
            counts.update(micro_batch_syncs=micro_batch.syncs, optimizer_kernels=stepped.kernels,
                          optimizer_syncs=stepped.syncs)
    return times, optimizer_times


def collated_steps(bundle: dict, out: str, args) -> list[list[dict]]:
    """The micro-batches of ftloop's first steps (its sampler and collate), made before any timing."""
    cfg = parse_args(flags(bundle, out, args))
    tokenizer, processor = load_tokenizer_and_processor(bundle["model_dir"], None, None)
    loader, sampler, _ = build_loaders(cfg, tokenizer, processor, load_config(cfg.model), World.single())
    batches = StepBatches(loader, sampler, 1, World.single(), StopRequest())
    return [batches.next_step().micro_batches for _ in range(args.steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_step")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the medians")
    parser.add_argument("--batch", type=int, default=4, help="--per-device-train-batch-size")
    parser.add_argument("--workers", type=int, default=1, help="--dataloader-num-workers of the ftloop run")
    parser.add_argument("--packing", action="store_true", help="--packing, sequences of --max-seq-length")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--model-size", default="demo", choices=sorted(MODEL_SIZES))
    args = parser.parse_args()
    bundle = build_demo_bundle(os.path.join(args.workdir, f"bundle-{args.model_size}"), num_train=480, num_eval=8,
                               caption_share=0.4, model_size=args.model_size)
    records = ftloop_steps(bundle, os.path.join(args.workdir, "ftloop"), args)[args.warmup:]
    torch.set_num_threads(1)
    steps = collated_steps(bundle, os.path.join(args.workdir, "bare"), args)
    plain_counts, sharded_counts = {}, {}
    plain, sharded = (bare_step_times(bundle, steps, is_sharded, counts)
                      for is_sharded, counts in ((False, plain_counts), (True, sharded_counts)))
    bare, plain_optimizer, bare_sharded, sharded_optimizer = (statistics.median(times[args.warmup:])
                                                              for times in (*plain, *sharded))
    step = statistics.median(r["step_time_s"] for r in records)
    wait = statistics.median(r["data_wait_s"] for r in records)
    tokens = statistics.median(r["tokens_per_s"] for r in records)
    print(f"bench_step: batch {args.batch}{' packed' if args.packing else ''}, {args.steps} steps, medians after "
          f"{args.warmup}: ftloop {step * 1e3:.1f} ms/step ({tokens:.0f} tokens/s), bare {bare * 1e3:.1f} ms/step "
          f"(with ftloop's shard-aware Adafactor {bare_sharded * 1e3:.1f}); overhead {step / bare:.3f}x "
          f"({step / bare_sharded:.3f}x beside the same optimizer); data wait {wait * 1e3:.1f} ms "
          f"({wait / step:.1%} of the step)")
    plain_share, sharded_share = plain_optimizer / bare, sharded_optimizer / bare_sharded
    print(f"optimizer step: transformers' Adafactor {plain_optimizer * 1e3:.1f} ms ({plain_share:.1%} of its bare "
          f"step), ftloop's {sharded_optimizer * 1e3:.1f} ms ({sharded_share:.1%}); share {sharded_share / plain_share:.2f}x "
          f"transformers'; kernels per optimizer step {plain_counts['optimizer_kernels']} vs "
          f"{sharded_counts['optimizer_kernels']} (ftloop's); host syncs per micro-batch "
          f"{sharded_counts['micro_batch_syncs']} (the transformers model's own), per optimizer step "
          f"{plain_counts['optimizer_syncs']} vs {sharded_counts['optimizer_syncs']}")


if __name__ == "__main__":
    main()
