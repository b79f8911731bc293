"""Wrap the model in FSDP1; `param_init_fn` (ftloop.fsdp.load) fills it one FSDP unit at a time."""

from __future__ import annotations

import functools
from typing import Callable

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
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from ftloop.config import FSDPArgs
from ftloop.distributed import World
from ftloop.errors import ConfigError
from ftloop.model import DTYPES


def mixed_precision(args: FSDPArgs) -> MixedPrecision | None:
    """bf16 matmuls; gradients reduce-scattered in --reduce-dtype (fp32: every rank's bf16 gradient is summed
    without rounding); the sharded masters stay in their own dtype. The root's inputs are not cast: FSDP would cast
    every floating one to bf16, Qwen2.5-VL's `second_per_grid_ts` too, whose video time positions then drift (fps 3:
    by up to 3 positions) or collide (fps 2, past 256 temporal patches); the model casts its pixels itself
    (ftloop.model.VisionLanguageSFT._vision) and computes positions from the fp32 seconds, as inference does."""
    if not args.bf16:
        return None
    return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=DTYPES[args.reduce_dtype],
                          buffer_dtype=DTYPES[args.buffer_dtype], cast_root_forward_inputs=False)


def shard_group_size(strategy: str, world_size: int, node_size: int) -> int:
    """Over how many ranks each parameter is sharded: every rank, one node's ranks (HYBRID_SHARD, replicated
    across the nodes) or none (NO_SHARD)."""
    if strategy == "NO_SHARD":
        return 1
    return min(node_size, world_size) if strategy == "HYBRID_SHARD" else world_size


def hybrid_process_groups(world: World) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this node's ranks, which shard; the ranks of this local rank on every node, which all-reduce). FSDP's
    own default takes the node size from torch.cuda.device_count(): wrong wherever a node runs fewer
    processes than it has GPUs, and 1 on the CPU. torchrun's LOCAL_WORLD_SIZE is the node size."""
    world_size, node_size, rank = world.world_size, world.local_world_size, world.rank
    node_sizes = [0] * world_size
    dist.all_gather_object(node_sizes, node_size)  # every rank takes the same decision below
    check_node_sizes(node_sizes)
    shard = replicate = None
    for node in range(world_size // node_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(node * node_size, (node + 1) * node_size)))
        shard = group if rank // node_size == node else shard
    for local_rank in range(node_size):
        group = dist.new_group(list(range(local_rank, world_size, node_size)))
        replicate = group if rank % node_size == local_rank else replicate
    return shard, replicate


def check_node_sizes(node_sizes: list[int]) -> None:
    """HYBRID_SHARD's layout must be one FSDP can run: the same processes on every node, and more than one
    (with one, FSDP would shard over a group of one, fall back to NO_SHARD within it and never all-reduce
    across the nodes: every rank would train its own copy)."""
    if len(set(node_sizes)) > 1:
        raise ConfigError(f"--sharding-strategy HYBRID_SHARD needs the same number of processes on every node; "
                          f"these nodes run {sorted(set(node_sizes))}")
    if node_sizes[0] == 1 and len(node_sizes) > 1:
        raise ConfigError("--sharding-strategy HYBRID_SHARD shards within a node, and each node runs one process: "
                          "use FULL_SHARD (sharded over all processes) or NO_SHARD (a full copy on each)")


def wrap_fsdp(module: nn.Module, units: set[nn.Module], args: FSDPArgs, param_init_fn: Callable[[nn.Module], None],
              world: World) -> FSDP:
    """FSDP1 over a meta `module`, which `param_init_fn` materialises unit by unit: each of `units`
    (ftloop.model.unit_roots: the decoder layers and vision blocks, and what freezing and LoRA keep apart) is a
    unit of its own, the rest the root. HYBRID_SHARD shards over the processes of each node (torchrun's)."""
    hybrid = args.sharding_strategy == "HYBRID_SHARD"
    return FSDP(
        module,
        process_group=hybrid_process_groups(world) if hybrid else None,
        sharding_strategy=ShardingStrategy[args.sharding_strategy],
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m in units),
        mixed_precision=mixed_precision(args),
        cpu_offload=CPUOffload(offload_params=args.cpu_offload),
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        forward_prefetch=args.forward_prefetch,
        limit_all_gathers=args.limit_all_gathers,
        use_orig_params=args.use_orig_params,
        device_id=world.device,
        param_init_fn=param_init_fn,
    )
