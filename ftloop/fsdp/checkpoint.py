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
        model_state = model.state_dict()
        # ftloop's Adafactor keys its state by original parameter (factored statistics included); other
        # optimizers go through FSDP's own conversion of flat-parameter state.
        if hasattr(optimizer, "sharded_state_dict"):
            optimizer_state = optimizer.sharded_state_dict()
        else:
            optimizer_state = FSDP.optim_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(state, checkpoint_id=path)
    if dist.get_rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict()}, os.path.join(path, "trainer_state.pt"))
    dist.barrier()
