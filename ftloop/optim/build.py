"""The optimizer the run asks for, over the parameters FSDP exposes."""

from __future__ import annotations

import torch

from ftloop.config import OptimArgs
from ftloop.optim.adafactor import Adafactor


def build_optimizer(params, args: OptimArgs, device: torch.device) -> torch.optim.Optimizer:
    """Adafactor with the HF Trainer's optim="adafactor" settings, or torch's AdamW."""
    params = [p for p in params if p.requires_grad]
    if args.optim == "adafactor":
        # What the HF Trainer builds for optim="adafactor": an external learning rate and schedule.
        return Adafactor(params, lr=args.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=args.weight_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, fused=fused)
