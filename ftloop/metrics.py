"""Where numbers go: the console (rank 0), output_dir/metrics.jsonl, and wandb; and the window of steps
between two log lines."""

from __future__ import annotations

import json
import os
import sys
import resource
import time

import torch

from ftloop.distributed import World, all_reduce_sum


def _have_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8", errors="ignore").read()


def finish_reporting(exit_code: int) -> None:
    """Close a wandb run still open (a run that failed), with its exit code: the process leaves with os._exit
    (ftloop.distributed.leave), so wandb's own exit hook does not run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


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


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StepWindow:
    """Sums over the steps since the last log line, kept on the device and read on the host only when logged
    (a read waits for the device)."""

    def __init__(self, world: World):
        self.world = world
        self._restart()

    def _restart(self) -> None:
        world = self.world
        self.loss = torch.zeros((), device=world.device)  # this rank's shares of the steps' mean losses
        self.tokens = torch.zeros(2, dtype=torch.float64, device=world.device)  # real tokens, padded positions
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss_share: torch.Tensor, step_tokens: torch.Tensor) -> None:
        self.loss += loss_share
        self.tokens += step_tokens
        self.steps += 1

    def log(self, logger: MetricsLogger, progress, step: int, lr: float, grad_norm: float, epoch: int,
            tokens_seen: int) -> None:
        """One record of the window (its loss summed over ranks: collective) to metrics.jsonl and wandb, the
        progress bar's loss and tokens/s; then a new window."""
        elapsed = time.perf_counter() - self.started
        record = {"loss": float(all_reduce_sum(self.loss.view(1), self.world.device)) / self.steps, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": float(self.tokens[0]) / elapsed,
                  "step_time_s": elapsed / self.steps, "padding_ratio": 1 - float(self.tokens[0] / self.tokens[1]),
                  "peak_mem_gib": peak_memory_gib(self.world.device), "epoch": epoch, "tokens_seen": tokens_seen}
        logger.log(step, record)
        progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self._restart()
