"""When the loop saves, evaluates, keeps the best weights and gives up: each policy a small object.

- `Saver`: a checkpoint every --save-steps steps (none at the last step: `final` is exported then), one when
  the run is stopped, never two of one step; older ones pruned to --save-total-limit, the best's kept; a save
  slower than --save-grace-s said before the next.
- `Evaluator`: the eval loss every --eval-steps steps, at the last step, and before the first with
  --eval-on-start; a new lowest is exported as `best` (on disk only) and read back at the end.
- `skip_nonfinite_step`: a step whose gradient norm is not finite is skipped and said; too many in a row stop
  the run, naming the last good checkpoint (`last_good_checkpoint`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.config import Config, TrainArgs
from ftloop.data.model_folder import INPUTS
from ftloop.distributed import World, print0
from ftloop.errors import TrainingError
from ftloop.fsdp.checkpoint import TRAINER_STATE, complete_checkpoints, prune_checkpoints, save_checkpoint
from ftloop.fsdp.load import load_weights_into, open_adapters, open_weights
from ftloop.hf_folder import local_folder, meta_skeleton
from ftloop.lora import ADAPTER_DIR, is_adapter
from ftloop.metrics import MetricsLogger
from ftloop.model import DTYPES, WRAPPER_PREFIX
from ftloop.state import TrainState
from ftloop.steps import evaluate


class Saver:
    def __init__(self, model: FSDP, optimizer, state: TrainState, cfg: Config, logger: MetricsLogger,
                 write_model_files: Callable[[str], None], world: World, resumed: bool,
                 inputs: dict | None = None):
        """`inputs`: what the run trains with (ftloop.data.model_folder.input_fingerprints), recorded in every
        checkpoint's trainer_state.json, where a resume compares it (ftloop.data.model_folder.check_same_inputs)."""
        self.model, self.optimizer, self.state, self.cfg, self.logger = model, optimizer, state, cfg, logger
        self.write_model_files, self.world, self.inputs = write_model_files, world, inputs
        self.last_saved = state.step if resumed else None  # the checkpoint resumed from is this step's
        self.last_save_s = 0.0

    def due(self, total_steps: int) -> bool:
        every = self.cfg.train.save_steps
        return bool(every) and self.state.step % every == 0 and self.state.step < total_steps

    def save(self) -> str:
        """Write `checkpoint-<step>` (collective); its path."""
        args, step = self.cfg.train, self.state.step
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        if self.last_saved == step:
            return path
        if self.last_save_s > args.save_grace_s:
            print0(f"checkpoint-{step}: the last save took {self.last_save_s:.1f} s, more than --save-grace-s "
                   f"{args.save_grace_s:g}: a preemption's save may be killed before it ends; give the scheduler "
                   "and torchrun a longer grace (README: Preemption)")
        started = time.perf_counter()
        trainer_state = self.state.state_dict()
        if self.inputs is not None:
            trainer_state[INPUTS] = self.inputs
        save_checkpoint(self.model, self.optimizer, path, trainer_state, self.cfg.to_dict(), self.write_model_files,
                        self.world)
        if self.world.is_main and args.save_total_limit:
            prune_checkpoints(args.output_dir, args.save_total_limit, protected_step=self.state.best.step)
        self.last_save_s = time.perf_counter() - started
        self.logger.log(step, {"checkpoint_save_s": self.last_save_s})
        self.last_saved = step
        return path


