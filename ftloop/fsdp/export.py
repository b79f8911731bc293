"""Export the trained weights as a Hugging Face folder that `from_pretrained` loads, streamed.

The FSDP units are gathered one at a time, in the same order on every rank (gathering is collective), onto
rank 0 only; rank 0 copies each tensor, cast to the save dtype, into a pending safetensors shard that is written
whenever the next tensor would make it larger than --max-shard-size. So rank 0 never holds more than one shard
plus one unit, whatever the model's size (`python scripts/bench_export.py` measures it). Everything goes into a
temporary folder that replaces the target only when complete: an interrupted export never leaves a folder that
looks finished.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

from ftloop.config import LoraArgs
from ftloop.hf_folder import (ShardWriter, check_names, meta_skeleton, publish, save_model_files, save_size,
                              saved_names, temporary_folder)
from ftloop.lora import ADAPTER_DIR, is_adapter, merged, write_adapter_folder
from ftloop.model import DTYPES, WRAPPER_PREFIX, clean_name


def full_state_dict(model: FSDP) -> dict[str, torch.Tensor]:
    """Every parameter gathered to rank 0's host memory at once (empty dict on the other ranks). Not for
    export (see export_model); the tests compare against it."""
    # On a CPU run the shards already live in host memory, and FSDP's offload path would free the very
    # storage it just gathered (it assumes a device-to-host copy), so offload only from accelerators.
    on_cpu = next(model.parameters()).device.type == "cpu"
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return {name.removeprefix(WRAPPER_PREFIX): tensor for name, tensor in state.items()}


@dataclass
class ExportStats:
    """What rank 0 wrote and the most tensor data its writer held at once (its host-memory bound is that
    plus the largest unit, which is gathered where the model lives: host memory on a CPU run)."""
    files: list[str]
    total_bytes: int
    peak_shard_bytes: int
    largest_unit_bytes: int


def unit_parameters(model: FSDP) -> list[tuple[FSDP, list[tuple[str, nn.Module, str]]]]:
    """Each FSDP unit that manages parameters, in `model.modules()` order (the root first, so it is lazily
    initialised as the root), with (name under the FSDP root without wrapper prefixes, owning module,
    attribute) for each of its original parameters, tied aliases included.

    While a unit is summoned, `getattr(module, attribute)` is the full parameter: FSDP1 puts views of the
    unsharded flat parameter back on the original modules, as parameters with use_orig_params=False and as
    the data of the original parameters with use_orig_params=True.
    """
    paths = {module: path for path, module in model.named_modules()}
    units = []
    for unit in FSDP.fsdp_modules(model):
        if unit._handle is None:
            continue
        flat = unit._handle.flat_param
        prefix = paths[unit] + "." if paths[unit] else ""
        entries = [(clean_name(prefix + (f"{info.module_name}." if info.module_name else "") + info.param_name),
                    info.module, info.param_name)
                   for info in [*flat._param_infos, *flat._shared_param_infos]]
        units.append((unit, entries))
    return units


def gather_adapters(units, rank0: bool) -> dict[str, torch.Tensor]:
    """Every LoRA adapter matrix gathered onto rank 0's host, in its master dtype (empty elsewhere); small: each
    is rank x a projection's side. Collective."""
    adapters = {}
    for unit, entries in units:
        if not any(is_adapter(name) for name, _, _ in entries):
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=False):
            if rank0:
                adapters.update({name.removeprefix(WRAPPER_PREFIX): getattr(module, attribute).detach().cpu().clone()
                                 for name, module, attribute in entries})
    return adapters


def export_model(model: FSDP, out_dir: str, hf_config, tokenizer, image_processor, save_dtype: str,
                 max_shard_size: str, source_dir: str | None = None, lora: LoraArgs | None = None,
                 base_model_name_or_path: str = "", merge: bool = True) -> ExportStats | None:
    """Collective: every rank must call it; rank 0 writes (and returns its ExportStats; None elsewhere or when
    no weights are written). With `lora`: the adapters go to `out_dir/adapter` (what
    `PeftModel.from_pretrained(base, ...)` loads) and, unless `merge` is False, `out_dir` holds the whole model
    with them merged into its weights (W + alpha / rank x B A)."""
    rank0 = dist.get_rank() == 0
    units = unit_parameters(model)
    adapters = gather_adapters(units, rank0) if lora else {}
    if rank0:
        tmp = temporary_folder(out_dir)
        if lora:
            write_adapter_folder(os.path.join(tmp, ADAPTER_DIR), adapters, lora, base_model_name_or_path)
    stats = None
    if merge or not lora:
        weight_units = [(unit, [e for e in entries if not is_adapter(e[0])]) for unit, entries in units]
        stats = _write_weights([(u, e) for u, e in weight_units if e], tmp if rank0 else "", hf_config, tokenizer,
                               image_processor, save_dtype, max_shard_size, source_dir, adapters, lora)
    if rank0:
        publish(tmp, out_dir)
    dist.barrier()
    return stats


def _write_weights(units, tmp: str, hf_config, tokenizer, image_processor, save_dtype: str, max_shard_size: str,
                   source_dir: str | None, adapters: dict[str, torch.Tensor], lora: LoraArgs | None):
    """The HF folder's files into `tmp` on rank 0, one gathered unit at a time (collective)."""
    rank0 = dist.get_rank() == 0
    dtype = DTYPES[save_dtype]
    if rank0:
        save_model_files(tmp, hf_config, tokenizer, image_processor, source_dir, save_dtype=dtype)
        skeleton = meta_skeleton(hf_config, dtype)
        names = [name.removeprefix(WRAPPER_PREFIX) for _, entries in units for name, _, _ in entries]
        check_names(skeleton, names)
        saved = saved_names(skeleton, names)
        writer = ShardWriter(tmp, max_shard_size, dtype)
    largest_unit = 0
    # No offload_to_cpu: on a GPU the unit is gathered on rank 0's GPU, as in a forward pass, and each
    # tensor reaches the host already cast; so the host holds the pending shard only (and FSDP refuses
    # offload_to_cpu for NO_SHARD anyway).
    for unit, entries in units:
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=False):
            if not rank0:
                continue
            unit_bytes = 0
            for name, module, attribute in entries:
                name = name.removeprefix(WRAPPER_PREFIX)
                if name in saved:
                    tensor = getattr(module, attribute)
                    if lora:
                        tensor = merged(name, tensor, adapters, lora)
                    writer.add(saved[name], tensor)
                    unit_bytes += save_size(tensor.dtype, tensor.numel(), dtype)
            largest_unit = max(largest_unit, unit_bytes)
    if not rank0:
        return None
    files = writer.close()
    return ExportStats(files, writer.total_bytes, writer.peak_bytes, largest_unit)
