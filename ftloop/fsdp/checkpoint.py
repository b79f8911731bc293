"""Sharded training checkpoints with torch.distributed.checkpoint: each rank writes its own shards."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType


def save_checkpoint(model: FSDP, optimizer: torch.optim.Optimizer, scheduler, step: int, path: str) -> None:
    """Model and optimizer as FSDP sharded state dicts, plus schedule and step. Collective."""
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state = {
            "model": model.state_dict(),
            "optimizer": FSDP.optim_state_dict(model, optimizer),
        }
    dcp.save(state, checkpoint_id=path)
    if dist.get_rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict()}, os.path.join(path, "trainer_state.pt"))
    dist.barrier()
