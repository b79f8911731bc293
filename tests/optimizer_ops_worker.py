"""Run by tests/test_optimizer_ops.py under forked torchrun: the aten ops one ShardedAdafactor step dispatches on an
FSDP1 model of DEPTH units, each holding PARTS blocks of 6 parameters (so 6 x PARTS parameters a unit), in chunks of
CHUNK elements (0: the default).

Usage: optimizer_ops_worker.py OUT.json DEPTH,PARTS,CHUNK [...]; rank 0 writes {"DEPTH,PARTS,CHUNK": {"kernels":
ops that compute (views left out: they launch nothing), "views": view ops, "chunks": the optimizer's chunks}}.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils._python_dispatch import TorchDispatchMode

from adafactor_worker import Block
from ftloop.optim.adafactor import ShardedAdafactor
from ftloop.optim.segments import describe_fsdp

DIM = 12


class Unit(nn.Module):
    def __init__(self, parts: int):
        super().__init__()
        self.parts = nn.ModuleList([Block(DIM, 7 + 2 * i) for i in range(parts)])

    def forward(self, x):
        for part in self.parts:
            x = part(x)
        return x


class Model(nn.Module):
    def __init__(self, depth: int, parts: int):
        super().__init__()
        self.units = nn.ModuleList([Unit(parts) for _ in range(depth)])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return self.head(x)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def ops_in_a_step(depth: int, parts: int, chunk: int) -> dict:
    torch.manual_seed(0)
    model = FSDP(Model(depth, parts), auto_wrap_policy=ModuleWrapPolicy({Unit}), device_id=torch.device("cpu"))
    # Every option that adds work: momentum, weight decay, scale_parameter.
    optimizer = ShardedAdafactor(describe_fsdp(model), beta1=0.9, weight_decay=0.1, chunk_elements=chunk or None)
    for step in range(2):  # the first step makes the state; the second is counted
        model(torch.randn(4, DIM)).square().sum().backward()
        if step == 0:
            optimizer.step()
            optimizer.zero_grad()
    with Ops() as ops:
        optimizer.step()
    return {"kernels": ops.kernels, "views": ops.views, "chunks": sum(len(bank.chunks) for bank in optimizer.banks)}


def main() -> None:
    dist.init_process_group("gloo")
    counts = {shape: ops_in_a_step(*map(int, shape.split(","))) for shape in sys.argv[2:]}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(counts, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
