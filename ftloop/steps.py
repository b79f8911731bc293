"""One optimizer step's arithmetic and the evaluation pass, shared by the loop and the tests.

The loss of a step is the sum of token cross-entropies divided by the number of supervised tokens of the
whole step on all ranks, so the gradient is the same however the global batch is split across processes and
micro-batches.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import ShardingStrategy
from tqdm import tqdm

from ftloop.distributed import World, all_reduce_sum
from ftloop.errors import DataError, RowFailedMidRun
from ftloop.loss import IGNORE_INDEX
from ftloop.signals import stop_signals_held


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; its numbers (the vision tower's longest spans) stay on the host."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def accumulate_gradients(model, micro_batches: list[dict], step_targets: torch.Tensor, world: World) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; returns the rank's summed token loss.

    Sharded strategies reduce-scatter every micro-batch's gradient, and FSDP adds it to the sharded gradient
    (in the master dtype: with bf16 masters the micro-batches are summed in bf16): the full gradient of a unit
    exists only while that unit's backward runs. `no_sync` would keep every unit's unsharded gradient until
    the last micro-batch, a second copy of the model per rank. It stays where it is right: NO_SHARD, whose
    gradients are unsharded anyway (one all-reduce instead of one per micro-batch), and --cpu-offload, where
    FSDP1 cannot add a new sharded gradient to one already offloaded to the host (it would drop all but the
    last micro-batch)."""
    local = model.cpu_offload.offload_params or (world.world_size > 1
                                                 and model.sharding_strategy == ShardingStrategy.NO_SHARD)
    loss_sum = torch.zeros((), device=world.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if local and not last else contextlib.nullcontext():
            micro_loss, _ = model(**to_device(batch, world.device))
            # FSDP averages gradients over ranks; multiplying by world_size turns that into a sum.
            (micro_loss * (world.world_size / step_targets)).backward()
        loss_sum += micro_loss.detach()
    return loss_sum


def clip_gradients(model, max_grad_norm: float) -> float:
    """Scale the gradient so that its global norm (over every rank's shards) is at most `max_grad_norm` (0: no
    clipping); returns the norm before clipping, the same on every rank, which is what the loop logs and
    what decides whether the step is applied."""
    return model.clip_grad_norm_(max_grad_norm or math.inf).item()


@torch.no_grad()
def evaluate(model, loader, device: torch.device) -> float:
    """Token-weighted mean cross-entropy over the whole eval set, all ranks together, in one all-reduce at the end
    (no collective and no host read per batch: on a GPU the batches' forwards queue up back to back).

    Every rank has the same number of batches and runs a forward for each, so the ranks' FSDP all-gathers stay in
    step without a vote per batch. A batch that fails to load (an eval row whose file changed since the check) is
    replaced by a one-token text batch that supervises nothing; the failure travels in the final reduction, and
    every rank raises it there (the failing rank naming the row)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, supervised tokens, ranks that failed
    failed = None
    with stop_signals_held():  # the workers start here the first time
        batches = iter(loader)
    first = not dist.is_initialized() or dist.get_rank() == 0  # a long eval set is minutes: a bar on rank 0
    for _ in tqdm(range(len(loader)), desc="eval", unit="batch", leave=False, dynamic_ncols=True, disable=not first):
        try:
            batch = next(batches)
        except DataError as err:
            failed = failed or RowFailedMidRun(str(err))
            batch = loader.collate_fn([{"input_ids": torch.zeros(1, dtype=torch.long),
                                        "labels": torch.full((1,), IGNORE_INDEX)}])
        loss_sum, count = model(**to_device(batch, device))
        totals[:2] += torch.stack([loss_sum.double(), count.double()])
    model.train()
    totals[2] = float(failed is not None)
    totals = all_reduce_sum(totals, device)
    if totals[2]:
        raise failed or RowFailedMidRun.elsewhere(int(totals[2]), "an eval row")
    return float(totals[0] / totals[1].clamp(min=1))
