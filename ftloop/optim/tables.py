"""Flat statistics and index tables that let ShardedAdafactor step every FSDP unit with a fixed number of kernels,
however many original parameters the unit holds, and the whole model's statistics with a fixed number more.

All stepped tensors that share a process group form a `Bank`. Its statistics are flat buffers: the row statistics of
every matrix one after the other (R floats), the column statistics (C: for a batch of matrices, each matrix's
columns), a float per parameter (S: its RMS), and the second moments of the vectors' local elements (V). A step's
local sums go to one buffer laid out as

    [ rows R | columns C | parameters S | spare | vectors V | spare ]

whose first R + C + S + 1 floats are all-reduced in place, and the factors a gradient is multiplied by come from a
table of the same layout: [ row factors | column factors | 1 ... | vector factors | 0 ].

The local elements of a stepped tensor are cut, in order, into *pieces*: a run of elements in one row of one matrix
(a segment's partial first row, each of its whole rows, its partial last row), or a single element of a vector
(a 1-D parameter) or of the padding FSDP leaves between and after parameters. Every element lies in one piece, so
- per-row sums of a whole unit are one `torch.segment_reduce` over the pieces' lengths, which `index_add_` puts on
  their rows (`piece_row`; each rank holds a row at most once; a vector element's piece goes to its own second moment,
  padding to the spare float at the end, whose factor is 0);
- a per-row factor reaches every element with one `repeat_interleave` over the same lengths;
- an element's column is its position plus its piece's `piece_col`, so per-column sums are one `index_add_` (vector
  elements and padding point at the spare float after the parameters, whose factor is 1).
Elements also fall into *runs* of one segment (or of padding: segment S), for what each parameter has of its own: the
sums of p^2 and of update^2, its learning rate and clipping, its weight decay.

Work is done in chunks of at most `chunk_elements` elements (cut between pieces), which bounds a step's temporaries
(a few fp32 and int32 copies of one chunk) whatever the size of a unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ftloop.optim.segments import Segment, SteppedTensor, row_pieces


@dataclass
class Chunk:
    """Elements [start, stop) of a stepped tensor, with the pieces and runs that cover them exactly."""
    start: int
    stop: int
    lengths: Tensor  # (pieces,) int32: each piece's length
    piece_row: Tensor  # (pieces,) int32: where the piece's sum goes and its row factor comes from
    piece_col: Tensor  # (pieces,) int32: column of its first element minus that element's position in the chunk
    run_lengths: Tensor  # (runs,) int32: lengths of the runs of one segment (or of padding)
    run_segment: Tensor  # (runs,) int32: the run's segment in the bank; padding is S

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class Place:
    """Where one segment's statistics sit in its bank's buffers."""
    segment: Segment
    index: int  # the segment's number in the bank (its RMS, learning rate, ...)
    row: int = 0  # first row in the row statistics (factored)
    col: int = 0  # first column in the column statistics (factored)
    vector: int = 0  # first element in the vectors' second moments (1-D)
    batches: int = 0  # matrices in a factored segment (the product of its leading dims)


@dataclass
class Unit:
    """One stepped tensor of a bank."""
    entry: SteppedTensor
    number: int  # its place in the optimizer's layout
    places: list[Place]
    spans: dict[str, range]  # its part of the bank's row, col, vector and RMS buffers
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Bank:
    """Every stepped tensor of one process group, and the static tables of their flat statistics."""
    group: object  # torch.distributed.ProcessGroup, or None when nothing is sharded
    units: list[Unit]
    rows: int  # R
    cols: int  # C
    segments: int  # S
    vector: int  # V
    row_cols: Tensor  # (R,) fp32: columns in each row, the divisor of its mean over columns
    col_rows: Tensor  # (C,) fp32: rows of each column's matrix, the divisor of its mean over rows
    row_groups: Tensor  # (matrices,) int32: rows of each matrix in order, for the mean of a matrix's row statistics
    group_rows: Tensor  # (matrices,) fp32: the same, as the mean's divisor
    full_numel: Tensor  # (S + 1,) fp32: elements of each full parameter (1 for padding)
    lr_scale: Tensor  # (S + 1,) fp32: each segment's learning-rate scale
    lr_scale64: Tensor  # (S + 1,) fp64: the same, to scale a python lr exactly as a python product does
    decays: Tensor  # (S + 1,) fp64: 1 where weight decay applies, else 0
    ones: Tensor  # (S + 1,) the factor table's ones
    zero: Tensor  # (1,) and its zero

    @property
    def reduced(self) -> int:
        """Floats of the sums that are all-reduced: rows, columns, parameters, the spare."""
        return self.rows + self.cols + self.segments + 1

    @property
    def sums_size(self) -> int:
        return self.reduced + self.vector + 1


def _pieces(place: Place, bank_row: int, vector_base: int, spare_col: int) -> list[Tensor]:
    """(starts, lengths, piece_row, column of the first element) of one segment's local slice."""
    seg = place.segment
    if not seg.factored:
        index = torch.arange(seg.numel)
        return [seg.offset + index, torch.ones(seg.numel, dtype=torch.long), vector_base + place.vector + index,
                torch.full((seg.numel,), spare_col, dtype=torch.long)]
    width, per_matrix = seg.shape[-1], seg.shape[-2]
    parts = [[], [], [], []]
    for local, row, n, c0, c1 in row_pieces(seg.first, seg.numel, width):
        index = torch.arange(n)
        parts[0].append(seg.offset + local + index * (c1 - c0))
        parts[1].append(torch.full((n,), c1 - c0, dtype=torch.long))
        parts[2].append(place.row + row + index)
        parts[3].append(bank_row + place.col + (row + index) // per_matrix * width + c0)
    return [torch.cat(part) if part else torch.zeros(0, dtype=torch.long) for part in parts]


def _chunks(unit: Unit, numel: int, bank: dict, device, chunk_elements: int) -> list[Chunk]:
    """Cover elements [0, numel) of one stepped tensor with pieces and runs, cut into chunks."""
    vector_base, spare_row, spare_col, padding = bank["vector_base"], bank["spare_row"], bank["spare_col"], bank["S"]
    parts, runs, covered = [], [], 0
    for place in sorted(unit.places, key=lambda p: p.segment.offset):
        seg = place.segment
        if seg.numel == 0:
            continue
        if seg.offset > covered:
            runs.append((covered, seg.offset - covered, padding))
        parts.append(_pieces(place, bank["R"], vector_base, spare_col))
        runs.append((seg.offset, seg.numel, place.index))
        covered = seg.offset + seg.numel
    if numel > covered:
        runs.append((covered, numel - covered, padding))
    for start, length, segment in runs:  # padding: a piece per element, row factor 0, column factor 1
        if segment == padding:
            parts.append([start + torch.arange(length), torch.ones(length, dtype=torch.long),
                          torch.full((length,), spare_row, dtype=torch.long),
                          torch.full((length,), spare_col, dtype=torch.long)])
    if not parts:
        return []
    starts, lengths, piece_row, first_col = (torch.cat(column) for column in zip(*parts))
    order = torch.argsort(starts)
    starts, lengths, piece_row, first_col = starts[order], lengths[order], piece_row[order], first_col[order]
    runs.sort()

    chunks = []
    cuts = sorted({cut for cut in torch.searchsorted(starts, torch.arange(0, numel, chunk_elements)).tolist()
                   if cut < len(starts)})
    for first, last in zip(cuts, cuts[1:] + [len(starts)]):
        start = int(starts[first])
        stop = int(starts[last]) if last < len(starts) else numel
        inside = [(max(s, start), min(s + n, stop) - max(s, start), seg) for s, n, seg in runs
                  if s < stop and s + n > start]

        def on_device(values: Tensor | list) -> Tensor:
            return torch.as_tensor(values, dtype=torch.int32).to(device)

        chunks.append(Chunk(start, stop, on_device(lengths[first:last]), on_device(piece_row[first:last]),
                            on_device(first_col[first:last] - (starts[first:last] - start)),
                            on_device([n for _, n, _ in inside]), on_device([seg for _, _, seg in inside])))
    return chunks


def build_banks(layout: list[SteppedTensor], chunk_elements: dict[str, int]) -> list[Bank]:
    """One bank per process group of `layout`, in order of first appearance; chunk sizes by device type."""
    by_group: dict = {}
    for number, entry in enumerate(layout):
        by_group.setdefault(entry.group, []).append((number, entry))
    return [_bank(group, entries, chunk_elements) for group, entries in by_group.items()]


def _bank(group, entries: list[tuple[int, SteppedTensor]], chunk_elements: dict[str, int]) -> Bank:
    devices = {entry.tensor.device for _, entry in entries}
    if len(devices) != 1:
        raise ValueError(f"ShardedAdafactor: the tensors of one process group are on several devices: {devices}")
    device = devices.pop()
    units, rows, cols, segments, vector = [], 0, 0, 0, 0
    for number, entry in entries:
        places, before = [], (rows, cols, vector, segments)
        for seg in entry.segments:
            place = Place(seg, segments, row=rows, col=cols, vector=vector)
            segments += 1
            if seg.factored:
                place.batches = seg.rows // seg.shape[-2]
                rows += seg.rows
                cols += place.batches * seg.shape[-1]
            else:
                vector += seg.numel
            places.append(place)
        spans = {key: range(start, stop) for key, start, stop in
                 zip(("row", "col", "vector", "RMS"), before, (rows, cols, vector, segments))}
        units.append(Unit(entry, number, places, spans))
    reduced = rows + cols + segments + 1
    offsets = dict(R=rows, S=segments, vector_base=reduced, spare_row=reduced + vector, spare_col=rows + cols + segments)
    chunk = chunk_elements.get(device.type, chunk_elements["cpu"])
    for unit in units:
        unit.chunks = _chunks(unit, unit.entry.tensor.numel(), offsets, device, chunk)

    places = [place for unit in units for place in unit.places]
    factored = [p for p in places if p.segment.factored]

    def repeated(value, count, dtype=torch.float32) -> Tensor:  # `value` `count` times per factored segment
        parts = [torch.full((count(p),), value(p), dtype=dtype) for p in factored]
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)).to(device)

    def per_segment(value, padding, dtype=torch.float32) -> Tensor:
        return torch.tensor([value(p.segment) for p in places] + [padding], dtype=dtype, device=device)

    return Bank(
        group=group, units=units, rows=rows, cols=cols, segments=segments, vector=vector,
        row_cols=repeated(lambda p: p.segment.shape[-1], lambda p: p.segment.rows),
        col_rows=repeated(lambda p: p.segment.shape[-2], lambda p: p.batches * p.segment.shape[-1]),
        row_groups=repeated(lambda p: p.segment.shape[-2], lambda p: p.batches, torch.int32),
        group_rows=repeated(lambda p: p.segment.shape[-2], lambda p: p.batches),
        full_numel=per_segment(lambda s: s.full_numel, 1.0),
        lr_scale=per_segment(lambda s: s.lr_scale, 1.0),
        lr_scale64=per_segment(lambda s: s.lr_scale, 1.0, torch.float64),
        decays=per_segment(lambda s: float(s.decay), 0.0, torch.float64),
        ones=torch.ones(segments + 1, device=device), zero=torch.zeros(1, device=device))


def spread(values: Tensor, index: Tensor, lengths: Tensor, numel: int) -> Tensor:
    """values[index[k]] repeated lengths[k] times, for every k in order: a per-piece or per-run value on every
    element (`numel` = lengths' sum, given so that nothing reads it back from the device)."""
    return values.index_select(0, index).repeat_interleave(lengths, output_size=numel)
