"""The optimizer the run asks for, over the parameters FSDP exposes, and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.config import OptimArgs
from ftloop.errors import ConfigError
from ftloop.model import WRAPPER_PREFIX
from ftloop.optim.segments import describe_fsdp
from ftloop.optim.adafactor import ShardedAdafactor


def part_settings(args: OptimArgs):
    """(lr_scale, decay) for an original parameter, by name: vision tower, merger (Qwen3-VL's DeepStack mergers
    too) or language model; weight decay on matrices only, never on biases and norm weights."""

    def settings(name: str, shape: tuple) -> tuple[float, bool]:
        lr = args.learning_rate
        if ".visual.merger." in f".{name}" or ".visual.deepstack_merger_list." in f".{name}":
            lr = args.merger_lr or lr
        elif ".visual." in f".{name}":
            lr = args.vision_lr or lr
        return lr / args.learning_rate, len(shape) >= 2

    return settings


def build_optimizer(model: FSDP, args: OptimArgs, device: torch.device, seed: int = 0) -> torch.optim.Optimizer:
    """ftloop's shard-aware Adafactor with the HF Trainer's optim="adafactor" settings, or torch's AdamW."""
    layout = describe_fsdp(model, part_settings(args), strip_prefix=WRAPPER_PREFIX)
    if args.optim == "adafactor":
        # What the HF Trainer builds for optim="adafactor": an external learning rate and schedule.
        return ShardedAdafactor(layout, bf16_rounding=args.bf16_master_rounding, rounding_seed=seed,
                                lr=args.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                                weight_decay=args.weight_decay)
    fused = device.type == "cuda"
    layout = [t for t in layout if t.tensor.requires_grad]
    if all(len(t.segments) == 1 for t in layout):  # original parameters: group them by their settings
        groups: dict = {}
        for t in layout:
            groups.setdefault((t.segments[0].lr_scale, t.segments[0].decay), []).append(t.tensor)
        return torch.optim.AdamW([{"params": params, "lr": args.learning_rate * scale,
                                   "weight_decay": args.weight_decay if decay else 0.0}
                                  for (scale, decay), params in groups.items()], lr=args.learning_rate, fused=fused)
    if args.weight_decay or args.vision_lr or args.merger_lr:
        raise ConfigError("--optim adamw with --weight-decay, --vision-lr or --merger-lr needs --use-orig-params "
                          "(AdamW sees whole flat shards otherwise)")
    return torch.optim.AdamW([t.tensor for t in layout], lr=args.learning_rate, fused=fused)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, num_warmup_steps: int,
                       num_training_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule of --lr-scheduler-type: a linear warmup over `num_warmup_steps`, then constant, a
    linear decay or a half cosine to 0 at `num_training_steps`. (`constant` keeps its warmup, as the guide's
    "constant with warmup_ratio" wants: HF's own `constant` would ignore the warmup.) Call `step()` once after
    every optimizer step."""
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    raise ValueError(f"unknown lr schedule kind {kind!r}; expected one of constant, linear, cosine")


def warmup_steps_from_ratio(warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps for a ratio of the run, rounded up (as HF `TrainingArguments.get_warmup_steps`)."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)
