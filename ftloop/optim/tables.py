"""Flat statistics and index tables that let ShardedAdafactor step a model with a fixed number of kernels per chunk
of its elements, however many original parameters and FSDP units it has.

All stepped tensors that share a process group form a `Bank`. Its statistics are flat buffers: the row statistics of
every matrix one after the other (R floats), the column statistics (C: for a batch of matrices, each matrix's
columns), a float per parameter (S: its RMS), the second moments of the vectors' local elements (V), and per local
element (E, the sum of the tensors' sizes) the first moment and the Kahan buffer when they are asked for. A step's
local sums go to one buffer laid out as

    [ rows R | columns C | parameters S | spare | vectors V | spare ]

whose first R + C + S + 1 floats are all-reduced in place, and the factors a gradient is multiplied by come from a
table of the same layout: [ row factors | column factors | 1 ... | vector factors | 0 ].

The bank's elements are worked on in *chunks* of at most `chunk_elements`, which bounds a step's temporaries (a few
fp32 and int32 copies of a chunk) and its kernels (a fixed number per chunk) together: a tensor of `pack_below`
elements or more has chunks of its own (cut between rows when it is larger than a chunk); smaller ones are packed
whole into shared chunks (their gradients and weights concatenated, the results written back with one foreach copy:
copies that cost less than the kernels they save below that size).

The elements of a chunk are cut, in order, into *pieces*: a run of elements in one row of one matrix (a segment's
partial first row, each of its whole rows, its partial last row), or a single element of a vector (a 1-D parameter)
or of the padding FSDP leaves between and after parameters. Every element lies in one piece, so
- per-row sums are one `torch.segment_reduce` over the pieces' lengths, which `index_add_` puts on their rows
  (`piece_row`; each rank holds a row at most once; a vector element's piece goes to its own second moment, padding
  to the spare float at the end, whose factor is 0);
- a per-row factor reaches every element with one `repeat_interleave` over the same lengths;
- an element's column is its position plus its piece's `piece_col`, so per-column sums are one `index_add_` (vector
  elements and padding point at the spare float after the parameters, whose factor is 1).
Elements also fall into *runs* of one segment (or of padding: segment S), for what each parameter has of its own: the
sums of p^2 and of update^2, its learning rate and clipping, its weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ftloop.optim.segments import Segment, SteppedTensor, row_pieces


@dataclass
class Chunk:
    """Elements [start, stop) of a bank, made of `parts` (unit, first, last local element) in order, with the pieces
    and runs that cover them exactly (positions counted from the chunk's start)."""
    start: int
    stop: int
    parts: list[tuple[int, int, int]]
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
    places: list[Place]
    spans: dict[str, range]  # its part of the bank's row, col, vector, RMS and element buffers


@dataclass
class Bank:
    """Every stepped tensor of one process group, and the static tables of their flat statistics."""
    group: object  # torch.distributed.ProcessGroup, or None when nothing is sharded
    units: list[Unit]
    chunks: list[Chunk]
    rows: int  # R
    cols: int  # C
    segments: int  # S
    vector: int  # V
    elements: int  # E
    row_cols: Tensor  # (R,) fp32: columns in each row, the divisor of its mean over columns
    col_rows: Tensor  # (C,) fp32: rows of each column's matrix, the divisor of its mean over rows
    row_groups: Tensor  # (matrices,) int32: rows of each matrix in order, for the mean of a matrix's row statistics
    group_rows: Tensor  # (matrices,) fp32: the same, as the mean's divisor
    full_numel: Tensor  # (S + 1,) fp32: elements of each full parameter (1 for padding)
    lr_scale: Tensor  # (S + 1,) fp64: each segment's learning-rate scale, to scale a python lr as a python product does
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

    @property
    def device(self) -> torch.device:
        return self.ones.device


@dataclass
class _Covering:
    """One tensor's pieces (in order, local positions) and runs, before they are cut into chunks."""
    starts: Tensor
    lengths: Tensor
    piece_row: Tensor
    first_col: Tensor
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (start, length, segment)


def _segment_pieces(place: Place, vector_base: int, col_base: int, spare_col: int) -> list[Tensor]:
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
        parts[3].append(col_base + place.col + (row + index) // per_matrix * width + c0)
    return [torch.cat(part) if part else torch.zeros(0, dtype=torch.long) for part in parts]


def _covering(unit: Unit, offsets: dict) -> _Covering:
    """Every local element of one tensor in a piece and a run; what no segment holds is padding, a piece per element
    with row factor 0 and column factor 1."""
    numel, padding = unit.entry.tensor.numel(), offsets["S"]
    parts, runs, covered = [], [], 0
    for place in sorted(unit.places, key=lambda p: p.segment.offset):
        seg = place.segment
        if seg.numel == 0:
            continue
        if seg.offset > covered:
            runs.append((covered, seg.offset - covered, padding))
        parts.append(_segment_pieces(place, offsets["vector_base"], offsets["R"], offsets["spare_col"]))
        runs.append((seg.offset, seg.numel, place.index))
        covered = seg.offset + seg.numel
    if numel > covered:
        runs.append((covered, numel - covered, padding))
    for start, length, segment in runs:
        if segment == padding:
            parts.append([start + torch.arange(length), torch.ones(length, dtype=torch.long),
                          torch.full((length,), offsets["spare_row"], dtype=torch.long),
                          torch.full((length,), offsets["spare_col"], dtype=torch.long)])
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return _Covering(empty, empty, empty, empty)
    starts, lengths, piece_row, first_col = (torch.cat(column) for column in zip(*parts))
    order = torch.argsort(starts)
    return _Covering(starts[order], lengths[order], piece_row[order], first_col[order], sorted(runs))


def _chunk(start: int, parts: list[tuple[int, int, int]], coverings: list[_Covering], device) -> Chunk:
    """The chunk made of `parts` (unit, first, last local element: whole pieces), starting at bank element `start`."""
    lengths, piece_row, piece_col, run_lengths, run_segment, position = [], [], [], [], [], 0
    for unit, first, last in parts:
        cover = coverings[unit]
        a, b = torch.searchsorted(cover.starts, torch.tensor([first, last])).tolist()
        lengths.append(cover.lengths[a:b])
        piece_row.append(cover.piece_row[a:b])
        piece_col.append(cover.first_col[a:b] - (cover.starts[a:b] - first + position))
        for s, n, segment in cover.runs:
            if s < last and s + n > first:
                run_lengths.append(min(s + n, last) - max(s, first))
                run_segment.append(segment)
        position += last - first

    def on_device(values) -> Tensor:
        values = torch.cat(values) if values and torch.is_tensor(values[0]) else torch.tensor(values)
        return values.to(torch.int32).to(device)

    return Chunk(start, start + position, parts, on_device(lengths), on_device(piece_row), on_device(piece_col),
                 on_device(run_lengths), on_device(run_segment))


def _chunks(units: list[Unit], coverings: list[_Covering], device, chunk_elements: int, pack_below: int) -> list[Chunk]:
    """The bank's chunks, and each tensor's span of the bank's elements (in chunk order). A tensor of fewer than
    `pack_below` elements is packed whole with others of its dtype, in order, up to `chunk_elements`; a larger one
    has chunks of its own, of at most `chunk_elements` (cut between pieces)."""
    chunks, start, packs = [], 0, {}  # packs: dtype -> the parts of the chunk being filled, and its size

    def emit(parts: list[tuple[int, int, int]]) -> None:
        nonlocal start
        position = start
        for number, first, last in parts:
            if first == 0:
                units[number].spans["element"] = range(position, position + units[number].entry.tensor.numel())
            position += last - first
        chunks.append(_chunk(start, parts, coverings, device))
        start = position

    for number, unit in enumerate(units):
        numel, dtype = unit.entry.tensor.numel(), unit.entry.tensor.dtype
        unit.spans["element"] = range(start, start)
        if numel == 0:
            continue
        if numel < pack_below and numel <= chunk_elements:
            parts, size = packs.get(dtype, ([], 0))
            if size + numel > chunk_elements:
                emit(parts)
                parts, size = [], 0
            packs[dtype] = (parts + [(number, 0, numel)], size + numel)
            continue
        starts = coverings[number].starts
        cuts = sorted({cut for cut in torch.searchsorted(starts, torch.arange(0, numel, chunk_elements)).tolist()
                       if cut < len(starts)})
        for first, last in zip(cuts, cuts[1:] + [len(starts)]):
            emit([(number, int(starts[first]), int(starts[last]) if last < len(starts) else numel)])
    for parts, _ in packs.values():
        emit(parts)
    return chunks


def build_banks(layout: list[SteppedTensor], chunk_elements: dict[str, int], pack_below: dict[str, int]) -> list[Bank]:
    """One bank per process group of `layout`, in order of first appearance; chunk sizes and the size below which
    tensors are packed together by device type."""
    by_group: dict = {}
    for entry in layout:
        by_group.setdefault(entry.group, []).append(entry)
    return [_bank(group, entries, chunk_elements, pack_below) for group, entries in by_group.items()]


def _bank(group, entries: list[SteppedTensor], chunk_elements: dict[str, int], pack_below: dict[str, int]) -> Bank:
    devices = {entry.tensor.device for entry in entries}
    if len(devices) != 1:
        raise ValueError(f"ShardedAdafactor: the tensors of one process group are on several devices: {devices}")
    device = devices.pop()
    units, rows, cols, segments, vector = [], 0, 0, 0, 0
    for entry in entries:
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
        units.append(Unit(entry, places, spans))
    reduced = rows + cols + segments + 1
    offsets = dict(R=rows, S=segments, vector_base=reduced, spare_row=reduced + vector, spare_col=rows + cols + segments)
    coverings = [_covering(unit, offsets) for unit in units]
    kind = device.type if device.type in chunk_elements else "cpu"
    chunks = _chunks(units, coverings, device, chunk_elements[kind], pack_below[kind])

    places = [place for unit in units for place in unit.places]
    factored = [p for p in places if p.segment.factored]

    def repeated(value, count, dtype=torch.float32) -> Tensor:  # `value` `count` times per factored segment
        parts = [torch.full((count(p),), value(p), dtype=dtype) for p in factored]
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)).to(device)

    def per_segment(value, padding, dtype=torch.float32) -> Tensor:
        return torch.tensor([value(p.segment) for p in places] + [padding], dtype=dtype, device=device)

    return Bank(
        group=group, units=units, chunks=chunks, rows=rows, cols=cols, segments=segments, vector=vector,
        elements=chunks[-1].stop if chunks else 0,
        row_cols=repeated(lambda p: p.segment.shape[-1], lambda p: p.segment.rows),
        col_rows=repeated(lambda p: p.segment.shape[-2], lambda p: p.batches * p.segment.shape[-1]),
        row_groups=repeated(lambda p: p.segment.shape[-2], lambda p: p.batches, torch.int32),
        group_rows=repeated(lambda p: p.segment.shape[-2], lambda p: p.batches),
        full_numel=per_segment(lambda s: s.full_numel, 1.0),
        lr_scale=per_segment(lambda s: s.lr_scale, 1.0, torch.float64),
        decays=per_segment(lambda s: float(s.decay), 0.0, torch.float64),
        ones=torch.ones(segments + 1, device=device), zero=torch.zeros(1, device=device))

