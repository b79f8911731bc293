"""CPU benchmark: Adafactor step time and optimizer state bytes, one process and FSDP1 shards.

    python scripts/bench_optim.py [--layers 12] [--steps 5] [--quick]

A stack of nn.Linear layers (alternating dim->hidden and hidden->dim, with biases, fp32; ~100M parameters,
~10M with --quick) gets seeded random gradients (no forward/backward), then each optimizer takes 2 warm-up
steps and N timed steps. Rows:
  transformers Adafactor / torch.optim.Adafactor / ftloop ShardedAdafactor(describe_plain), one process;
  ShardedAdafactor(describe_fsdp) under FSDP1 (FULL_SHARD, gloo, CPU, one unit per Linear) at world size 1, 2;
  transformers Adafactor stepping the FSDP flat shards (what other stacks do: the shards are 1-D, so it
  stops factoring).
torch.optim.Adafactor has different numerics (its own lr/eps/beta2 rules); it is here for speed and memory.
Every row runs in fresh processes; under FSDP, step time and state bytes are the max over ranks. Each process
runs max(1, cores // world) threads.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

HF_KWARGS = dict(lr=1e-3, scale_parameter=False, relative_step=False)
WARMUP = 2


def build_model(layers: int, dim: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(dim, hidden) if i % 2 == 0 else nn.Linear(hidden, dim) for i in range(layers)])


def make_optimizer(kind: str, model: nn.Module):
    from transformers.optimization import Adafactor as HFAdafactor

    from ftloop.optim.adafactor import ShardedAdafactor
    from ftloop.optim.segments import describe_fsdp
    from scripts.support import describe_plain

    if kind == "hf":
        return HFAdafactor(model.parameters(), **HF_KWARGS)
    if kind == "torch":
        return torch.optim.Adafactor(model.parameters(), lr=1e-3)
    if kind == "sharded_plain":
        return ShardedAdafactor(describe_plain(model), **HF_KWARGS)
    if kind == "sharded_fsdp":
        return ShardedAdafactor(describe_fsdp(model), **HF_KWARGS)
    raise ValueError(kind)


def state_bytes(optimizer) -> int:
    def walk(value) -> int:
        if torch.is_tensor(value):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(s) for s in optimizer.state.values())


def fill_grads(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def time_steps(optimizer, steps: int, barrier=lambda: None) -> float:
    """Milliseconds per step, averaged over `steps` after WARMUP untimed steps."""
    for _ in range(WARMUP):
        optimizer.step()
    barrier()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) * 1000 / steps


def worker(rank: int, world: int, port: int, threads: int, args, kind: str, fsdp: bool, queue) -> None:
    """One row, in a fresh process per rank (so no row inherits another's warmed-up allocator)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    warnings.filterwarnings("ignore", message="FSDP is switching to use `NO_SHARD`")
    torch.set_num_threads(threads)
    model = build_model(args.layers, args.dim, args.hidden)
    if fsdp:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = FSDP(model, sharding_strategy=ShardingStrategy.FULL_SHARD, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                     device_id=torch.device("cpu"), use_orig_params=False)
    try:
        fill_grads(model, seed=1 + rank)  # under FSDP: .grad of the local flat shards
        optimizer = make_optimizer(kind, model)
        ms = time_steps(optimizer, args.steps, barrier=dist.barrier if fsdp else lambda: None)
        result = torch.tensor([ms, float(state_bytes(optimizer))], dtype=torch.float64)
        if fsdp:
            dist.all_reduce(result, op=dist.ReduceOp.MAX)
        if rank == 0:
            queue.put((result[0].item(), int(result[1].item())))
    finally:
        if fsdp:
            dist.destroy_process_group()


def bench(kind: str, world: int, fsdp: bool, threads: int, args) -> tuple[float, int]:
    """(step ms, optimizer state bytes), each the max over ranks."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(world, port, threads, args, kind, fsdp, queue), nprocs=world, join=True)
    return queue.get()


ROWS = [  # (label, optimizer, world size, under FSDP)
    ("transformers Adafactor", "hf", 1, False),
    ("torch.optim.Adafactor", "torch", 1, False),
    ("ftloop ShardedAdafactor (describe_plain)", "sharded_plain", 1, False),
    ("ftloop ShardedAdafactor (FSDP1, describe_fsdp)", "sharded_fsdp", 1, True),
    ("ftloop ShardedAdafactor (FSDP1, describe_fsdp)", "sharded_fsdp", 2, True),
    ("transformers Adafactor on FSDP1 flat shards", "hf", 2, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="Linear layers (default 12; 5 with --quick)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    parser.add_argument("--quick", action="store_true", help="a ~10M-parameter model for a fast check")
    args = parser.parse_args()
    args.dim, args.hidden = (1024, 2048) if args.quick else (2048, 4096)
    args.layers = args.layers or (5 if args.quick else 12)

    wall = time.perf_counter()
    cores = os.cpu_count() or 1
    n_params = sum(p.numel() for p in build_model(args.layers, args.dim, args.hidden).parameters())
    param_mib = n_params * 4 / 2**20
    print(f"bench_optim: {args.layers} x nn.Linear ({args.dim}<->{args.hidden}, bias, fp32), "
          f"{n_params:,} parameters ({param_mib:.1f} MiB); {WARMUP} warm-up + {args.steps} timed steps; "
          f"{cores} cores; torch {torch.__version__}", flush=True)

    rows = []  # (label, world, threads, ms, bytes)
    for label, kind, world, fsdp in ROWS:
        threads = max(1, cores // world)
        ms, nbytes = bench(kind, world, fsdp, threads, args)
        rows.append((label, world, threads, ms, nbytes))
        print(f"  {label}, world size {world}: {ms:.1f} ms", flush=True)

    header = f"{'optimizer':<48} {'world':>5} {'threads':>7} {'step ms':>9} {'state MiB/rank':>15} {'state/params':>12}"
    print()
    print(header)
    print("-" * len(header))
    for label, world, threads, ms, nbytes in rows:
        mib = nbytes / 2**20
        print(f"{label:<48} {world:>5} {threads:>7} {ms:>9.1f} {mib:>15.3f} {mib / param_mib:>11.2%}")
    ratio = rows[2][3] / rows[0][3]
    print(f"\nftloop ShardedAdafactor / transformers Adafactor, one process: {ratio:.2f}x the step time")
    print(f"wall time {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
