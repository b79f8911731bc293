"""Export the trained weights as a Hugging Face folder that `from_pretrained` loads.

Rank 0 receives the full (unsharded, CPU) state dict, casts it to the save dtype and writes config,
generation config, safetensors shards with their index, tokenizer, image processor and chat template into
a temporary folder, which replaces the target only when complete: an interrupted export never leaves a
folder that looks finished.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from transformers import AutoModelForImageTextToText, GenerationConfig

from ftloop.model import DTYPES, WRAPPER_PREFIX


def full_state_dict(model: FSDP) -> dict[str, torch.Tensor]:
    """Every parameter gathered to rank 0's host memory (empty dict on the other ranks)."""
    # On a CPU run the shards already live in host memory, and FSDP's offload path would free the very
    # storage it just gathered (it assumes a device-to-host copy), so offload only from accelerators.
    on_cpu = next(model.parameters()).device.type == "cpu"
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return {name.removeprefix(WRAPPER_PREFIX): tensor for name, tensor in state.items()}


def save_hf_folder(state: dict[str, torch.Tensor], out_dir: str, hf_config, tokenizer, image_processor,
                   save_dtype: str, max_shard_size: str, source_dir: str | None = None) -> None:
    """Write a complete HF model folder at out_dir (replacing any old one only once the new one is done)."""
    dtype = DTYPES[save_dtype]
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):  # a skeleton gives save_pretrained its naming and tied-weight rules
        skeleton = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)
    skeleton.config.use_cache = True  # the export is for inference
    if source_dir:
        try:
            skeleton.generation_config = GenerationConfig.from_pretrained(source_dir)
        except OSError:
            pass  # the source had none; keep the one derived from the model config
    skeleton.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)


def export_model(model: FSDP, out_dir: str, hf_config, tokenizer, image_processor, save_dtype: str,
                 max_shard_size: str, source_dir: str | None = None) -> None:
    """Collective: every rank must call it; rank 0 writes."""
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        save_hf_folder(state, out_dir, hf_config, tokenizer, image_processor, save_dtype, max_shard_size,
                       source_dir)
    dist.barrier()
