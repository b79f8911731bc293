"""Write a Hugging Face model folder one safetensors shard at a time.

`save_pretrained` needs the whole state dict in memory at once; for a model that fills several GPUs that is
more host memory than a node may have. Here the weights arrive a few tensors at a time (one FSDP unit, or one
output shard read back from a checkpoint), are cast to the save dtype into a pending shard, and the shard is
written as soon as the next tensor would push it past `--max-shard-size`. The folder that results is what
`save_pretrained` writes: the same tensor names (its renaming back to the checkpoint layout, tied weights left
out), config, generation config, index, tokenizer and image processor.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from ftloop.config import parse_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def meta_skeleton(hf_config, dtype: torch.dtype) -> PreTrainedModel:
    """The model's structure without storage: carries save_pretrained's naming and tied-weight rules."""
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(copy.deepcopy(hf_config), dtype=dtype)


def save_model_files(out_dir: str, hf_config, tokenizer, image_processor, source_dir: str | None = None,
                     save_dtype: torch.dtype | None = None) -> None:
    """Everything of an HF folder but the weights: config.json (use_cache on: the folder is for inference;
    `dtype` = save_dtype when given), generation_config.json (source_dir's when it has one), tokenizer files
    with the chat template, and the image processor."""
    os.makedirs(out_dir, exist_ok=True)
    skeleton = meta_skeleton(hf_config, save_dtype or _config_dtype(hf_config))
    config = skeleton.config
    config.use_cache = True
    config.dtype = str(skeleton.dtype).removeprefix("torch.")
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out_dir)
    if skeleton.can_generate():
        generation_config = skeleton.generation_config
        if source_dir:
            try:
                generation_config = GenerationConfig.from_pretrained(source_dir)
            except OSError:
                pass  # the source has none; keep the one derived from the model config
        generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)


def _config_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


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


def save_size(dtype: torch.dtype, numel: int, save_dtype: torch.dtype) -> int:
    """Bytes of a tensor once cast as the writer casts it (floating point to save_dtype, the rest as is)."""
    return numel * (save_dtype if dtype.is_floating_point else dtype).itemsize


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """The shards ShardWriter produces for tensors of these byte sizes added in this order."""
    shards: list[list[str]] = []
    held = 0
    for name, nbytes in sizes:
        if not shards or (shards[-1] and held + nbytes > max_bytes):
            shards.append([])
            held = 0
        shards[-1].append(name)
        held += nbytes
    return shards


class ShardWriter:
    """Collects cast host copies of tensors and writes them as safetensors shards of at most max_shard_size
    (a tensor larger than that gets a shard of its own, as with save_pretrained).

    Shard names carry the final shard count, unknown until the end, so shards are written under temporary
    names and renamed by `close()`, which also writes the index. `peak_bytes` is the most tensor data the
    writer ever held at once: the exporters' host-memory bound is this plus the one unit they feed it from.
    """

    def __init__(self, folder: str, max_shard_size: str | int, save_dtype: torch.dtype):
        self.folder = folder
        self.max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
        self.save_dtype = save_dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.peak_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0
        self.total_numel = 0

    def add(self, name: str, tensor: torch.Tensor, owned: bool = False) -> None:
        """Queue a copy of `tensor` (cast, on the host). `owned`: the caller gives the tensor away, so one
        already on the host in the save dtype is kept without a copy."""
        dtype = self.save_dtype if tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * dtype.itemsize
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        tensor = tensor.detach()
        copy_needed = not (owned and tensor.device.type == "cpu" and tensor.dtype == dtype)
        self.pending[name] = tensor.to("cpu", dtype, copy=copy_needed).contiguous()
        self.pending_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.pending_bytes)
        self.total_bytes += nbytes
        self.total_numel += tensor.numel()

    def flush(self) -> None:
        """Write the pending shard (if any) and drop it from memory."""
        if not self.pending:
            return
        tmp_name = f"shard-{len(self.files):05d}.tmp.safetensors"
        save_file(self.pending, os.path.join(self.folder, tmp_name), metadata={"format": "pt"})
        self.files.append((tmp_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give the shards their final names, write the index when there are several; returns them."""
        self.flush()
        if not self.files:
            raise ValueError("no tensors to save")
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


def temporary_folder(out_dir: str) -> str:
    """An empty folder beside out_dir to write into; `publish` moves it into place."""
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, out_dir: str) -> None:
    """Replace out_dir by the finished tmp folder, so that out_dir never holds a half-written export."""
    out_dir = out_dir.rstrip(os.sep)
    if os.path.isdir(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)


def copy_export(src: str, out_dir: str) -> None:
    """Publish a copy of the finished export `src` as out_dir (e.g. `best` as `final`), atomically."""
    tmp = temporary_folder(out_dir)
    os.rmdir(tmp)
    shutil.copytree(src, tmp)
    publish(tmp, out_dir)
