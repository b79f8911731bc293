"""Optimizers and learning-rate schedules."""

from ftloop.optim.adafactor import Adafactor
from ftloop.optim.schedule import build_lr_scheduler, warmup_steps_from_ratio

__all__ = ["Adafactor", "build_lr_scheduler", "warmup_steps_from_ratio"]
