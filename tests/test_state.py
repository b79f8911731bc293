"""TrainState: what a checkpoint brings back is saved and restored in one place, every field of it."""

from __future__ import annotations

import dataclasses
import json

import torch

from ftloop.data.sampler import StepBatchSampler
from ftloop.distributed import World
from ftloop.optim.build import build_lr_scheduler
from ftloop.state import BestEval, TrainState


def fresh_state() -> TrainState:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, "cosine", num_warmup_steps=2, num_training_steps=10)
    sampler = StepBatchSampler(40, world_size=2, rank=0, micro_batch=2, accumulation=2, seed=3,
                               lengths=list(range(40)))
    return TrainState(scheduler, sampler)


def test_every_field_survives_a_checkpoint_round_trip():
    state = fresh_state()
    for _ in range(3):  # a run in progress: schedule, data position and counters all moved
        state.scheduler.optimizer.step()
        state.scheduler.step()
        state.finish_step(torch.tensor([7.0, 9.0], dtype=torch.float64), finite=True)
    state.finish_step(torch.tensor([1.0, 2.0], dtype=torch.float64), finite=False)
    state.best = BestEval(eval_loss=1.25, step=4)
    state.wandb_run_id = "abc123"
    saved = json.loads(json.dumps(state.state_dict()))  # as trainer_state.json holds it

    restored = fresh_state()
    restored.load_state_dict(saved)
    assert restored.state_dict() == state.state_dict()
    # A field added to TrainState without being saved under its name fails here (`best` is saved as its two
    # parts, the keys trainer_state.json has always had).
    names = {field.name for field in dataclasses.fields(TrainState)}
    assert names - {"best"} | {"best_eval_loss", "best_step"} == set(saved)
    for field in dataclasses.fields(TrainState):
        mine, theirs = getattr(state, field.name), getattr(restored, field.name)
        if field.name == "scheduler":
            assert mine.state_dict() == theirs.state_dict()
        elif field.name == "sampler":
            assert mine.state_dict() == theirs.state_dict() and list(mine) == list(theirs)
        elif torch.is_tensor(mine):
            assert torch.equal(mine, theirs)
        else:
            assert mine == theirs, field.name
    assert (restored.step, restored.bad_steps_in_a_row, restored.tokens_seen.tolist()) == (4, 1, [22.0, 29.0])
    # The optimizer's lr is the schedule's next one at once (loading a scheduler's state does not set it).
    assert restored.scheduler.optimizer.param_groups[0]["lr"] == state.scheduler.get_last_lr()[0]


def test_a_stop_right_after_resuming_does_not_rewrite_the_checkpoint(tmp_path):
    from ftloop.config import Config
    from ftloop.policies import Saver

    cfg = Config()
    cfg.train.output_dir, cfg.train.save_steps = str(tmp_path), 2
    state = fresh_state()
    state.step = 4

    class Unsaveable:  # what save_checkpoint would touch first: nothing may
        def __getattr__(self, name):
            raise AssertionError(f"the model was touched ({name}): a checkpoint was written again")

    saver = Saver(Unsaveable(), Unsaveable(), state, cfg, logger=None, write_model_files=None,
                  world=World.single(), resumed=True)
    assert saver.save() == str(tmp_path / "checkpoint-4")  # the one resumed from, as it is
    state.step = 6
    assert saver.due(total_steps=10) and not saver.due(total_steps=6)  # never at the last step: `final` is


def test_a_save_slower_than_the_grace_is_said_before_the_next(tmp_path, monkeypatch, capsys):
    import time

    import ftloop.policies
    from ftloop.config import Config
    from ftloop.policies import Saver

    class Logger:
        def __init__(self):
            self.records = []

        def log(self, step, values):
            self.records.append((step, values))

    monkeypatch.setattr(ftloop.policies, "save_checkpoint", lambda *args: time.sleep(0.05))
    cfg = Config()
    cfg.train.output_dir, cfg.train.save_grace_s = str(tmp_path), 0.04
    state, logger = fresh_state(), Logger()
    saver = Saver(None, None, state, cfg, logger, None, World.single(), resumed=False)
    state.step = 2
    saver.save()
    assert "took" not in capsys.readouterr().out  # nothing measured yet
    state.step = 4
    saver.save()
    said = capsys.readouterr().out.strip()
    assert said.startswith("checkpoint-4: the last save took ") and "\n" not in said
    assert "s, more than --save-grace-s 0.04: a preemption's save may be killed before it ends" in said
    assert [step for step, values in logger.records if values["checkpoint_save_s"] >= 0.05] == [2, 4]
    cfg.train.save_grace_s = 25.0
    state.step = 6
    saver.save()
    assert "took" not in capsys.readouterr().out
