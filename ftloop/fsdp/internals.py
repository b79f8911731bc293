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
- `flat_shards` also says where every other rank's slice of each parameter lies (`LocalSlice.pieces`, computed
  from the unit's layout: the same arithmetic FSDP shards by, checked against this rank's own slice);
- `sharded_tensor`: a parameter's local slice (or an optimizer state's) as a ShardedTensor of the flattened full
  parameter, built from those pieces without a collective, which torch.distributed.checkpoint writes as it lies
  and reads back at any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
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
    pieces: tuple[tuple[int, int, int], ...] = ()  # every rank's slice: (global rank, first, numel); () unsharded


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
        every_rank = _pieces(handle, unit.process_group) if sharded else [()] * len(flat._fqns)
        slices = []
        for fqn, shape, info, pieces in zip(flat._fqns, flat._shapes, flat._shard_param_infos, every_rank):
            where = (info.offset_in_shard, info.numel_in_shard, info.intra_param_start_idx) if info.in_shard \
                else (0, 0, 0)
            mine = [(first, numel) for rank, first, numel in pieces if rank == dist.get_rank()]
            if sharded and mine != ([(where[2], where[1])] if info.in_shard else []):
                raise RuntimeError(f"{prefix + fqn}: FSDP1 shards this parameter as {where}, not as computed from "
                                   f"its unit's layout ({mine}): torch changed how FSDP1 shards; see "
                                   "ftloop/fsdp/internals.py")
            slices.append(LocalSlice(clean_name(prefix + fqn), tuple(shape), *where, pieces))
        found.append(FlatShard(flat, slices, flat._params, unit.process_group if sharded else None))
    return found


def _pieces(handle, group: dist.ProcessGroup) -> list[tuple[tuple[int, int, int], ...]]:
    """For each original parameter of a sharded unit, every rank's slice of it: (global rank, first element in the
    flattened parameter, elements). FSDP1 splits the unpadded flat parameter as `torch.chunk` does (chunks of
    ceil(numel / ranks) elements, the last ones shorter or empty), and the parameters lie in it one after the
    other (with alignment padding between them under use_orig_params)."""
    flat = handle.flat_param
    ranks = dist.get_world_size(group)
    total = flat._unpadded_unsharded_size.numel()
    chunk = math.ceil(total / ranks)
    found = []
    for (start, end), padding in zip(handle._get_flat_param_offsets(), flat._is_padding_mask):  # end: inclusive
        if padding:
            continue
        pieces = []
        for rank in range(start // chunk, min(end // chunk, ranks - 1) + 1):  # the ranks whose chunk it overlaps
            low, high = max(start, rank * chunk), min(end + 1, (rank + 1) * chunk, total)
            if low < high:
                pieces.append((dist.get_global_rank(group, rank), low - start, high - low))
        found.append(tuple(pieces))
    return found


def sharded_tensor(local: torch.Tensor, full_numel: int, pieces: tuple[tuple[int, int, int], ...],
                   group: dist.ProcessGroup) -> ShardedTensor:
    """This rank's slice `local` (contiguous, 1-D) of a flattened tensor of `full_numel` elements whose slices lie
    on the ranks as `pieces` say (`LocalSlice.pieces`), as a ShardedTensor over `group`. No collective: the global
    metadata is computed on every rank, not gathered."""
    rank = dist.get_rank()  # placements name global ranks, also in a subgroup (HYBRID_SHARD)
    metadata = [ShardMetadata([first], [numel], f"rank:{owner}/{local.device if owner == rank else local.device.type}")
                for owner, first, numel in pieces]
    shards = [Shard(local, meta) for (owner, _, _), meta in zip(pieces, metadata) if owner == rank]
    properties = TensorProperties(dtype=local.dtype, requires_grad=local.requires_grad, pin_memory=local.is_pinned())
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(metadata, torch.Size([full_numel]), properties), process_group=group)


def local_slice(value) -> torch.Tensor | None:
    """This rank's slice of a loaded ShardedTensor (None when it holds none); a plain tensor as it is."""
    if isinstance(value, ShardedTensor):
        shards = value.local_shards()
        return shards[0].tensor if shards else None
    return value
