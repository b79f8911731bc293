"""The run's state: everything a checkpoint must bring back for training to continue exactly where it was.

`TrainState.state_dict()` is what `trainer_state.json` holds (with the dtypes and world size the checkpoint
adds), and `load_state_dict` is its inverse: the one place where a new piece of state is saved and restored.
The tensors (model, optimizer, generators) are ftloop.fsdp.checkpoint's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ftloop.data.sampler import StepBatchSampler


@dataclass
class BestEval:
    """The lowest eval loss so far and the step it was measured at (None: no evaluation yet)."""
    eval_loss: float = math.inf
    step: int | None = None


@dataclass
class TrainState:
    scheduler: torch.optim.lr_scheduler.LRScheduler  # the learning rate of the next step
    sampler: StepBatchSampler  # epoch and row position of the next step
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    bad_steps_in_a_row: int = 0  # non-finite steps since the last good one
    tokens_seen: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    """Real tokens and padded positions of every step so far, on all ranks."""
    best: BestEval = field(default_factory=BestEval)
    wandb_run_id: str | None = None  # the wandb run a resumed run continues

    def finish_step(self, step_tokens: torch.Tensor, finite: bool) -> None:
        """Count one optimizer step (applied, or skipped for a non-finite gradient: the data moves on)."""
        self.step += 1
        self.sampler.advance()
        self.tokens_seen += step_tokens
        self.bad_steps_in_a_row = 0 if finite else self.bad_steps_in_a_row + 1

    def state_dict(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "tokens_seen": self.tokens_seen.tolist(), "best_eval_loss": self.best.eval_loss,
                "best_step": self.best.step, "bad_steps_in_a_row": self.bad_steps_in_a_row,
                "wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, saved: dict) -> None:
        self.step = saved["step"]
        self.scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler sets the lr of the next step; loading its state does not
        self.sampler.load_state_dict(saved["sampler"])
        self.tokens_seen.copy_(torch.tensor(saved["tokens_seen"], dtype=torch.float64))
        self.best = BestEval(saved["best_eval_loss"], saved["best_step"])
        self.bad_steps_in_a_row = saved["bad_steps_in_a_row"]
        self.wandb_run_id = saved.get("wandb_run_id")
