"""Weights into FSDP units one unit at a time: at start from the model folder, at the end from the `best` export.

At start, every rank builds the same meta skeleton and FSDP wraps it unit by unit (a decoder layer, a vision
block, then the root with the embeddings and lm_head). Just before it flattens a unit, FSDP calls
`param_init_fn` for each of the unit's modules; `UnitMaterializer` gives those modules storage and values. So
no rank, rank 0 included, ever holds more than its shards plus the one unit being flattened: the tensors are
read from the safetensors files one at a time (`ftloop.hf_folder.FolderWeights`), cast to the master dtype as
they are read, never gathered into a state dict.

Who reads: rank 0 reads each tensor and broadcasts it (the default), or every rank reads it from the files
itself (`--load-weights-on every-rank`, no broadcast; the page cache serves the ranks of a node). See the README
for the measured load times of both. Buffers that the checkpoint does not hold (the rotary inverse frequencies)
are computed on every rank by the model's own initialisation, as `from_pretrained` computes them.

Every tensor read is checked finite (one sum per tensor; the count only for one that is not): a NaN or inf in the
folder, even in an embedding row no token uses, would otherwise be trained on (every step skipped as non-finite)
or exported as it is. One that is not stops every rank at once with the reading rank's line naming the tensor and
its file: after a broadcast every rank checks the same values (no collective); when every rank read its own copy,
they agree in one small all-reduce per tensor.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from tqdm import tqdm
from transformers import PreTrainedModel
from transformers import initialization as hf_init

from ftloop.distributed import World, agree
from ftloop.errors import ConfigError
from ftloop.fsdp.internals import clean_name, unit_parameters
from ftloop.hf_folder import FolderWeights
from ftloop.lora import AdapterWeights, is_adapter


class UnitMaterializer:
    """FSDP `param_init_fn`: real storage and checkpoint values for the parameters and buffers of a meta module.

    FSDP calls it for every module of a unit (breadth first, the same order on every rank) before flattening
    the unit. Tied weights (lm_head and the input embedding) stay one tensor: a meta tensor seen twice is
    materialised once.
    """

    def __init__(self, hf_model: PreTrainedModel, weights: FolderWeights | None, world: World,
                 every_rank_reads: bool = False,
                 new_parameter: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        """`hf_model`: the meta skeleton (inside whatever module FSDP wraps); its names are the folder's (once
        `clean_name` has taken LoRA's `base_layer.` out). `weights`: the folder on the ranks that read it
        (`open_weights`), None on the others. `new_parameter(name, meta)`: the value of a parameter the folder
        does not hold (LoRA adapters: ftloop.lora.initial_adapter), the same on every rank; None for the others."""
        self.hf_model = hf_model
        self.names = {module: name for name, module in hf_model.named_modules(remove_duplicate=False)}
        # What the checkpoint holds, known on every rank: FolderWeights has checked that it is exactly the
        # skeleton's parameters and persistent buffers (but LoRA's adapters, `new_parameter`'s). The rest
        # (non-persistent buffers) is computed.
        self.in_checkpoint = {clean_name(name) for name in hf_model.state_dict(keep_vars=True)}
        self.new_parameter = new_parameter
        self.weights, self.device, self.world = weights, world.device, world
        self.broadcast = world.world_size > 1 and not every_rank_reads
        self.reads = weights is not None
        # Tensors cross to the device, and from rank 0 to the others, as stored (bf16 in most folders) and are cast
        # to the master dtype there: on the GPUs, not by rank 0's one host core while the others wait in the
        # broadcast, and with half the bytes to send when the masters are fp32. The receivers need the stored
        # dtypes to receive into: rank 0 shares them once (one collective).
        self.stored = agree(world, weights.stored_dtypes if self.reads else lambda: None, "rank 0",
                            share=True) if self.broadcast else None
        # id(meta) -> (meta, weak ref to its real tensor). Weak, so that a unit's tensors die as soon as FSDP has
        # flattened and sharded them; the meta tensor is kept so that its id is never reused.
        self.done: dict[int, tuple[torch.Tensor, weakref.ref]] = {}
        # minutes at 72B: a count of the tensors loaded on rank 0 (closed by the caller once FSDP has wrapped)
        self.progress = tqdm(desc="loading weights", unit="tensor", leave=False, disable=not world.is_main)

    def __call__(self, module: nn.Module) -> None:
        path = self.names.get(module)
        if path is None:  # a wrapper around the Hugging Face model: it must own nothing to load
            if any(t is not None and t.is_meta for t in [*module._parameters.values(), *module._buffers.values()]):
                raise ValueError(f"{type(module).__name__} owns tensors that are not the Hugging Face model's")
            return
        computed = []
        for slots, is_param in ((module._parameters, True), (module._buffers, False)):
            for key, meta in list(slots.items()):
                if meta is None or not meta.is_meta:
                    continue
                if id(meta) in self.done:  # tied: a second name for a tensor already given storage
                    real = self.done[id(meta)][1]()
                    if real is None:
                        raise ValueError(f"{path}.{key}: tied to a tensor of another FSDP unit, which that unit "
                                         "flattened already; ftloop cannot wrap this tie")
                    slots[key] = real
                    continue
                name = clean_name(f"{path}.{key}" if path else key)
                if not is_param and name not in self.in_checkpoint:
                    computed.append((key, meta))
                    continue
                real = self.new_parameter(name, meta) if is_param and self.new_parameter else None
                real = self._receive(name, meta) if real is None else real.to(self.device)
                if is_param:
                    real = nn.Parameter(real, requires_grad=meta.requires_grad)
                self.done[id(meta)] = (meta, weakref.ref(real))
                slots[key] = real
        if computed:
            self._compute_buffers(module, path, computed)

    def _receive(self, name: str, meta: torch.Tensor) -> torch.Tensor:
        self.progress.update()
        if self.reads:  # shapes were checked against the headers by FolderWeights
            tensor = self.weights.read(name).to(self.device).contiguous()
        else:
            tensor = torch.empty(meta.shape, dtype=self.stored[name], device=self.device)
        if self.broadcast:
            dist.broadcast(tensor, src=0)
        if tensor.is_floating_point() and tensor.dtype != meta.dtype:
            tensor = tensor.to(meta.dtype)  # on the device
        count = nonfinite_count(tensor)  # this rank's values: rank 0's after a broadcast, else its own copy's
        anywhere = count
        if self.world.world_size > 1 and not self.broadcast:  # every rank read its own copy: agree
            counts = torch.tensor([count], dtype=torch.int64, device=self.device)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            anywhere = int(counts.item())
        if anywhere:
            stop_nonfinite(self.world, self.weights, name, count)
        return tensor

    def _compute_buffers(self, module: nn.Module, path: str, buffers: list[tuple[str, torch.Tensor]]) -> None:
        """Buffers the checkpoint does not hold, computed on the host by the model's initialisation. They start
        as NaN (or the lowest integer), so one that the initialisation does not compute is an error, never
        garbage."""
        for key, meta in buffers:
            fill = math.nan if meta.is_floating_point() else torch.iinfo(meta.dtype).min
            module._buffers[key] = torch.full(meta.shape, fill, dtype=meta.dtype)
        # The model's own initialisation (what from_pretrained runs for tensors the checkpoint lacks); the
        # tensors loaded above are flagged as initialised, which transformers' init functions respect.
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None and tensor.is_floating_point() and not tensor.isnan().any():
                tensor._is_hf_initialized = True
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            self.hf_model._init_weights(module)
        for key, meta in buffers:
            value = module._buffers[key]
            unset = value.isnan() if value.is_floating_point() else value == torch.iinfo(value.dtype).min
            if unset.any():
                raise ValueError(f"{path}.{key}: a buffer that is neither in the checkpoint nor computed by the "
                                 f"model's initialisation; ftloop cannot load {type(module).__name__}")
            module._buffers[key] = value.to(self.device)
            self.done[id(meta)] = (meta, weakref.ref(module._buffers[key]))


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many values of `tensor` are NaN or infinite (0 for integers and booleans). One sum, without a temporary
    of the tensor's size, whose result is finite when every value is (a sum past the dtype's range, which no weights
    reach, is counted exactly and cleared); the exact count only for a tensor that is not."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if math.isfinite(tensor.sum().item()):
        return 0
    return int(torch.isfinite(tensor).logical_not().sum().item())


def stop_nonfinite(world: World, weights, name: str, count: int) -> None:
    """Raise, on every rank at once (collective: every rank calls it for the same tensor), the ConfigError line of a
    rank that read `name` and found `count` NaN or infinite values in it: `weights.nonfinite_line` (FolderWeights),
    or a plain line for a reader without one (LoRA's adapters)."""
    def said() -> None:
        if weights is not None and count:
            describe = getattr(weights, "nonfinite_line", None)
            raise ConfigError(describe(name, count) if describe is not None else
                              f"{name}: {count} NaN/inf values in the weights read back; they are damaged")

    agree(world, said)  # raises the first reading rank's line on every rank
    raise ConfigError(f"{name}: NaN/inf values in the weights read; they are damaged")


def open_weights(folder_of: Callable[[], str], skeleton: PreTrainedModel, flag: str, world: World,
                 every_rank_reads: bool) -> FolderWeights | None:
    """The folder's weights on the ranks that read them (rank 0, or every rank), None on the others, which then
    need neither the files nor their folder. A problem found on any rank (a missing file, a tensor of the wrong
    name or shape) stops every rank with the same one-line ConfigError (ftloop.distributed.agree), instead of
    leaving the others waiting in a broadcast."""
    def read_headers() -> FolderWeights:
        # The folder's tensors are the skeleton's, by their names as built: without LoRA's adapters, and without
        # `base_layer.` where an adapter wraps a projection.
        expected = {clean_name(name): tensor for name, tensor in skeleton.state_dict(keep_vars=True).items()
                    if not is_adapter(name)}
        return FolderWeights(folder_of(), skeleton, flag, expected)

    return agree(world, read_headers, "every rank" if every_rank_reads else "rank 0")


def open_adapters(folder: str, model: FSDP, prefix: str, world: World) -> AdapterWeights | None:
    """A LoRA run's `best` adapters (ftloop.lora), opened on rank 0, which reads them; None on the others. A
    missing file or adapter stops every rank with the same one-line ConfigError, instead of leaving the others
    waiting for rank 0's broadcast."""
    expected = [name.removeprefix(prefix) for _, entries in unit_parameters(model) for name, _, _ in entries
                if is_adapter(name)]
    return agree(world, lambda: AdapterWeights(folder, expected), "rank 0")


@torch.no_grad()
def load_weights_into(model: FSDP, weights: FolderWeights | None, world: World, prefix: str = "",
                      only: Callable[[str], bool] | None = None) -> None:
    """Overwrite a wrapped model's parameters with a folder's, one FSDP unit at a time, on every rank (e.g. the
    `best` export back into the model at the end). Collective; `weights` (anything with `read(name, dtype)`) is
    needed on rank 0 only. Each unit is gathered, rank 0 reads its tensors into the gathered parameters and
    broadcasts them, and every rank writes its shard back: no rank holds more than one unit beyond its shards.
    `only(name)`: the parameters to overwrite (units holding none of them are left alone); default all. A tensor that
    is not finite stops every rank with rank 0's line (`stop_nonfinite`): each checks the values broadcast."""
    units = unit_parameters(model)  # minutes at 72B: a bar on rank 0
    for unit, entries in tqdm(units, desc="loading weights", unit="unit", leave=False, disable=not world.is_main):
        if only is not None:
            entries = [entry for entry in entries if only(entry[0].removeprefix(prefix))]
            if not entries:
                continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            for name, module, attribute in entries:
                tensor = getattr(module, attribute)
                if world.is_main:
                    tensor.copy_(weights.read(name.removeprefix(prefix), tensor.dtype))
                if world.world_size > 1:
                    dist.broadcast(tensor.data, src=0)
                if count := nonfinite_count(tensor.data):  # every rank holds rank 0's values: the same verdict
                    stop_nonfinite(world, weights if world.is_main else None, name.removeprefix(prefix), count)
