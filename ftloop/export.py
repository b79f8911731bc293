"""Hugging Face folders out of ftloop: one writer (`write_folder`) fed by two streams of tensors.

- The live model (`export_model`: the `best` and `final` exports at the end of a run). Collective: the FSDP units
  are gathered one at a time, in the same order on every rank, onto rank 0 only, which writes.
- A checkpoint (`export_checkpoint`, `python -m ftloop.export CHECKPOINT_DIR OUT_DIR`: one process, no GPU, no
  torchrun). A `checkpoint-<step>` folder holds each parameter flattened, in slices written by every rank with
  torch.distributed.checkpoint (DCP), their shapes (`parameters.json`) and `hf/` (config, tokenizer, image
  processor, generation config); the tensors of one output shard are loaded at a time (DCP reads just their
  byte ranges from every rank's files).

`save_pretrained` needs the whole state dict in memory at once; for a model that fills several GPUs that is more
host memory than a node may have. Here the shards are planned from the tensor sizes before anything is read
(`plan_shards`, at most --max-shard-size each; a larger tensor alone), each tensor is cast to the save dtype as
it arrives, and a shard is written as soon as its last tensor has: so the writer holds one shard, plus the one
unit it is fed from (`python scripts/bench_export.py` measures it). The folder is what `save_pretrained` writes:
the same tensor names (transformers' renaming back to the checkpoint layout, a tied lm_head left out), config,
generation config, index, tokenizer, chat template and image processor; for a LoRA run the adapters in
`adapter/` (what `PeftModel.from_pretrained(base, ...)` loads) beside the merged weights (W + alpha/rank x B A);
and the source folder's tensors the model leaves out on load (Qwen3.5's multi-token-prediction head), unchanged.
It is written whole or not at all (ftloop.atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from tqdm import tqdm
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from ftloop.atomic import WRITE_ERRORS, publish, temporary_folder, write_failure
from ftloop.cli import run_command
from ftloop.config import LoraArgs, parse_size
from ftloop.distributed import World, agree
from ftloop.errors import ConfigError
from ftloop.fsdp.checkpoint import (COMPLETE_MARKER, FORMAT, MODEL_FILES, PARAMETERS, RUN_CONFIG, TRAINER_STATE,
                                    is_complete, latest_checkpoint, verify_checkpoint)
from ftloop.fsdp.internals import clean_name, unit_parameters
from ftloop.hf_folder import (INDEX_FILE, SINGLE_FILE, ModelFiles, carried_tensors, local_folder, meta_skeleton,
                              read_carried)
from ftloop.lora import ADAPTER_DIR, is_adapter, merged, write_adapter_folder
from ftloop.model import DTYPES, WRAPPER_PREFIX

MODEL_KEY = "model."  # a checkpoint's state is {"model": ..., "optimizer": ...}; DCP joins keys with dots
Tensors = Callable[[list[list[str]]], Iterable[tuple[str, torch.Tensor]]]


@dataclass
class ExportStats:
    """What the writer wrote, and the most tensor data it held at once (its host-memory bound is that plus the
    unit or shard it is fed from)."""
    files: list[str]
    total_bytes: int
    peak_shard_bytes: int


def write_folder(out_dir: str, files: ModelFiles, names: list[str], tensors: Tensors, save_dtype: str,
                 max_shard_size: str, lora: LoraArgs | None = None, adapters: dict[str, torch.Tensor] | None = None,
                 base_model: str = "", merge: bool = True, carry_from: str | None = None) -> ExportStats:
    """Write the folder `out_dir`. `names`: the model's parameter names, in the order `tensors` yields them (checked
    against the model before anything is written); `tensors(shards)` yields (name, tensor) pairs, and may use the
    planned output shards (lists of names) to read one shard at a time. With `lora`: `adapters` (by parameter
    name) go to `adapter/`, and unless `merge` is False the weights carry them merged (else `tensors` is never
    called). `carry_from`: the model the run started from (a folder or hub id), whose tensors the model leaves out
    on load (Qwen3.5's `mtp.*`) are copied into shards of their own after the model's, byte for byte
    (ftloop.hf_folder.carried_tensors); where it cannot be read any more, one line says they are not."""
    dtype = DTYPES[save_dtype]
    tmp = temporary_folder(out_dir)
    try:
        if lora:
            write_adapter_folder(os.path.join(tmp, ADAPTER_DIR), adapters or {}, lora, base_model)
        written, total, peak = [], 0, 0
        if merge or not lora:
            files.save(tmp, dtype)
            skeleton = meta_skeleton(files.hf_config, dtype)
            check_names(skeleton, names)
            saved = saved_names(skeleton, names)
            shapes = skeleton.state_dict(keep_vars=True)  # the tensors as the writer holds them: cast, on the host
            plan = plan_shards([(name, shapes[name].numel() * shapes[name].dtype.itemsize) for name in names
                                if name in saved], parse_size(max_shard_size))
            source = carried_source(carry_from, skeleton) if carry_from else None
            carried = carried_tensors(source, skeleton) if source else {}
            carried_plan = plan_shards([(key, nbytes) for key, (_, nbytes) in carried.items()],
                                       parse_size(max_shard_size)) if carried else []
            writer = ShardWriter(tmp, dtype, plan + carried_plan)
            for name, tensor in tensors(plan):
                if name in saved:
                    writer.add(name, saved[name], merged(name, tensor, adapters or {}, lora) if lora else tensor)
            for key, tensor in read_carried(source, carried):
                writer.add(key, key, tensor, as_stored=True)
            written, total, peak = writer.close(), writer.total_bytes, writer.peak_bytes
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out_dir)
    return ExportStats(written, total, peak)


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """The output shards of tensors of these byte sizes written in this order: a new shard whenever the next
    tensor would take the current one past `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = []
    held = 0
    for name, nbytes in sizes:
        if not shards or (shards[-1] and held + nbytes > max_bytes):
            shards.append([])
            held = 0
        shards[-1].append(name)
        held += nbytes
    return shards


def host_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous host copy of `tensor` in `dtype`, never sharing its memory. The cast is done where the tensor is
    (on a GPU by its kernels, not by one host core after the copy), so a bf16 export moves half an fp32 master's
    bytes over PCIe, into pinned memory (a direct DMA, no staging through pageable memory)."""
    cast = tensor.detach().to(dtype)
    if cast.device.type == "cpu":
        return cast.contiguous().clone() if cast.data_ptr() == tensor.data_ptr() else cast.contiguous()
    host = torch.empty(cast.shape, dtype=dtype, pin_memory=True)
    return host.copy_(cast)


class ShardWriter:
    """Writes the planned shards: collects host copies of their tensors, cast to the save dtype, and writes each
    shard as soon as its last tensor has arrived. Shard names carry the shard count, so `close()` renames them
    and writes the index when there are several; `peak_bytes` is the most tensor data it ever held at once."""

    def __init__(self, folder: str, save_dtype: torch.dtype, shards: list[list[str]]):
        self.folder, self.save_dtype, self.shards = folder, save_dtype, shards
        self.last_of_shard = {shard[-1]: index for index, shard in enumerate(shards)}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.peak_bytes = self.total_bytes = self.total_numel = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary file name, saved tensor names)

    def add(self, name: str, saved_name: str, tensor: torch.Tensor, as_stored: bool = False) -> None:
        """Queue a copy of the tensor the model calls `name`, saved as `saved_name` (in the save dtype, or with
        `as_stored` in its own)."""
        dtype = self.save_dtype if tensor.is_floating_point() and not as_stored else tensor.dtype
        self.pending[saved_name] = host_copy(tensor, dtype)
        nbytes = tensor.numel() * dtype.itemsize
        self.pending_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.pending_bytes)
        self.total_bytes += nbytes
        self.total_numel += tensor.numel()
        if name in self.last_of_shard:
            self._write()

    def _write(self) -> None:
        tmp_name = f"shard-{len(self.files):05d}.tmp.safetensors"
        save_file(self.pending, os.path.join(self.folder, tmp_name), metadata={"format": "pt"})
        self.files.append((tmp_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Give the shards their final names, write the index when there are several; returns them."""
        if self.pending or len(self.files) != len(self.shards) or not self.files:
            raise ValueError(f"the tensors written do not follow the plan of {len(self.shards)} shards")
        count = len(self.files)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                 for i in range(count)]
        for (tmp_name, _), final in zip(self.files, names):
            os.replace(os.path.join(self.folder, tmp_name), os.path.join(self.folder, final))
        if count > 1:
            index = {"metadata": {"total_parameters": self.total_numel, "total_size": self.total_bytes},
                     "weight_map": {t: final for (_, tensors), final in zip(self.files, names) for t in tensors}}
            with open(os.path.join(self.folder, INDEX_FILE), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def saved_names(skeleton: PreTrainedModel, names: list[str]) -> dict[str, str]:
    """Model parameter name -> the name save_pretrained gives it in the safetensors files.

    Names save_pretrained leaves out are absent: a tied weight (lm_head.weight under tie_word_embeddings)
    whose source is also among `names`. The rest go through transformers' reverse weight conversion (for
    Qwen2.5-VL: `model.language_model.*` -> `model.*`, `model.visual.*` -> `visual.*`), one name at a time,
    which holds only while the conversion renames; a model whose conversion merges or splits tensors would
    need whole shards converted together, and is refused.
    """
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    present = set(names)
    out = {}
    for name in names:
        if name in tied and tied[name] in present:
            continue
        renamed = list(revert_weight_conversion(skeleton, {name: torch.empty(0, device="meta")}))
        if len(renamed) != 1:
            raise NotImplementedError(f"{type(skeleton).__name__}: saving {name} converts it into {renamed}; "
                                      "streamed export supports renaming conversions only")
        out[name] = renamed[0]
    return out


def check_names(skeleton: PreTrainedModel, names: list[str]) -> None:
    """Refuse to export a model whose parameter names are not the skeleton's state dict: a missing name would
    be a tensor save_pretrained writes (a persistent buffer, say) and the export leaves out."""
    expected = set(skeleton.state_dict(keep_vars=True))
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    present = set(names)
    missing = sorted(n for n in expected - present if not (n in tied and tied[n] in present))
    unexpected = sorted(present - expected)
    if missing or unexpected:
        raise ValueError(f"the weights do not match {type(skeleton).__name__}'s: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


# ---- the live model's stream --------------------------------------------------------------------------------


def export_model(model: FSDP, out_dir: str, files: ModelFiles, save_dtype: str, max_shard_size: str, world: World,
                 lora: LoraArgs | None = None, base_model: str = "", merge: bool = True) -> ExportStats | None:
    """`write_folder` from the wrapped model (collective: every rank calls it; rank 0 writes and returns the
    stats, None elsewhere)."""
    rank0 = world.is_main
    units = unit_parameters(model)
    adapters = _gather_adapters(units, rank0) if lora else {}
    units = [(unit, [e for e in entries if not is_adapter(e[0])]) for unit, entries in units]
    units = [(unit, entries) for unit, entries in units if entries]
    gathering = merge or not lora
    stream = _unit_tensors(units, rank0) if gathering else iter(())

    def write() -> ExportStats:  # rank 0
        names = [name.removeprefix(WRAPPER_PREFIX) for _, entries in units for name, _, _ in entries]
        try:
            return write_folder(out_dir, files, names, lambda _: stream, save_dtype, max_shard_size, lora, adapters,
                                base_model, merge, carry_from=base_model)
        except WRITE_ERRORS as err:  # a full disk: the other ranks are in the gathers, finish them first
            for _ in stream:
                pass
            kept = latest_checkpoint(os.path.dirname(out_dir))
            then = (f"then export it with `python -m ftloop.export {kept} {out_dir}`" if kept else
                    "then run again")
            raise ConfigError(write_failure(out_dir, err, kept, then)) from None

    if not rank0:
        for _ in stream:  # the gathers are collective
            pass
    return agree(world, write, "rank 0")  # a failure is every rank's


def _unit_tensors(units, rank0: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Each unit gathered in turn onto rank 0 (every rank iterates: the gather is collective), its parameters
    yielded there. No offload_to_cpu: on a GPU the unit is gathered on rank 0's GPU, as in a forward pass, and
    each tensor reaches the host already cast; so the host holds the pending shard only (and FSDP refuses
    offload_to_cpu for NO_SHARD anyway)."""
    for unit, entries in tqdm(units, desc="exporting", unit="unit", leave=False, disable=not rank0):
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=False):
            if rank0:
                for name, module, attribute in entries:
                    yield name.removeprefix(WRAPPER_PREFIX), getattr(module, attribute)


def _gather_adapters(units, rank0: bool) -> dict[str, torch.Tensor]:
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


# ---- a checkpoint's stream ----------------------------------------------------------------------------------


def export_checkpoint(path: str, out_dir: str, save_dtype: str = "bf16", max_shard_size: str = "5GB") -> list[str]:
    """`write_folder` from checkpoint `path` (one process); returns the safetensors file names."""
    tensors = model_tensors(path)
    with open(os.path.join(path, PARAMETERS), encoding="utf-8") as f:
        shapes = {MODEL_KEY + name: shape for name, shape in json.load(f).items()}  # the tensors are saved flat
    names = {key: clean_name(key.removeprefix(MODEL_KEY + WRAPPER_PREFIX)) for key in tensors}
    keys = {name: key for key, name in names.items()}

    with open(os.path.join(path, RUN_CONFIG), encoding="utf-8") as f:
        run_config = json.load(f)
    source = run_config["model"]["model_name_or_path"]  # the model the run started from
    lora, base_model, adapters = None, "", {}
    if any(is_adapter(name) for name in names.values()):  # a LoRA run's: merge its adapters, and write them too
        lora, base_model = LoraArgs(**run_config["lora"]), source
        loaded = _load(path, {key: meta for key, meta in tensors.items() if is_adapter(names[key])}, shapes)
        adapters = {names[key]: tensor for key, tensor in loaded.items()}

    def shard_by_shard(shards: list[list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
        for shard in shards:
            state = _load(path, {keys[name]: tensors[keys[name]] for name in shard}, shapes)
            for name in shard:
                yield name, state.pop(keys[name])

    files = ModelFiles.load(os.path.join(path, MODEL_FILES))
    weights = [name for name in names.values() if not is_adapter(name)]
    return write_folder(out_dir, files, weights, shard_by_shard, save_dtype, max_shard_size, lora, adapters,
                        base_model, carry_from=source).files


def carried_source(name_or_path: str, skeleton: PreTrainedModel) -> str | None:
    """The local folder of the model a run started from (a hub id's snapshot in the HF cache), when `skeleton`'s
    model leaves tensors out on load (Qwen3.5's `mtp.*`) that exports carry from there; None otherwise, said in one
    line when it has such tensors but the folder cannot be read any more (moved, or a hub id offline)."""
    if not skeleton._keys_to_ignore_on_load_unexpected:
        return None
    try:
        return local_folder(name_or_path)
    except ConfigError:
        print(f"export: {name_or_path}, the model this run started from, is not here: the tensors the model leaves "
              "out on load (such as Qwen3.5's mtp.* head) are not carried into the export")
        return None


def check_checkpoint(path: str) -> None:
    """Raise ConfigError (one line) unless path is a finished checkpoint this tool can read."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a folder; give a checkpoint-<step> folder")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        if any(name.endswith(".distcp") for name in os.listdir(path)):
            raise ConfigError(f"{path}: incomplete checkpoint (DCP shards but no .metadata: still being written, "
                              "or its save was interrupted); use an earlier checkpoint")
        raise ConfigError(f"{path}: no torch.distributed.checkpoint metadata (.metadata); give a "
                          "checkpoint-<step> folder written by ftloop.train --save-steps")
    if not is_complete(path):
        raise ConfigError(f"{path}: incomplete checkpoint (no {COMPLETE_MARKER} marker: still being written, or "
                          "its save was interrupted); use an earlier checkpoint")
    problem = verify_checkpoint(path, World.single())
    if problem:
        raise ConfigError(f"{path}: damaged: {problem}; export an earlier checkpoint")
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
        if json.load(f).get("checkpoint_format") != FORMAT:
            raise ConfigError(f"{path}: written by an earlier ftloop, whose checkpoint layout (FSDP's sharded state "
                              "dict) this one does not read; export it with the ftloop that wrote it")
    if not os.path.isfile(os.path.join(path, MODEL_FILES, "config.json")):
        raise ConfigError(f"{path}: no {MODEL_FILES}/config.json (the model config saved with the checkpoint); "
                          "was it written by this version of ftloop?")


def model_tensors(path: str) -> dict[str, TensorStorageMetadata]:
    """DCP key -> size and dtype, for the model's tensors in checkpoint order."""
    metadata = FileSystemReader(path).read_metadata()
    tensors = {key: meta for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(MODEL_KEY + WRAPPER_PREFIX) and isinstance(meta, TensorStorageMetadata)}
    if not tensors:
        raise ConfigError(f"{path}: the checkpoint holds no model weights (no '{MODEL_KEY}{WRAPPER_PREFIX}*' keys)")
    return tensors


def _load(path: str, tensors: dict[str, TensorStorageMetadata],
          shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """These tensors of the checkpoint, whole and in their shapes: plain tensors as targets, which DCP assembles
    from the pieces every rank saved."""
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in tensors.items()}
    with warnings.catch_warnings():  # "torch.distributed is disabled...": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    return {key: tensor.view(shapes[key]) for key, tensor in state.items()}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftloop.export",
                                     description="Turn a training checkpoint into a Hugging Face folder.")
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="a checkpoint-<step> folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to write (replaced if present)")
    parser.add_argument("--save-dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the safetensors")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """`python -m ftloop.export`: refusals are one line (ConfigError: ftloop.cli says it, exit 2)."""
    args = parse(argv)
    path, out = args.checkpoint_dir.rstrip(os.sep) or os.sep, args.out_dir
    parse_size(args.max_shard_size)
    check_checkpoint(path)
    real_path, real_out = os.path.realpath(path), os.path.realpath(out)
    if os.path.commonpath([real_path, real_out]) == real_out:
        raise ConfigError(f"{out}: would replace the checkpoint it is exported from; give another OUT_DIR")
    if os.path.isfile(out):
        raise ConfigError(f"{out}: is a file; give a folder")
    try:
        files = export_checkpoint(path, out, args.save_dtype, args.max_shard_size)
    except WRITE_ERRORS as err:
        raise ConfigError(write_failure(out, err, path, then="then export again")) from None
    print(f"exported {path} to {out} ({len(files)} safetensors file{'s' if len(files) > 1 else ''}, "
          f"{args.save_dtype})")


if __name__ == "__main__":
    run_command(main)
