"""Learning-rate schedules with linear warmup, matching transformers' ``get_*_schedule_with_warmup``.

Each schedule is a ``LambdaLR`` multiplier on the optimizer's base lr, evaluated at the number of
optimizer steps taken so far (call ``scheduler.step()`` once after every ``optimizer.step()``).
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULE_KINDS = ("constant", "linear", "cosine")


def _warmup(step: int, num_warmup_steps: int) -> float:
    # max(1, .) keeps num_warmup_steps=0 well defined (never reached then: step < 0 is false).
    return float(step) / float(max(1, num_warmup_steps))


def _constant(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return 1.0


def _linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    remaining = float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, remaining)


def _cosine(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    # Half a cosine period (transformers' num_cycles=0.5): 1 at the end of warmup, 0 at the end.
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


_LAMBDAS = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def build_lr_scheduler(optimizer: Optimizer, kind: str, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """Linear warmup over ``num_warmup_steps``, then constant / linear decay to 0 / half-cosine to 0
    at ``num_training_steps``."""
    if kind not in _LAMBDAS:
        raise ValueError(f"unknown lr schedule kind {kind!r}; expected one of {', '.join(SCHEDULE_KINDS)}")
    # functools.partial of a module-level function (not a closure) keeps the scheduler picklable.
    lr_lambda = functools.partial(
        _LAMBDAS[kind], num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
    )
    return LambdaLR(optimizer, lr_lambda)


def warmup_steps_from_ratio(warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps for a ratio of the run, rounded up (as HF ``TrainingArguments.get_warmup_steps``)."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)
