"""Wrap the model in FSDP1; `param_init_fn` (ftloop.fsdp.load) fills it one FSDP unit at a time."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.distributed.fsdp import (
    BackwardPrefetch,
    CPUOffload,
    FullyShardedDataParallel as FSDP,
    MixedPrecision,
    ShardingStrategy,
)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from ftloop.config import FSDPArgs
from ftloop.model import DTYPES


def mixed_precision(args: FSDPArgs) -> MixedPrecision | None:
    """bf16 matmuls; gradients reduce-scattered in --reduce-dtype (fp32: every rank's bf16 gradient is summed
    without rounding); the sharded masters stay in their own dtype."""
    if not args.bf16:
        return None
    return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=DTYPES[args.reduce_dtype],
                          buffer_dtype=DTYPES[args.buffer_dtype])


def wrap_fsdp(module: nn.Module, layer_classes: set[type[nn.Module]], args: FSDPArgs,
              param_init_fn: Callable[[nn.Module], None], device: torch.device) -> FSDP:
    """FSDP1 with transformer auto-wrap on the decoder layers and vision blocks of a meta `module`, which
    `param_init_fn` materialises unit by unit."""
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set(layer_classes))
    return FSDP(
        module,
        sharding_strategy=ShardingStrategy[args.sharding_strategy],
        auto_wrap_policy=policy,
        mixed_precision=mixed_precision(args),
        cpu_offload=CPUOffload(offload_params=args.cpu_offload),
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        forward_prefetch=args.forward_prefetch,
        limit_all_gathers=args.limit_all_gathers,
        use_orig_params=args.use_orig_params,
        device_id=device,
        param_init_fn=param_init_fn,
    )
