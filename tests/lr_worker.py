"""Run under torchrun by the tests: one optimizer step from a gradient of 0.5 everywhere, and how far each
parameter moved.

Usage: torchrun ... tests/lr_worker.py OUT.pt -- <ftloop.train flags>
On a first step from a constant gradient, Adafactor's update is exactly 1 per element (its second moment is
the gradient squared, the update's RMS is 1: no clipping), AdamW's 1 - 2e-8; so a parameter moves by its
learning rate. Rank 0 saves {original parameter name: the movement (before - after), fp32} to OUT.pt.
"""

import sys

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.config import parse_args
from ftloop.distributed import init_distributed, leave
from ftloop.fsdp.internals import clean_name
from ftloop.model import WRAPPER_PREFIX
from ftloop.optim.build import build_optimizer
from ftloop.train import prepare


def full_parameters(model) -> dict:
    with FSDP.summon_full_params(model, rank0_only=False, writeback=False):
        return {clean_name(name).removeprefix(WRAPPER_PREFIX): p.detach().float().clone()
                for name, p in model.named_parameters()}


def main() -> None:
    out, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    cfg = parse_args(flags)
    d = init_distributed()
    model = prepare(cfg, d).model
    optimizer = build_optimizer(model, cfg.optim, d.device, cfg.train.seed)
    before = full_parameters(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    after = full_parameters(model)
    if d.rank == 0:
        torch.save({name: before[name] - after[name] for name in before}, out)
    leave(0)


if __name__ == "__main__":
    main()
