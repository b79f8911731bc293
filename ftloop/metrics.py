"""Where numbers go: the console (rank 0), output_dir/metrics.jsonl, and wandb; and the window of steps
between two log lines."""

from __future__ import annotations

import json
import os
import sys
import resource
import time

import torch

from ftloop.data.loaders import Step
from ftloop.distributed import World, all_gather_rows, print0
from ftloop.flops import FlopModel


def _have_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8", errors="ignore").read()


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so call sites need no rank checks."""

    def __init__(self, output_dir: str, enabled: bool, report_to: str, project: str, run_name: str,
                 config: dict, wandb_id: str | None = None):
        """`wandb_id`: the wandb run a resumed run continues (recorded in its checkpoint)."""
        self.enabled = enabled
        self.wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.file = open(self.path, "a", encoding="utf-8")
        if report_to == "wandb":
            import wandb

            mode = None
            if not _have_wandb_credentials():
                mode = "offline"
                print("wandb: no credentials found (WANDB_API_KEY or `wandb login`); logging offline to "
                      f"{output_dir}/wandb; upload later with `wandb sync`", flush=True)
            self.wandb = wandb.init(project=project, name=run_name or os.path.basename(os.path.abspath(output_dir)),
                                    dir=output_dir, config=config, mode=mode, id=wandb_id,
                                    resume="allow" if wandb_id else None)
            self.wandb_id = self.wandb.id

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def memory_peaks(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) GiB at their highest since the last call (or the start), then a new window. On CUDA the
    caching allocator's peaks: allocated is what tensors held, reserved what the allocator took from the GPU (the
    figure an out-of-memory error is about). On the CPU both are the process's peak resident memory (Linux:
    VmHWM, which clear_refs resets; elsewhere the lifetime peak)."""
    if device.type == "cuda":
        peaks = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peaks[0] / 2**30, peaks[1] / 2**30
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return peak, peak


class StepWindow:
    """Sums over the steps since the last log line, kept on the device and read on the host only when logged
    (a read waits for the device)."""

    DATA_WAIT_WARNING = 0.10  # of the step time: above it, the GPUs are idle waiting for data

    def __init__(self, world: World, loader_workers: int, flops: FlopModel | None = None,
                 peak_flops: float | None = None):
        """`flops`, `peak_flops` (of one device): the model's FLOPs per step and the device's peak, for `mfu`
        (ftloop.flops); without a peak there is no `mfu`."""
        self.world, self.loader_workers = world, loader_workers
        self.flop_model, self.peak_flops = flops, peak_flops
        self.warned, self.first = False, True
        self._restart()

    def _restart(self) -> None:
        world = self.world
        self.loss = torch.zeros((), device=world.device)  # this rank's shares of the steps' mean losses
        self.tokens = torch.zeros(2, dtype=torch.float64, device=world.device)  # real tokens, padded positions
        self.rank_balance = torch.zeros((), dtype=torch.float64, device=world.device)
        self.flops = torch.zeros((), dtype=torch.float64, device=world.device)  # model FLOPs, all ranks
        self.data_wait = 0.0  # seconds this rank waited for its micro-batches
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss_share: torch.Tensor, step: Step) -> None:
        """A step that was applied, with this rank's share of its mean loss."""
        self.loss += loss_share
        self.tokens += step.tokens
        self.rank_balance += step.rank_balance
        if self.flop_model is not None:
            self.flops += self.flop_model.step_flops(step.tokens[0], step.targets, step.work[0], step.work[1])
        self.data_wait += step.data_wait
        self.steps += 1

    def log(self, logger: MetricsLogger, progress, step: int, lr: float, grad_norm: float, epoch: int,
            tokens_seen: int) -> None:
        """One record of the window (its loss summed over ranks; the data wait of the rank that waited most, and
        the memory peaks of the rank that held most: collective) to metrics.jsonl and wandb, the progress bar's
        loss, tokens/s and data wait; then a new window. The most, not the mean: every rank waits for the slowest
        at the step's first collective, and the fullest GPU is the one that runs out."""
        elapsed = time.perf_counter() - self.started
        allocated, reserved = memory_peaks(self.world.device)
        ranks = all_gather_rows([float(self.loss), self.data_wait, allocated, reserved], self.world.device)
        record = {"loss": float(ranks[:, 0].sum()) / self.steps, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": float(self.tokens[0]) / elapsed,
                  "step_time_s": elapsed / self.steps,
                  "data_wait_s": float(ranks[:, 1].max()) / self.steps,
                  "padding_ratio": 1 - float(self.tokens[0] / self.tokens[1]),
                  "rank_tokens_max_over_mean": float(self.rank_balance) / self.steps,
                  "peak_allocated_gib": float(ranks[:, 2].max()), "peak_reserved_gib": float(ranks[:, 3].max()),
                  "epoch": epoch, "tokens_seen": tokens_seen}
        shown = {}
        if self.peak_flops and self.flop_model is not None:  # the work of all ranks over all their peaks
            record["mfu"] = float(self.flops) / elapsed / (self.peak_flops * self.world.world_size)
            shown["mfu"] = f"{record['mfu']:.1%}"
        logger.log(step, record)
        progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", **shown,
                             wait=f"{record['data_wait_s']:.2f}s")
        self._warn_if_waiting(record["data_wait_s"], record["step_time_s"])
        self._restart()

    def _warn_if_waiting(self, data_wait: float, step_time: float) -> None:
        """Once per run: the first window is left out (it holds the workers' start-up)."""
        first, self.first = self.first, False
        if first or self.warned or data_wait <= self.DATA_WAIT_WARNING * step_time:
            return
        self.warned = True
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print0(f"ftloop: warning: steps spend {data_wait / step_time:.0%} of their time waiting for data "
               f"(data_wait_s {data_wait:.2f} of step_time_s {step_time:.2f}): raise --dataloader-num-workers "
               f"(now {self.loader_workers} per process; {cpus} CPUs here for {self.world.local_world_size} "
               "processes, each worker needs one), or lower "
               "--max-pixels to make images cheaper to prepare", file=sys.stderr)
