"""The order in which ranks see training rows: the same steps at any world size, resumable mid-epoch; and with
--packing, the rows cut into packs (`pack_rows`)."""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random

from torch.utils.data import Sampler

PACK_WINDOW_ROWS = 4096  # rows packed together: a window of the epoch's permutation, so packs stay random


def pack_rows(order: list[int], lengths: list[int], budget: int, window: int = PACK_WINDOW_ROWS) -> list[tuple]:
    """The rows of `order` in packs of at most `budget` tokens (--packing), window by window.

    Best-fit decreasing inside each window of `window` rows: the longest row first, each into the fullest
    pack it still fits, so packs come out nearly full. Deterministic: a function of the order alone. A row
    longer than the budget cannot be here (the check drops or cuts it first)."""
    packs: list[tuple] = []
    for start in range(0, len(order), window):
        rows = sorted(order[start:start + window], key=lambda i: -lengths[i])
        room: list[int] = []  # room left in each open pack, ascending; `members` in the same order
        members: list[list[int]] = []
        for row in rows:
            at = bisect.bisect_left(room, lengths[row])  # the pack with the least room that still fits it
            if at == len(room):
                left, rows_in = budget - lengths[row], [row]
            else:
                left, rows_in = room.pop(at) - lengths[row], members.pop(at) + [row]
            at = bisect.bisect_left(room, left)
            room.insert(at, left)
            members.insert(at, rows_in)
        packs += [tuple(m) for m in members]
    return packs


