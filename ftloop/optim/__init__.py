"""Optimizers and learning-rate schedules."""

from ftloop.optim.adafactor import Adafactor
from ftloop.optim.schedule import build_lr_scheduler, warmup_steps_from_ratio
from ftloop.optim.segments import Segment, SteppedTensor, describe_fsdp, describe_plain
from ftloop.optim.sharded_adafactor import ShardedAdafactor

__all__ = ["Adafactor", "ShardedAdafactor", "Segment", "SteppedTensor", "describe_fsdp", "describe_plain",
           "build_lr_scheduler", "warmup_steps_from_ratio"]
