"""Turn a training checkpoint into a Hugging Face folder: `python -m ftloop.export CHECKPOINT_DIR OUT_DIR`.

A `checkpoint-<step>` folder holds the model as FSDP's sharded state dict, written by every rank with
torch.distributed.checkpoint (DCP), plus `hf/` (config, tokenizer, image processor, generation config). This
runs in one process, without GPUs or a process group, at any size: it reads the checkpoint's metadata, plans
the output shards from the tensor sizes alone, then loads the tensors of one output shard at a time (DCP reads
just their byte ranges from every rank's files), casts them to --save-dtype and writes the shard. Memory stays
about one shard (in the dtype the checkpoint holds, fp32 masters by default) whatever the model's size. The
result is what ftloop.train exports at the end of a run, written to a temporary folder and renamed when done:
for a LoRA run, the merged model with its adapters in `adapter/`.
Errors are one line on stderr, exit 2 (ftloop.cli).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from ftloop.config import LoraArgs, parse_size
from ftloop.cli import run_command
from ftloop.errors import ConfigError
from ftloop.fsdp.checkpoint import COMPLETE_MARKER, MODEL_FILES, RUN_CONFIG, is_complete
from ftloop.hf_folder import (ShardWriter, check_names, meta_skeleton, plan_shards, publish, save_model_files,
                              save_size, saved_names, temporary_folder)
from ftloop.lora import ADAPTER_DIR, is_adapter, merged, write_adapter_folder
from ftloop.model import DTYPES, WRAPPER_PREFIX, clean_name

MODEL_KEY = "model."  # the checkpoint's state is {"model": ..., "optimizer": ...}; DCP joins keys with dots


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


def export_checkpoint(path: str, out_dir: str, save_dtype: str = "bf16", max_shard_size: str = "5GB") -> list[str]:
    """Write the HF folder of checkpoint `path` at out_dir; returns the safetensors file names."""
    dtype = DTYPES[save_dtype]
    tensors = model_tensors(path)
    names = {key: clean_name(key.removeprefix(MODEL_KEY + WRAPPER_PREFIX)) for key in tensors}
    lora, adapters = None, {}
    if any(is_adapter(name) for name in names.values()):  # a LoRA run's: merge its adapters, and write them too
        with open(os.path.join(path, RUN_CONFIG), encoding="utf-8") as f:
            run_config = json.load(f)
        lora, base_model = LoraArgs(**run_config["lora"]), run_config["model"]["model_name_or_path"]
        adapters = _load(path, {key: tensors[key] for key, name in names.items() if is_adapter(name)})
        adapters = {names[key]: tensor for key, tensor in adapters.items()}
        tensors = {key: meta for key, meta in tensors.items() if not is_adapter(names[key])}
        names = {key: names[key] for key in tensors}
    hf_dir = os.path.join(path, MODEL_FILES)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    skeleton = meta_skeleton(hf_config, dtype)
    check_names(skeleton, list(names.values()))
    saved = saved_names(skeleton, list(names.values()))
    keys = [key for key in tensors if names[key] in saved]
    sizes = [(key, save_size(tensors[key].properties.dtype, tensors[key].size.numel(), dtype)) for key in keys]

    tmp = temporary_folder(out_dir)
    try:
        save_model_files(tmp, hf_config, AutoTokenizer.from_pretrained(hf_dir),
                         AutoImageProcessor.from_pretrained(hf_dir), source_dir=hf_dir, save_dtype=dtype)
        writer = ShardWriter(tmp, max_shard_size, dtype)
        for shard in plan_shards(sizes, writer.max_bytes):
            state = _load(path, {key: tensors[key] for key in shard})
            for key in shard:
                tensor = state.pop(key)
                writer.add(saved[names[key]], merged(names[key], tensor, adapters, lora) if lora else tensor,
                           owned=True)
            writer.flush()
        files = writer.close()
        if lora:
            write_adapter_folder(os.path.join(tmp, ADAPTER_DIR), adapters, lora, base_model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out_dir)
    return files


def _load(path: str, tensors: dict[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
    """These tensors of the checkpoint, whole: plain tensors as targets, which DCP assembles from the pieces
    every rank saved."""
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in tensors.items()}
    with warnings.catch_warnings():  # "torch.distributed is disabled...": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    return state


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftloop.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="a checkpoint-<step> folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to write (replaced if present)")
    parser.add_argument("--save-dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the safetensors")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    path, out = args.checkpoint_dir.rstrip(os.sep) or os.sep, args.out_dir
    parse_size(args.max_shard_size)
    check_checkpoint(path)
    real_path, real_out = os.path.realpath(path), os.path.realpath(out)
    if os.path.commonpath([real_path, real_out]) == real_out:
        raise ConfigError(f"{out}: would replace the checkpoint it is exported from; give another OUT_DIR")
    if os.path.isfile(out):
        raise ConfigError(f"{out}: is a file; give a folder")
    files = export_checkpoint(path, out, args.save_dtype, args.max_shard_size)
    print(f"exported {path} to {out} ({len(files)} safetensors file{'s' if len(files) > 1 else ''}, "
          f"{args.save_dtype})")


if __name__ == "__main__":
    run_command(main)