class StepBatchSampler(Sampler[list]):
    """Micro-batches of one rank, so that each optimizer step covers the same rows at any world size.

    The epoch is a seeded permutation of units: rows, or with `pack_tokens` packs of rows (`pack_rows`).
    Optimizer step s consumes the block units[s*G:(s+1)*G] with G = world_size * micro_batch * accumulation
    (a last partial block is dropped). Inside the block, micro-batch k of rank r is slice (k*world_size + r).
    So 1 process x 4 micro-batches, 2 x 2 and 4 x 1 all see the same units in each step.

    With `lengths` and `group_by_length`, units are grouped by length within windows of `mega_steps` steps'
    worth of the permutation: each window sorted by length and cut into buckets of one micro-batch, so units
    batched together have similar lengths (less padding). With the default window of one step, a step holds
    exactly the units it holds without grouping (the same gradient: grouping changes no step, only which
    micro-batch a unit lands in; the longest micro-batches go to the ranks' same accumulation round). With
    a window of N > 1 steps, each step takes one bucket from each stretch of the window's length order
    (strided), so its mix of long and short units is the data's, and the steps of the epoch are shuffled:
    less padding still, but units batched together are alike, which at small global batches costs loss.

    Resuming: `position` counts the units of the current epoch that completed optimizer steps consumed (the
    training loop calls `advance()` after each step; the loader's prefetching runs ahead, so the sampler
    cannot know this itself). `state_dict()` records it with the epoch and the mega-batch, bucket and step
    sizes of the first run, and a sampler that loads it continues the same order from that unit - at another
    world size or global batch too, without repeating or skipping one.
    """

    def __init__(self, num_rows: int, world_size: int, rank: int, micro_batch: int, accumulation: int,
                 seed: int, lengths: list[int] | None = None, mega_steps: int = 1, group_by_length: bool = True,
                 pack_tokens: int = 0):
        self.num_rows, self.world_size, self.rank = num_rows, world_size, rank
        self.micro_batch, self.accumulation, self.seed = micro_batch, accumulation, seed
        self.lengths, self.pack_tokens, self.mega_steps = lengths, pack_tokens, mega_steps
        self.grouped = lengths is not None and group_by_length
        if pack_tokens and lengths is None:
            raise ValueError("packing needs the rows' lengths")
        # Fixed by the first run; a resume keeps them, so the order goes on unchanged at another layout.
        self.bucket_units, self.block_units = micro_batch, self.global_batch
        self.mega_units = mega_steps * self.global_batch
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, list] | None = None  # (epoch, its units), made once per epoch

    @property
    def global_batch(self) -> int:
        """Units (rows, or packs with --packing) per optimizer step."""
        return self.world_size * self.micro_batch * self.accumulation

    @property
    def num_units(self) -> int:
        """Units in this epoch (with packing, their number changes a little from epoch to epoch)."""
        return len(self.units())

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in this whole epoch."""
        return self.num_units // self.global_batch

    @property
    def steps_left_in_epoch(self) -> int:
        return (self.num_units - self.position) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first unit."""
        self.epoch, self.position = epoch, 0

    def advance(self) -> None:
        """One optimizer step of this epoch is done."""
        self.position += self.global_batch

    def order_settings(self) -> dict:
        """What the order is a function of, besides the rows: a resume must keep them. The rows' lengths too
        where they decide which rows share a step (packing, or grouping across steps): another --max-pixels or
        system prompt would move rows into other steps, and the resume would repeat or skip some."""
        across_steps = self.pack_tokens or (self.grouped and self.mega_steps > 1)
        lengths = hashlib.sha256(json.dumps(self.lengths).encode()).hexdigest()[:16] if across_steps else None
        return {"num_rows": self.num_rows, "seed": self.seed, "grouped": self.grouped,
                "length_group_steps": self.mega_steps if self.grouped else None, "pack_tokens": self.pack_tokens,
                "lengths": lengths}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "mega_units": self.mega_units,
                "bucket_units": self.bucket_units, "block_units": self.block_units, **self.order_settings()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved. The rows and order settings must be the ones it was saved with:
        the order is a function of them (ftloop.fsdp.checkpoint.check_resumable refuses others)."""
        self.epoch, self.position = state["epoch"], state["position"]
        self.mega_units, self.bucket_units, self.block_units = (state["mega_units"], state["bucket_units"],
                                                                state["block_units"])
        self._plan = None

    def units(self) -> list:
        """This epoch's units in order: row indices, or tuples of them with packing."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_units(self.epoch))
        return self._plan[1]

    def steps_in(self, num_epochs: float) -> int:
        """Optimizer steps in the first `num_epochs` epochs (a fraction: that share of the last one's steps,
        rounded up). With packing, each epoch has its own number of packs, so each is counted."""
        whole = int(num_epochs)
        epochs = range(whole + (num_epochs > whole))
        counts = [len(self._make_units(e)) // self.global_batch for e in epochs] if self.pack_tokens else \
            [self.num_rows // self.global_batch] * len(epochs)
        return sum(counts[:whole]) + (math.ceil((num_epochs - whole) * counts[-1]) if num_epochs > whole else 0)

    def _make_units(self, epoch: int) -> list:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        units: list = list(range(self.num_rows))
        rng.shuffle(units)
        if self.pack_tokens:
            units = pack_rows(units, self.lengths, self.pack_tokens)
            rng.shuffle(units)  # packs leave each window longest first
        if not self.grouped:
            return units
        size = self._unit_length
        per_step = self.block_units // self.bucket_units
        steps, tail = [], []
        for start in range(0, len(units), self.mega_units):
            mega = sorted(units[start:start + self.mega_units], key=lambda u: -size(u))
            buckets = [mega[i:i + self.bucket_units] for i in range(0, len(mega), self.bucket_units)]
            if len(buckets[-1]) < self.bucket_units:  # only the epoch's last mega-batch can end short
                tail = buckets.pop()
            # Step j takes buckets j, j + n, j + 2n, ... of the n steps' worth: one from each stretch of the
            # length order, so every step holds long and short rows in the proportions of the data, as
            # random steps do (steps of only short rows would weigh their few tokens as much as a step of
            # long ones: noisier steps, and the loss learns slower).
            n = len(buckets) // per_step
            steps += [[buckets[j + i * n] for i in range(per_step)] for j in range(n)]
            tail = [u for bucket in buckets[n * per_step:] for u in bucket] + tail
        if self.mega_units > self.block_units:  # a window of one step keeps the steps of the permutation
            rng.shuffle(steps)
        return [u for step in steps for bucket in step for u in bucket] + tail

    def _unit_length(self, unit) -> int:
        return sum(self.lengths[i] for i in unit) if isinstance(unit, tuple) else self.lengths[unit]

    def __len__(self) -> int:
        return self.steps_left_in_epoch * self.accumulation

    def __iter__(self):
        units = self.units()[self.position:]
        for step in range(self.steps_left_in_epoch):
            block = units[step * self.global_batch:(step + 1) * self.global_batch]
            for k in range(self.accumulation):
                start = (k * self.world_size + self.rank) * self.micro_batch
                yield block[start:start + self.micro_batch]
