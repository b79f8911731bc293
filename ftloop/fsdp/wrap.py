"""Wrap the model in FSDP1 and fill it with rank 0's weights, one FSDP unit at a time."""

from __future__ import annotations

import functools
import weakref

import torch
import torch.distributed as dist
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
    """bf16 matmuls and bf16 gradient reduce-scatter; the sharded masters stay in their own dtype."""
    if not args.bf16:
        return None
    return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                          buffer_dtype=DTYPES[args.buffer_dtype])


class Rank0Materializer:
    """FSDP `param_init_fn`: gives a meta module storage and rank 0's values.

    FSDP calls it for every module of a unit (breadth first, the same order on every rank) just before
    flattening that unit, so at most one unit is ever unsharded on ranks > 0. Rank 0 hands over the tensors
    it loaded from the checkpoint; the others receive them by broadcast. Tied weights (lm_head and the
    input embedding) stay one tensor: a meta tensor seen twice is materialised once.
    """

    def __init__(self, model: nn.Module, source: dict[str, torch.Tensor] | None, device: torch.device):
        self.names = {module: name for name, module in model.named_modules(remove_duplicate=False)}
        self.source = source  # rank 0: name -> tensor, popped as it is used, so memory is handed over
        self.device = device
        # id(meta) -> (meta, weak ref to its real tensor). Weak, so that a unit's tensors die as soon as FSDP
        # has flattened and sharded them; the meta tensor is kept so that its id is never reused.
        self.done: dict[int, tuple[torch.Tensor, weakref.ref]] = {}

    def __call__(self, module: nn.Module) -> None:
        prefix = self.names[module]
        for slots, is_param in ((module._parameters, True), (module._buffers, False)):
            for key, meta in list(slots.items()):
                if meta is None or not meta.is_meta:
                    continue
                name = f"{prefix}.{key}" if prefix else key
                if id(meta) in self.done:  # tied: a second name for a tensor already received
                    slots[key] = self.done[id(meta)][1]()
                    if self.source is not None:
                        self.source.pop(name, None)
                    continue
                real = self._receive(name, meta)
                if is_param:
                    real = nn.Parameter(real, requires_grad=meta.requires_grad)
                self.done[id(meta)] = (meta, weakref.ref(real))
                slots[key] = real

    def _receive(self, name: str, meta: torch.Tensor) -> torch.Tensor:
        if self.source is not None:
            tensor = self.source.pop(name, None)
            if tensor is None:
                raise KeyError(f"{name} is in the model but not in the loaded checkpoint")
            tensor = tensor.to(device=self.device, dtype=meta.dtype).contiguous()
        else:
            tensor = torch.empty_like(meta, device=self.device)
        if dist.get_world_size() > 1:
            dist.broadcast(tensor, src=0)
        return tensor


def wrap_fsdp(module: nn.Module, layer_classes: set[type[nn.Module]], args: FSDPArgs,
              source: dict[str, torch.Tensor] | None, device: torch.device) -> FSDP:
    """FSDP1 with transformer auto-wrap on the decoder layers and vision blocks.

    `source` is rank 0's loaded state (names as in `module`), None on the other ranks.
    """
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set(layer_classes))
    materialize = Rank0Materializer(module, source, device)
    model = FSDP(
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
        param_init_fn=materialize,
    )
    if source:
        raise KeyError(f"checkpoint tensors the model does not use: {sorted(source)[:5]}")
    return model
