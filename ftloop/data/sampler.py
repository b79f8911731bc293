"""The order in which ranks see training rows: the same steps at any world size, resumable mid-epoch."""

from __future__ import annotations

import random

from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batches of one rank, so that each optimizer step covers the same rows at any world size.

    Every epoch is a seeded permutation of the rows; optimizer step s consumes the block
    perm[s*G:(s+1)*G] with G = world_size * micro_batch * accumulation (a last partial block is dropped).
    Inside the block, micro-batch k of rank r is slice (k*world_size + r). So 1 process x 4 micro-batches,
    2 x 2 and 4 x 1 all see the same rows in each step.

    With `lengths`, the permutation is cut into mega-batches of `mega_steps` steps and each is sorted by
    length (longest first), so rows batched together have similar lengths and little padding, while the
    order stays random at the scale of an epoch and the same at every world size.

    Resuming: `position` counts the rows of the current epoch that completed optimizer steps consumed (the
    training loop calls `advance()` after each step; the loader's prefetching runs ahead, so the sampler
    cannot know this itself). `state_dict()` records it with the epoch and the mega-batch size in rows, and
    a sampler that loads it continues the same order from that row - at another world size or global batch
    too, without repeating or skipping a row.
    """

    def __init__(self, num_rows: int, world_size: int, rank: int, micro_batch: int, accumulation: int,
                 seed: int, lengths: list[int] | None = None, mega_steps: int = 50):
        self.num_rows, self.world_size, self.rank = num_rows, world_size, rank
        self.micro_batch, self.accumulation, self.seed = micro_batch, accumulation, seed
        self.lengths = lengths
        self.mega_rows = mega_steps * self.global_batch  # fixed by the first run; a resume keeps it
        self.epoch, self.position = 0, 0

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a whole epoch."""
        return self.num_rows // self.global_batch

    @property
    def steps_left_in_epoch(self) -> int:
        return (self.num_rows - self.position) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first row."""
        self.epoch, self.position = epoch, 0

    def advance(self) -> None:
        """One optimizer step of this epoch is done."""
        self.position += self.global_batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "mega_rows": self.mega_rows,
                "num_rows": self.num_rows, "seed": self.seed, "grouped": self.lengths is not None}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved. The rows and seed must be the ones it was saved with: the order
        is a function of them (the caller refuses a checkpoint whose data changed)."""
        self.epoch, self.position, self.mega_rows = state["epoch"], state["position"], state["mega_rows"]

    def __len__(self) -> int:
        return self.steps_left_in_epoch * self.accumulation

    def __iter__(self):
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        if self.lengths is not None:
            mega = self.mega_rows
            order = [i for start in range(0, len(order), mega)
                     for i in sorted(order[start:start + mega], key=lambda i: -self.lengths[i])]
        order = order[self.position:]
        for step in range(self.steps_left_in_epoch):
            block = order[step * self.global_batch:(step + 1) * self.global_batch]
            for k in range(self.accumulation):
                start = (k * self.world_size + self.rank) * self.micro_batch
                yield block[start:start + self.micro_batch]
