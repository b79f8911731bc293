"""Run under torchrun by tests/test_sharded_adafactor.py: ShardedAdafactor on an FSDP1 model.

Usage: torchrun ... tests/adafactor_worker.py OUT.pt USE_ORIG_PARAMS(0|1|0,1) [save|load CHECKPOINT_DIR]
For each option set in CASES it trains a fresh copy of `toy_model()` for STEPS steps on the same global
batches and saves (rank 0) the full parameters, plus every rank's optimizer state bytes (and, for
hf_trainer, the all-reduces of one more step): {use_orig_params (0|1): results}, one entry per value asked
for (both in one process: one start-up instead of two).
"""

import io
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from transformers.optimization import Adafactor as HFAdafactor

from ftloop.distributed import leave
from ftloop.optim.adafactor import ShardedAdafactor
from ftloop.optim.segments import describe_fsdp

STEPS, GLOBAL_BATCH, DIM = 6, 8, 12
CASES = {
    "hf_trainer": dict(lr=1e-2, scale_parameter=False, relative_step=False),
    "hf_trainer_beta1_wd": dict(lr=1e-2, scale_parameter=False, relative_step=False, beta1=0.9, weight_decay=0.1),
    "paper": dict(),
    "paper_beta1_wd": dict(beta1=0.9, weight_decay=0.1),
    # The control: what every other stack does, transformers' Adafactor stepping FSDP's flat shards.
    "plain_on_flat_shards": dict(lr=1e-2, scale_parameter=False, relative_step=False),
}


def settings_for(case: str):
    """No decay on 1-D parameters; with an external lr, the first block learns twice as fast (a per-part
    learning rate, as --vision-lr gives the vision tower)."""
    external_lr = "lr" in CASES[case] and case != "plain_on_flat_shards"

    def settings(name, shape):
        return (2.0 if external_lr and name.startswith("blocks.0.") else 1.0), len(shape) >= 2

    return settings


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Parameter(torch.randn(3, dim, 5) * 0.1)  # a 3-D parameter: leading dim is a batch

    def forward(self, x):
        h = self.down(torch.tanh(self.up(self.norm(x))))
        return x + h + torch.einsum("bd,kde->be", x, self.mix).sum(-1, keepdim=True)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList([Block(DIM, 7), Block(DIM, 9), Block(DIM, 13)])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def toy_model() -> Toy:
    torch.manual_seed(0)
    return Toy()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, DIM, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
            for _ in range(STEPS)]


def loss_on(model, x, y, total: int):
    """Sum of squared errors over these rows / the global batch size: any split sums to the same."""
    return ((model(x) - y) ** 2).sum() / total


def train_steps(model, optimizer, steps) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for x, y in steps:
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        optimizer.zero_grad()
        # FSDP averages gradients over ranks: scale by world size to get the sum.
        (loss_on(model, x[rows], y[rows], GLOBAL_BATCH) * world).backward()
        optimizer.step()


def all_reduces_in_a_step(optimizer) -> int:
    """How many all-reduces one optimizer step issues (gradients are set by the steps before)."""
    calls, original = [], dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        optimizer.step()
    finally:
        dist.all_reduce = original
    return len(calls)


def full_params(model) -> dict:
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        return {k: v.clone() for k, v in model.state_dict().items()}


def checkpoint_round_trip(wrap, folder: str, save: bool) -> dict | None:
    """Save after half the steps with torch.distributed.checkpoint, or load that and finish the run."""
    import torch.distributed.checkpoint as dcp

    case = "hf_trainer_beta1_wd"
    model = wrap(toy_model())
    optimizer = ShardedAdafactor(describe_fsdp(model, settings_for(case)), **CASES[case])
    if save:
        train_steps(model, optimizer, batches()[:STEPS // 2])
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            dcp.save({"model": model.state_dict(), "optim": optimizer.sharded_state_dict()}, checkpoint_id=folder)
        return None
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state = {"model": model.state_dict(), "optim": optimizer.sharded_state_template()}
        dcp.load(state, checkpoint_id=folder)
        model.load_state_dict(state["model"])
    optimizer.load_sharded_state_dict(state["optim"])
    train_steps(model, optimizer, batches()[STEPS // 2:])
    return full_params(model)


def wrapper(use_orig_params: bool):
    def wrap(module):
        return FSDP(module, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=use_orig_params,
                    device_id=torch.device("cpu"))

    return wrap


def main() -> None:
    out, orig_values = sys.argv[1], [int(v) for v in sys.argv[2].split(",")]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if len(sys.argv) > 3:  # checkpoint mode: save | load FOLDER
        params = checkpoint_round_trip(wrapper(orig_values[0] == 1), sys.argv[4], sys.argv[3] == "save")
        if rank == 0 and params is not None:
            torch.save(params, out)
    else:
        results = {orig: train_every_case(wrapper(orig == 1)) for orig in orig_values}
        if rank == 0:
            torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def train_every_case(wrap) -> dict:
    world = dist.get_world_size()
    results = {}
    for case, kwargs in CASES.items():
        model = wrap(toy_model())
        if case == "plain_on_flat_shards":
            optimizer = HFAdafactor(model.parameters(), **kwargs)
        else:
            optimizer = ShardedAdafactor(describe_fsdp(model, settings_for(case)), **kwargs)
        train_steps(model, optimizer, batches())
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t))
        per_rank = [None] * world
        dist.all_gather_object(per_rank, state_bytes)
        results[case] = {"params": full_params(model), "state_bytes": per_rank}
        if case == "hf_trainer":  # after the comparison: this extra step changes the parameters
            results[case]["all_reduces_per_step"] = all_reduces_in_a_step(optimizer)

    # Stop halfway: save the optimizer state, load it into a fresh optimizer, go on.
    case = "hf_trainer_beta1_wd"
    model = wrap(toy_model())
    optimizer = ShardedAdafactor(describe_fsdp(model, settings_for(case)), **CASES[case])
    train_steps(model, optimizer, batches()[:STEPS // 2])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = ShardedAdafactor(describe_fsdp(model, settings_for(case)), **CASES[case])
    resumed.load_state_dict(torch.load(buffer))
    train_steps(model, resumed, batches()[STEPS // 2:])
    results["resumed"] = {"params": full_params(model)}
    return results


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
