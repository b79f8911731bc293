"""Qwen3.5's linear-attention (Gated DeltaNet) layers: which implementation runs them, and how a packed micro-batch
keeps its rows apart in them.

A DeltaNet layer carries a recurrent state and a causal conv1d's window from token to token, which position ids do
not reset, so a packed row would read the row before it. Each layer is told where the rows start, in one call per
layer on every path: FSDP units inside the layer (LoRA's adapter matrices) gather their weights at each call, so a
call per row, whose count differs from rank to rank, would leave the ranks in different collectives (a hang).

- With flash-linear-attention and causal-conv1d (both import, as transformers imports them), the micro-batch runs as
  one sequence with the rows' offsets (`cu_seq_lens_q`, which transformers hands fla as `cu_seqlens`; also
  `cu_seqlens_cpu`, the host's copy, which fla versions that take it use instead of reading the device's) and each
  position's row (`seq_idx`, for causal-conv1d).
- On transformers' torch path, which refuses both, its two sequence functions are replaced in its Qwen3.5 module by
  ones that take the same offsets (on the host: no sync) and run transformers' own functions row by row
  (`_conv_by_rows`, `_rule_by_rows`); the projections around them run once.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import sys
from dataclasses import dataclass

import torch
from torch import nn

# name: (module, function) as transformers imports them for Qwen3.5
KERNELS = {"flash-linear-attention": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
           "causal-conv1d": ("causal_conv1d", "causal_conv1d_fn")}


@functools.cache
def missing_kernels() -> tuple[str, ...]:
    """The kernels that do not import (installed but broken counts as missing, as transformers then falls back)."""
    missing = []
    for name, (module, function) in KERNELS.items():
        try:
            if getattr(importlib.import_module(module), function, None) is None:
                missing.append(name)
        except Exception:  # noqa: BLE001  (transformers treats any failure to import as absent)
            missing.append(name)
    return tuple(missing)


def linear_attention_kernels() -> bool:
    """Whether transformers runs linear-attention layers with both kernels, not its torch path."""
    return not missing_kernels()


@dataclass
class PackedRows:
    """Where a packed micro-batch's rows start: the lengths of the segments that cover its positions in order
    (ftloop.data.batches.segment_layout), their offsets from 0 on the host, and for the kernels the same offsets
    (int64) and each position's segment (int32, 1 x positions) on the device."""
    lengths: tuple[int, ...]
    host_starts: torch.Tensor
    starts: torch.Tensor | None = None
    row_of: torch.Tensor | None = None

    @classmethod
    def of(cls, lengths: tuple[int, ...], starts: torch.Tensor | None = None,
           row_of: torch.Tensor | None = None) -> PackedRows:
        return cls(lengths, torch.tensor((0, *itertools.accumulate(lengths))), starts, row_of)


def keep_rows_apart(modules: list[nn.Module], kernels: bool) -> None:
    """Give each linear-attention module the `packed_rows` argument (`rows_apart`); on the torch path, make
    transformers' sequence functions in the modules' own code take row offsets."""
    for module in modules:
        module.forward = functools.partial(rows_apart, module.forward)
        if not kernels:
            code = sys.modules[type(module).__module__]
            if not getattr(code.causal_conv1d_fn, "by_rows", False):
                code.causal_conv1d_fn = functools.partial(_conv_by_rows, code.causal_conv1d_fn)
                code.causal_conv1d_fn.by_rows = True
                code.torch_chunk_gated_delta_rule = functools.partial(_rule_by_rows, code.torch_chunk_gated_delta_rule)


def rows_apart(forward, hidden_states: torch.Tensor, *args, packed_rows: PackedRows | None = None,
               **kwargs) -> torch.Tensor:
    """A linear-attention layer's `forward`; on a packed micro-batch, one call over it as one sequence, each row (and
    each sequence's padding) from a zero state and the conv1d's zero padding, exactly as unpacked."""
    if packed_rows is None:
        return forward(hidden_states, *args, **kwargs)
    width = hidden_states.shape[-1]
    if packed_rows.starts is not None:  # the kernels
        bounds = {"cu_seq_lens_q": packed_rows.starts, "cu_seqlens_cpu": packed_rows.host_starts,
                  "seq_idx": packed_rows.row_of}
    else:
        bounds = {"cu_seq_lens_q": packed_rows.host_starts}
    out = forward(hidden_states.reshape(1, -1, width), *args, **bounds, **kwargs)
    return out.view(*hidden_states.shape[:-1], out.shape[-1])


def _conv_by_rows(conv, x, weight, bias=None, activation=None, cu_seq_lens_q=None, **kwargs):
    """transformers' torch causal conv1d, row by row when given the rows' host offsets (x: batch 1, channels,
    positions)."""
    if cu_seq_lens_q is None:
        return conv(x, weight, bias, activation=activation, **kwargs)
    rows = x.split(cu_seq_lens_q.diff().tolist(), dim=2)
    return torch.cat([conv(row, weight, bias, activation=activation) for row in rows], dim=2)


def _rule_by_rows(rule, query, key, value, g, beta, cu_seqlens=None, **kwargs):
    """transformers' torch chunked gated delta rule, row by row from a zero state when given the rows' host offsets
    (tensors: batch 1, positions, heads[, dim]); training asks for no final state."""
    if cu_seqlens is None:
        return rule(query, key, value, g=g, beta=beta, **kwargs)
    bounds = cu_seqlens.tolist()
    out = [rule(query[:, a:b], key[:, a:b], value[:, a:b], g=g[:, a:b], beta=beta[:, a:b], **kwargs)[0]
           for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out, dim=1), None
