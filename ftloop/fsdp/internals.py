"""Every read of FSDP1's private state, in one place: the only code a torch upgrade (or a later FSDP2 backend) can
break. Written against torch 2.13; tests/test_fsdp_internals.py is pinned to that version and checks each
accessor against the model it wraps.

FSDP1 flattens the parameters of each unit into one flat parameter and shards it. What the rest of ftloop needs
to know about that is here:
- `clean_name`: a parameter's name in the model as built, whatever wrappers FSDP (and activation checkpointing,
  torch.compile, a LoRA layer) put around its modules;
- `unit_parameters`: each unit's original parameters, which summon_full_params puts back on their modules (the
  exports and the loading of the best weights go through them);
- `flat_shards`: where each original parameter's local slice sits inside the tensor the optimizer steps, and which
  elements of the full parameter it holds (ftloop.optim.segments builds on it);
- `sharded_tensor`: FSDP1's checkpoint format for a flattened parameter's slice (ShardedTensor), which the
  optimizer's state takes so that torch.distributed.checkpoint reshards it like the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

# What FSDP, activation checkpointing, torch.compile and a LoRA layer (ftloop.lora) put into module names.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "base_layer.")


def clean_name(name: str) -> str:
    """A parameter's name in the model as built, whatever wrappers hold it now."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def units(model: FSDP) -> list[FSDP]:
    """The FSDP units that manage parameters, in `model.modules()` order (the root first)."""
    return [unit for unit in FSDP.fsdp_modules(model) if unit._handle is not None]


def unit_parameters(model: FSDP) -> list[tuple[FSDP, list[tuple[str, nn.Module, str]]]]:
    """Each unit (`units`) with (name under the FSDP root without wrapper prefixes, owning module, attribute) for
    each of its original parameters, tied aliases included.

    While a unit is summoned, `getattr(module, attribute)` is the full parameter: FSDP1 puts views of the
    unsharded flat parameter back on the original modules, as parameters with use_orig_params=False and as
    the data of the original parameters with use_orig_params=True.
    """
    paths = {module: path for path, module in model.named_modules()}
    found = []
    for unit in units(model):
        flat = unit._handle.flat_param
        prefix = paths[unit] + "." if paths[unit] else ""
        entries = [(clean_name(prefix + (f"{info.module_name}." if info.module_name else "") + info.param_name),
                    info.module, info.param_name)
                   for info in [*flat._param_infos, *flat._shared_param_infos]]
        found.append((unit, entries))
    return found


@dataclass(frozen=True)
class LocalSlice:
    """One original parameter inside a unit's flat parameter, as this rank holds it."""
    name: str  # under the FSDP root, without wrapper prefixes
    shape: tuple[int, ...]  # its full shape
    offset: int  # where its local slice starts in this rank's shard of the flat parameter
    numel: int  # elements held here (0 when they all live on other ranks)
    first: int  # index, in the flattened full parameter, of the first local element


@dataclass
class FlatShard:
    """One unit's flat parameter on this rank, and what it holds."""
    flat: torch.Tensor  # the sharded flat parameter (what an optimizer steps with use_orig_params=False)
    slices: list[LocalSlice]
    originals: list[torch.Tensor] | None  # with use_orig_params=True, each original parameter (a 1-D slice)
    group: dist.ProcessGroup | None  # the ranks it is sharded over; None: nothing is sharded (one rank, NO_SHARD)


def flat_shards(model: FSDP) -> list[FlatShard]:
    """Every unit's flat parameter on this rank, in a rank-independent order."""
    paths = {module: path for path, module in model.named_modules()}
    found = []
    for unit in units(model):
        handle = unit._handle
        flat = handle.flat_param
        prefix = paths[unit] + "." if paths[unit] else ""
        sharded = handle.uses_sharded_strategy and dist.get_world_size(unit.process_group) > 1
        slices = []
        for fqn, shape, info in zip(flat._fqns, flat._shapes, flat._shard_param_infos):
            where = (info.offset_in_shard, info.numel_in_shard, info.intra_param_start_idx) if info.in_shard \
                else (0, 0, 0)
            slices.append(LocalSlice(clean_name(prefix + fqn), tuple(shape), *where))
        found.append(FlatShard(flat, slices, flat._params, unit.process_group if sharded else None))
    return found


def sharded_tensor(local: torch.Tensor, first: int, full_numel: int, group: dist.ProcessGroup) -> ShardedTensor:
    """This rank's slice `local` of a flattened tensor of `full_numel` elements, starting at element `first`, as the
    ShardedTensor FSDP1's sharded state dict holds (collective over `group`)."""
    shards = []
    if local.numel():
        placement = f"rank:{dist.get_rank()}/{local.device}"  # a global rank, also in a subgroup (HYBRID_SHARD)
        shards.append(Shard(local, ShardMetadata([first], [local.numel()], placement)))
    return ShardedTensor._init_from_local_shards(shards, [full_numel], process_group=group)


def local_slice(value) -> torch.Tensor | None:
    """This rank's slice of a loaded ShardedTensor (None when it holds none); a plain tensor as it is."""
    if isinstance(value, ShardedTensor):
        shards = value.local_shards()
        return shards[0].tensor if shards else None
    return value
