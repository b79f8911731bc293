"""Run under torchrun by tests/test_fsdp_internals.py: every accessor of ftloop.fsdp.internals on a real FSDP1
model, checked against the model it wraps. Usage: torchrun --nproc_per_node 2 tests/internals_worker.py OUT.json
Rank 0 writes {case: [problem, ...]} (empty lists: every accessor told the truth) to OUT.json."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from adafactor_worker import Block, toy_model
from ftloop.distributed import init_distributed, leave
from ftloop.fsdp.internals import flat_shards, local_slice, sharded_tensor, unit_parameters, units


class Tied(nn.Module):
    """A tie inside one unit: two names for one tensor, as lm_head and the embeddings."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight


def check(strategy: ShardingStrategy, use_orig_params: bool) -> list[str]:
    torch.manual_seed(0)
    plain = toy_model()
    plain.tied = Tied()
    want = {name: p.detach().clone() for name, p in plain.named_parameters(remove_duplicate=False)}
    model = FSDP(plain, auto_wrap_policy=ModuleWrapPolicy({Block}), sharding_strategy=strategy,
                 use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    problems, world = [], dist.get_world_size()
    if len(units(model)) != 4:  # the root and three blocks
        problems.append(f"units: {len(units(model))}")
    named = [name for _, entries in unit_parameters(model) for name, _, _ in entries]
    if sorted(named) != sorted(want):
        problems.append(f"unit_parameters names {sorted(named)} != {sorted(want)}")
    for unit, entries in unit_parameters(model):
        with FSDP.summon_full_params(unit, recurse=False):
            for name, module, attribute in entries:
                if not torch.equal(getattr(module, attribute).detach(), want[name]):
                    problems.append(f"unit_parameters: {name} is not the parameter")
    covered = {}
    for shard in flat_shards(model):
        expect_group = strategy != ShardingStrategy.NO_SHARD and world > 1
        if (shard.group is not None) != expect_group:
            problems.append(f"flat_shards: group {shard.group} with {strategy}")
        if (shard.originals is not None) != use_orig_params:
            problems.append("flat_shards: original parameters")
        local = shard.flat.detach().view(-1)
        for piece, original in zip(shard.slices, shard.originals or [None] * len(shard.slices)):
            full = want[piece.name].view(-1)
            if tuple(want[piece.name].shape) != piece.shape:
                problems.append(f"flat_shards: {piece.name} shape {piece.shape}")
            held = original.detach().view(-1) if original is not None else \
                local[piece.offset:piece.offset + piece.numel]
            if not torch.equal(held, full[piece.first:piece.first + piece.numel]):
                problems.append(f"flat_shards: {piece.name}'s slice is not the parameter's elements")
            covered.setdefault(piece.name, []).append((piece.first, piece.numel))
    everyone = [None] * world
    dist.all_gather_object(everyone, covered)
    sharded = strategy != ShardingStrategy.NO_SHARD and world > 1
    for name, value in want.items():  # the ranks' slices tile each parameter exactly (NO_SHARD: each holds all)
        pieces = sorted(piece for rank in everyone for piece in rank.get(name, []) if piece[1])
        if name == "tied.b.weight":  # an alias: its elements are tied.a.weight's
            continue
        if not sharded:
            pieces = pieces[:1]
        starts = [0] + [first + numel for first, numel in pieces]
        if [first for first, _ in pieces] != starts[:-1] or starts[-1] != value.numel():
            problems.append(f"flat_shards: the slices of {name} do not tile it: {pieces}")
    for shard in flat_shards(model):  # every rank's slices, computed here, are the ones the ranks hold
        for piece in shard.slices:
            held = tuple((rank, *where) for rank in range(world) for where in everyone[rank].get(piece.name, [])
                         if where[1]) if sharded else ()
            if piece.pieces != held:
                problems.append(f"flat_shards: {piece.name}'s pieces {piece.pieces} are not where the ranks hold "
                                f"it: {held}")
    if strategy == ShardingStrategy.FULL_SHARD:  # a slice through the checkpoint format and back
        shard = flat_shards(model)[1]
        piece = next(p for p in shard.slices if p.name.endswith("up.weight"))
        value = torch.arange(piece.numel, dtype=torch.float32) + piece.first
        full = int(torch.tensor(piece.shape).prod())
        made = sharded_tensor(value, full, piece.pieces, shard.group)
        if piece.numel and not torch.equal(local_slice(made), value):
            problems.append("sharded_tensor: the local slice did not come back")
        if [m.shard_offsets[0] for m in made.metadata().shards_metadata] != [first for _, first, _ in piece.pieces]:
            problems.append("sharded_tensor: its metadata is not every rank's slice")
    return problems


def main() -> None:
    init_distributed()
    found = {f"{strategy.name}, use_orig_params={orig}": check(strategy, orig)
             for strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.NO_SHARD) for orig in (False, True)}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(found, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
