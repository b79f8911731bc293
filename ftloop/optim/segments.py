"""Where each original parameter lives inside what an FSDP1 optimizer sees.

Under FSDP1 the optimizer never sees a parameter's shape. With `use_orig_params=False` it sees one 1-D
flat shard per FSDP unit, holding contiguous slices of several original parameters; with
`use_orig_params=True` it sees each original parameter as a 1-D slice (possibly empty) of its flattened
self. A `Segment` records, for one original parameter, its full shape, where its local slice sits in the
tensor the optimizer steps, and which elements of the full parameter that slice holds. That is all an
optimizer needs to compute statistics of the full parameter from local slices plus one all-reduce.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.fsdp.internals import flat_shards


@dataclass(frozen=True)
class Segment:
    name: str  # the original parameter's name in the unwrapped model
    shape: tuple[int, ...]  # its full shape
    offset: int  # where its local slice starts in the tensor the optimizer steps
    numel: int  # elements held locally (0 when they all live on other ranks)
    first: int  # index, in the flattened full parameter, of the first local element
    lr_scale: float = 1.0  # learning rate relative to the group's (per-part learning rates)
    decay: bool = True  # whether weight decay applies
    pieces: tuple[tuple[int, int, int], ...] = ()  # every rank's slice (ftloop.fsdp.internals.LocalSlice); () unsharded

    @property
    def factored(self) -> bool:
        return len(self.shape) >= 2

    @property
    def full_numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Rows of the (batch x rows) x cols view: every leading dim folded into rows."""
        return self.full_numel // self.shape[-1]


@dataclass
class SteppedTensor:
    """One tensor the optimizer steps, the segments inside it, and the ranks that share its parameters."""
    tensor: torch.Tensor
    segments: list[Segment]
    group: dist.ProcessGroup | None  # None: nothing is sharded (one rank, or NO_SHARD)


def default_settings(name: str, shape: tuple[int, ...]) -> tuple[float, bool]:
    """(lr_scale, decay): everything at the group's lr; no weight decay on biases and norm weights (1-D)."""
    return 1.0, len(shape) >= 2


def describe_fsdp(model: FSDP, settings: Callable[[str, tuple], tuple[float, bool]] = default_settings,
                  strip_prefix: str = "") -> list[SteppedTensor]:
    """The optimizer-visible tensors of an FSDP1 model, each with its segments, in a rank-independent order."""
    out = []
    for shard in flat_shards(model):
        segments = []
        for piece in shard.slices:
            name = piece.name.removeprefix(strip_prefix)
            segments.append(Segment(name, piece.shape, piece.offset, piece.numel, piece.first,
                                    *settings(name, piece.shape), pieces=piece.pieces))
        if shard.originals is None:  # use_orig_params=False: the optimizer steps the flat shard
            out.append(SteppedTensor(shard.flat, segments, shard.group))
        else:  # use_orig_params=True: each original parameter is its own 1-D slice
            for param, segment in zip(shard.originals, segments):
                out.append(SteppedTensor(param, [dataclasses.replace(segment, offset=0)], shard.group))
    return out


def row_pieces(first: int, numel: int, cols: int) -> list[tuple[int, int, int, int, int]]:
    """Split elements [first, first + numel) of a row-major (rows x cols) matrix into rectangular pieces.

    Each piece is (local start, first row, number of rows, first col, end col): a partial first row, a
    block of whole rows, a partial last row. A piece of n rows and cols [c0, c1) covers n * (c1 - c0)
    consecutive local elements, so it can be viewed as an (n, c1 - c0) matrix without copying.
    """
    pieces, local, index, end = [], 0, first, first + numel
    while index < end:
        row, col = divmod(index, cols)
        if col or end - index < cols:  # a partial row
            stop = min(end, (row + 1) * cols)
            pieces.append((local, row, 1, col, col + stop - index))
        else:  # as many whole rows as fit
            n = (end - index) // cols
            stop = index + n * cols
            pieces.append((local, row, n, 0, cols))
        local += stop - index
        index = stop
    return pieces
