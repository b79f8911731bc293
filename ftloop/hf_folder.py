"""Read a Hugging Face model folder one tensor at a time, and the files of a folder besides its weights.

Reading (`FolderWeights`): the safetensors headers say where every tensor lives; each model parameter is
matched to its checkpoint key through transformers' own key renaming (hub checkpoints of Qwen2.5-VL say
`model.layers.*` and `visual.*` where the model says `model.language_model.*` and `model.visual.*`), and read
alone when it is needed, cast to the master dtype on the way. So loading holds one tensor at a time, never the
state dict, whatever the model's size. `ModelFiles`: the config, generation config, tokenizer and image processor,
which every export and every checkpoint carries. Writing the weights is ftloop.export's.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass

import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer,
                          BaseImageProcessor, GenerationConfig, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from ftloop.errors import ConfigError, one_line

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def meta_skeleton(hf_config, dtype: torch.dtype) -> PreTrainedModel:
    """The model's structure without storage: carries save_pretrained's naming and tied-weight rules."""
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(copy.deepcopy(hf_config), dtype=dtype)


@dataclass
class ModelFiles:
    """Everything of a Hugging Face folder but the weights, as every export and every checkpoint's `hf/` carries it."""
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    image_processor: BaseImageProcessor
    source_dir: str | None = None
    """The local folder the model came from (None for a hub id), whose generation config is kept."""

    @classmethod
    def load(cls, folder: str) -> ModelFiles:
        """The files a folder written by `save` holds."""
        return cls(AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                   AutoImageProcessor.from_pretrained(folder), folder)

    def save(self, out_dir: str, save_dtype: torch.dtype | None = None) -> None:
        """config.json (use_cache on: the folder is for inference; `dtype` = save_dtype when given),
        generation_config.json (the source folder's when it has one), tokenizer files with the chat template, and
        the image processor (with the run's pixel limits)."""
        os.makedirs(out_dir, exist_ok=True)
        skeleton = meta_skeleton(self.hf_config, save_dtype or _config_dtype(self.hf_config))
        config = skeleton.config
        config.use_cache = True
        config.dtype = str(skeleton.dtype).removeprefix("torch.")
        config.architectures = [type(skeleton).__name__]
        config.save_pretrained(out_dir)
        if skeleton.can_generate():
            generation_config = skeleton.generation_config
            if self.source_dir:
                try:
                    generation_config = GenerationConfig.from_pretrained(self.source_dir)
                except OSError:
                    pass  # the source has none; keep the one derived from the model config
            generation_config.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)