class Evaluator:
    def __init__(self, model: FSDP, loader, state: TrainState, cfg: Config, logger: MetricsLogger,
                 export: Callable[[str], None], hf_config, world: World):
        """`loader`: the evaluation batches (None: no evaluation); `export(folder)` writes the weights there."""
        self.model, self.loader, self.state, self.cfg, self.logger = model, loader, state, cfg, logger
        self.export, self.hf_config, self.world = export, hf_config, world
        self.best_dir = os.path.join(cfg.train.output_dir, "best")
        self.lora = bool(cfg.lora.lora_rank)  # `best` then holds the adapters alone: all else is frozen

    def due(self, total_steps: int) -> bool:
        return self.state.step % self.cfg.train.eval_steps == 0 or self.state.step == total_steps

    def __call__(self) -> None:
        """Evaluate at the current step (collective) and keep the record of the best."""
        if self.loader is None:
            return
        step, best = self.state.step, self.state.best
        eval_loss = evaluate(self.model, self.loader, self.world.device)
        improved = eval_loss < best.eval_loss
        if improved:  # the weights stay on disk, read back at the end: no copy in memory
            best.eval_loss, best.step = eval_loss, step
            if step > 0 or self.lora:  # step 0's weights are the folder the run started from (not its adapters)
                self.export(self.best_dir)
        self.logger.log(step, {"eval_loss": eval_loss, "best_eval_loss": best.eval_loss, "best_step": best.step})
        print0(f"step {step}: eval_loss {eval_loss:.4f}" + (" (best)" if improved else ""))

    def restore_best(self) -> None:
        """With --load-best-model-at-end, put the best weights back into the model (collective), unless they are
        the ones it holds. They stream from disk one FSDP unit at a time, read by rank 0, which wrote them: the
        `best` export (in --save-dtype, which `final` is written in too), or for step 0 the starting folder."""
        best, cfg = self.state.best, self.cfg
        if not cfg.train.load_best_model_at_end or best.step is None or best.step == self.state.step:
            return
        if self.lora:  # the rest is frozen: read by rank 0, which wrote them, and broadcast
            adapters = open_adapters(os.path.join(self.best_dir, ADAPTER_DIR), self.model, WRAPPER_PREFIX, self.world)
            load_weights_into(self.model, adapters, self.world, prefix=WRAPPER_PREFIX, only=is_adapter)
            print0(f"loaded the best adapters back (step {best.step}, eval_loss {best.eval_loss:.4f}) from "
                   f"{self.best_dir}")
            return
        source = self.best_dir if best.step > 0 else cfg.model.model_name_or_path
        weights = open_weights(lambda: source if best.step > 0 else local_folder(source),
                               meta_skeleton(self.hf_config, DTYPES[cfg.model.param_dtype]),
                               "--load-best-model-at-end", self.world, every_rank_reads=False)
        load_weights_into(self.model, weights, self.world, prefix=WRAPPER_PREFIX)
        if weights is not None:
            weights.close()
        print0(f"loaded the best weights back (step {best.step}, eval_loss {best.eval_loss:.4f}) from {source}")


def last_good_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in `output_dir` saved right after an applied update (its trainer_state.json's
    step > 0 and bad_steps_in_a_row 0: the step it was saved at was finite); None when there is none.

    Why: a skipped step changes neither the weights nor the optimizer state, so a checkpoint saved after one holds
    no more training than the one saved right after the last applied update, only a later place in the data: past
    rows that were never trained on. A good checkpoint is one that holds the state as its last update left it;
    resuming there (with a lower learning rate, the data checked, or a higher --max-bad-steps) replays every row the
    skipped steps lost. Never named, therefore: a checkpoint saved inside the streak that stopped the run; one whose
    steps since the checkpoint before were all skipped (its last step is one of them); any checkpoint of a run that
    never applied an update (every step skipped: NaN in the model's weights, a learning rate that diverges at once),
    which holds only the weights it started from. Conservative where a checkpoint's last step alone was skipped (one
    bad batch the next step got past): the checkpoint before it is named. Checkpoints of the runs before a resume
    count alike (each records its own state); one whose trainer_state.json cannot be read is passed over."""
    for step, path in reversed(complete_checkpoints(output_dir)):
        try:
            with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and step > 0 and saved.get("bad_steps_in_a_row") == 0:
            return path
    return None


def skip_nonfinite_step(state: TrainState, grad_norm: float, logger: MetricsLogger, args: TrainArgs) -> None:
    """Say that the step just counted was skipped (no update; optimizer state untouched; the data and the
    schedule moved on); after --max-bad-steps of them in a row, stop the run with a TrainingError that names the
    checkpoint to go back to (`last_good_checkpoint`)."""
    step, bad = state.step, state.bad_steps_in_a_row
    logger.log(step, {"skipped_nonfinite_step": True, "grad_norm": grad_norm, "bad_steps_in_a_row": bad})
    print0(f"step {step}: non-finite loss or gradient norm ({grad_norm}); step skipped ({bad} in a row, "
           f"--max-bad-steps {args.max_bad_steps})")
    if bad >= args.max_bad_steps:
        kept = last_good_checkpoint(args.output_dir)
        raise TrainingError(f"{bad} non-finite steps in a row (up to step {step}); the last good checkpoint is "
                            f"{kept or 'none (none was saved right after an applied update; --save-steps)'}; lower "
                            "--learning-rate, check the data, or raise --max-bad-steps")
