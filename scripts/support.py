"""Helpers the benchmarks and the tests share, kept out of the ftloop package (nothing of ftloop calls them):
`from scripts.support import ...` with the repository on sys.path (the tests have it; the scripts add it)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

from ftloop.model import WRAPPER_PREFIX
from ftloop.optim.segments import Segment, SteppedTensor, default_settings


def full_state_dict(model: FSDP) -> dict[str, torch.Tensor]:
    """Every parameter gathered to rank 0's host memory at once (empty dict on the other ranks): what exports did
    before they streamed, and what the tests compare a streamed export against."""
    # On a CPU run the shards already live in host memory, and FSDP's offload path would free the very
    # storage it just gathered (it assumes a device-to-host copy), so offload only from accelerators.
    on_cpu = next(model.parameters()).device.type == "cpu"
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return {name.removeprefix(WRAPPER_PREFIX): tensor for name, tensor in state.items()}


def widen(config, hidden: int, layers: int):
    """A Qwen2.5-VL config with `layers` decoder layers of width `hidden` (heads of 64, 2 KV heads, an MLP of 3x),
    in place: the sizes the memory tests and benchmarks measure at, beyond what the demo needs."""
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 3 * hidden, layers
    text.num_attention_heads, text.num_key_value_heads = hidden // 64, 2
    text.layer_types = ["full_attention"] * layers
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # head_dim 64 -> 32 rotary pairs
    config.vision_config.out_hidden_size = hidden
    return config


def describe_plain(model: nn.Module, settings=default_settings) -> list[SteppedTensor]:
    """ftloop's optimizer layout for an unwrapped model: each parameter whole, nothing to reduce."""
    out = []
    for name, param in model.named_parameters():
        lr_scale, decay = settings(name, tuple(param.shape))
        out.append(SteppedTensor(param, [Segment(name, tuple(param.shape), 0, param.numel(), 0, lr_scale, decay)],
                                 None))
    return out


def describe_flat_units(model: nn.Module, settings=default_settings) -> list[SteppedTensor]:
    """ftloop's optimizer layout as FSDP1 hands it over in a run, without FSDP: the parameters of each FSDP unit
    (ftloop.model.unit_roots: every decoder layer and vision block; the rest is the root unit) moved into one flat
    tensor, their gradients into one flat gradient, one SteppedTensor a unit. The model's parameters become views
    of the flat tensors and accumulate their gradients there: clear them with `zero_grad(set_to_none=False)`."""
    from ftloop.model import unit_roots

    roots = unit_roots(getattr(model, "hf", model))  # the Hugging Face model inside ftloop's VisionLanguageSFT
    owner = {}
    for root in roots:
        for param in root.parameters():
            owner.setdefault(id(param), root)
    units: dict = {}
    for name, param in model.named_parameters():
        units.setdefault(owner.get(id(param)), []).append((name, param))
    out = []
    for params in units.values():
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for _, p in params]))
        flat.grad = torch.zeros_like(flat)
        segments, offset = [], 0
        for name, param in params:
            size = param.numel()
            param.data = flat.data[offset:offset + size].view_as(param)
            param.grad = flat.grad[offset:offset + size].view_as(param)
            segments.append(Segment(name, tuple(param.shape), offset, size, 0, *settings(name, tuple(param.shape))))
            offset += size
        out.append(SteppedTensor(flat, segments, None))
    return out