def _config_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def local_folder(name_or_path: str, flag: str = "--model-name-or-path") -> str:
    """The folder holding a model's safetensors files: the path itself, or a hub id's snapshot in the HF cache
    (fetched there first if needed: its json and safetensors files only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:  # offline, unknown repository, no access: say which and stop
        raise ConfigError(f"{flag} {name_or_path}: cannot fetch its weights ({one_line(err)}); give a local folder, "
                          "or a hub id with network access or a filled HF cache") from None


class FolderWeights:
    """The tensors of a Hugging Face folder's safetensors files, by the model's parameter names, read one at a
    time. Building it reads only the files' headers, and checks that every parameter and persistent buffer of
    `model` (a meta skeleton will do; `expected`, by name, when some of its tensors are not the folder's, such as
    LoRA adapters) has exactly one tensor in the folder: a missing or unexpected name is one ConfigError naming
    the folder and the first few names."""

    def __init__(self, folder: str, model: PreTrainedModel, flag: str = "--model-name-or-path",
                 expected: dict[str, torch.Tensor] | None = None):
        self.folder, self.flag = folder, flag
        files = self._files(folder, flag)
        renamings, converters = _conversions(model)
        if expected is None:  # parameters and persistent buffers, tied names included
            expected = model.state_dict(keep_vars=True)
        ignored = [re.compile(p) for p in [*(model._keys_to_ignore_on_load_unexpected or []), r"rotary_emb\.inv_freq"]]
        self.location: dict[str, tuple[str, str]] = {}  # model name -> (file, key in that file)
        unexpected = []
        self.headers = {file: _read_header(os.path.join(folder, file)) for file in files}
        shapes = []
        for file, (_, entries) in self.headers.items():
            for key, (_, shape, _, _) in entries.items():
                name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
                if converter is not None:
                    raise ConfigError(f"{flag} {folder}: {key} needs transformers' weight conversion (tensors merged "
                                      f"or split on load), which ftloop's one-tensor-at-a-time loading does not do")
                if name in expected:
                    self.location[name] = (file, key)
                    if tuple(shape) != tuple(expected[name].shape):
                        shapes.append(f"{key} is {tuple(shape)}, the model's {name} {tuple(expected[name].shape)}")
                elif not any(p.search(key) for p in ignored):
                    unexpected.append(key)
        if shapes:
            raise ConfigError(f"{flag} {folder}: {len(shapes)} tensors have another shape than config.json "
                              f"describes ({_first_names(shapes, 2)}); is config.json this checkpoint's?")
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for target, source in tied.items():  # tied: both names read the one tensor, the source's when it is saved
            if source in self.location:
                self.location[target] = self.location[source]
            elif target in self.location:
                self.location[source] = self.location[target]
        missing = sorted(set(expected) - set(self.location))
        if missing or unexpected:
            found = []
            if missing:
                found.append(f"{len(missing)} of the model's tensors are not in its safetensors files "
                             f"({_first_names(missing)})")
            if unexpected:
                found.append(f"{len(unexpected)} tensors in the files belong to no parameter of "
                             f"{type(model).__name__} ({_first_names(sorted(unexpected))})")
            raise ConfigError(f"{flag} {folder}: " + "; ".join(found) + "; is it a checkpoint of this architecture "
                              "(config.json's model_type), saved whole?")
        self._handles: dict = {}

    @staticmethod
    def _files(folder: str, flag: str) -> list[str]:
        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise ConfigError(f"{flag} {folder}: no {SINGLE_FILE} or {INDEX_FILE}; ftloop reads safetensors weights "
                              "(re-save a .bin checkpoint with save_pretrained)")
        absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if absent:
            raise ConfigError(f"{flag} {folder}: {INDEX_FILE} names {absent[0]}, which is not there (an incomplete "
                              "download?)")
        return files

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each tensor is stored in, by the name the model calls it."""
        return {name: self.headers[file][1][key][0] for name, (file, key) in self.location.items()}

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor the model calls `name`, read from its file alone, floating point cast to `dtype` (None: as
        stored, for a cast on the device).

        Read with plain positioned reads into a fresh tensor, not through a memory map: the pages of a mapped
        file count in the process's resident memory for as long as the mapping lives, which would make a
        loading rank's memory grow by the whole checkpoint after all (measured: +400 MB RSS for a 400 MB file
        read through one safe_open handle)."""
        file, key = self.location[name]
        data_start, entries = self.headers[file]
        stored, shape, begin, end = entries[key]
        if file not in self._handles:
            self._handles[file] = open(os.path.join(self.folder, file), "rb", buffering=0)
        raw = torch.empty(end - begin, dtype=torch.uint8)
        handle, view, done = self._handles[file], memoryview(raw.numpy()), 0
        while done < len(view):  # a read may return fewer bytes than asked for
            handle.seek(data_start + begin + done)
            count = handle.readinto(view[done:])
            if not count:
                raise ValueError(f"{os.path.join(self.folder, file)}: ends inside tensor {key} (truncated file?)")
            done += count
        tensor = raw.view(stored).reshape(shape)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    def nonfinite_line(self, name: str, count: int) -> str:
        """The one line for the tensor the model calls `name` holding `count` NaN or infinite values (as read, cast
        to the dtype it was read in): ftloop.fsdp.load checks every tensor it reads, on every rank alike."""
        file, key = self.location[name]
        return (f"{self.flag} {self.folder}: tensor {key} in {file} holds {count} NaN/inf values; the weights are "
                "damaged (a broken download, conversion or save, or a diverged run): download or export them again, "
                "or start from the checkpoint they were made from")

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def carried_tensors(folder: str, model: PreTrainedModel) -> dict[str, tuple[str, int]]:
    """The tensors of `folder`'s safetensors files that `model` leaves out on load by its own rule
    (`_keys_to_ignore_on_load_unexpected`: Qwen3.5's multi-token-prediction head, `mtp.*`), as key -> (file, bytes).
    Exports carry them through unchanged (`read_carried`), so an exported folder is a drop-in for its source."""
    patterns = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or [])]
    if not patterns:
        return {}
    out = {}
    for file in FolderWeights._files(folder, "--model-name-or-path"):
        for key, (_, _, begin, end) in _read_header(os.path.join(folder, file))[1].items():
            if any(p.search(key) for p in patterns):
                out[key] = (file, end - begin)
    return out


def read_carried(folder: str, carried: dict[str, tuple[str, int]]):
    """Yield (key, tensor) for the `carried_tensors` of `folder`, one at a time, as stored (dtype and bytes)."""
    from safetensors import safe_open

    for key, (file, _) in carried.items():
        with safe_open(os.path.join(folder, file), "pt") as f:
            yield key, f.get_tensor(key)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _read_header(path: str) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """A safetensors file's layout: where its data starts, and key -> (dtype, shape, begin, end) in the data.
    The format is an 8-byte little-endian header length, a JSON header, then the little-endian tensor bytes."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
    except (ValueError, MemoryError, OverflowError) as err:  # not JSON where the header should be
        raise ConfigError(f"{path}: not a safetensors file ({type(err).__name__}); download or copy it again") from None
    header.pop("__metadata__", None)
    entries, size = {}, os.path.getsize(path)
    for key, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConfigError(f"{path}: tensor {key} has dtype {info['dtype']}, which ftloop does not read")
        entries[key] = (SAFETENSORS_DTYPES[info["dtype"]], info["shape"], *info["data_offsets"])
        if 8 + length + info["data_offsets"][1] > size:
            raise ConfigError(f"{path}: ends before tensor {key} does ({size} bytes): a truncated file? Download "
                              "or copy it again")
    return 8 + length, entries


def _first_names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _conversions(model: PreTrainedModel) -> tuple[list, list]:
    """transformers' checkpoint-to-model key renamings for this architecture (what from_pretrained applies)."""
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])
