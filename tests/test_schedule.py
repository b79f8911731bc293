"""LR schedules: transformers' get_*_schedule_with_warmup, the one each --lr-scheduler-type names, by value."""

import math
import pickle
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from ftloop.optim.build import build_lr_scheduler, warmup_steps_from_ratio

BASE_LR = 2.0  # not 1.0, so multiplier and lr cannot be confused


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)


def _lrs(scheduler, num_steps):
    """lr in effect for optimizer steps 0 .. num_steps-1 (the usual opt.step(); sched.step() loop)."""
    out = []
    for _ in range(num_steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    "kind,expected",
    [
        # the warmup stays with `constant` (HF's own "constant" would ignore it)
        ("constant", {0: 0.0, 1: 0.1, 5: 0.5, 9: 0.9, 10: 1.0, 50: 1.0, 99: 1.0}),
        # after warmup: (100 - step) / 90
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 91: 0.1, 100: 0.0, 104: 0.0}),
        # after warmup: 0.5 * (1 + cos(pi * (step - 10) / 90)), half a period
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 40: 0.75, 55: 0.5, 70: 0.25, 100: 0.0}),
    ],
)
def test_explicit_values(kind, expected):
    lrs = _lrs(build_lr_scheduler(_optimizer(), kind, num_warmup_steps=10, num_training_steps=100), 105)
    for step, multiplier in expected.items():
        assert lrs[step] == pytest.approx(BASE_LR * multiplier, abs=1e-12), (kind, step)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_no_warmup_starts_at_the_full_rate(kind):
    assert _lrs(build_lr_scheduler(_optimizer(), kind, 0, 50), 1) == [BASE_LR]


def test_cosine_is_monotone_after_warmup():
    lrs = _lrs(build_lr_scheduler(_optimizer(), "cosine", 10, 100), 101)
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[25] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * 15 / 90)))


def test_unknown_kind_raises_with_allowed_values():
    with pytest.raises(ValueError) as err:
        build_lr_scheduler(_optimizer(), "polynomial", 10, 100)
    for allowed in ("constant", "linear", "cosine"):
        assert allowed in str(err.value)


def test_scheduler_state_round_trip():
    opt = _optimizer()
    sched = build_lr_scheduler(opt, "cosine", 5, 50)
    _lrs(sched, 17)
    pickle.dumps(sched.state_dict())  # checkpointable
    opt2 = _optimizer()
    sched2 = build_lr_scheduler(opt2, "cosine", 5, 50)
    # A resume restores both: the current lr lives in the optimizer's param_groups.
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert _lrs(sched2, 10) == _lrs(sched, 10)


@pytest.mark.parametrize(
    "ratio,total,expected",
    [(0.03, 100, 3), (0.03, 101, 4), (0.1, 1000, 100), (0.0, 100, 0), (0.05, 7, 1), (0.5, 3, 2), (1.0, 9, 9)],
)
def test_warmup_steps_from_ratio(ratio, total, expected):
    assert warmup_steps_from_ratio(ratio, total) == expected


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.03, 0.1, 0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("total", [1, 7, 100, 333, 1000, 12345])
def test_warmup_steps_from_ratio_matches_training_arguments(ratio, total):
    # Constructing TrainingArguments needs `accelerate`; the method only reads `warmup_steps`
    # (a value < 1 is a ratio there), so call it unbound on a stand-in.
    hf_steps = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
    assert warmup_steps_from_ratio(ratio, total) == hf_steps


def test_warmup_ratio_out_of_range():
    with pytest.raises(ValueError):
        warmup_steps_from_ratio(-0.1, 100)
    with pytest.raises(ValueError):
        warmup_steps_from_ratio(1.5, 100)
