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
    """

    def __init__(self, num_rows: int, world_size: int, rank: int, micro_batch: int, accumulation: int,
                 seed: int, lengths: list[int] | None = None, mega_steps: int = 50):
        self.num_rows, self.world_size, self.rank = num_rows, world_size, rank
        self.micro_batch, self.accumulation, self.seed = micro_batch, accumulation, seed
        self.lengths, self.mega_steps = lengths, mega_steps
        self.epoch = 0

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def __iter__(self):
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        if self.lengths is not None:
            mega = self.mega_steps * self.global_batch
            order = [i for start in range(0, len(order), mega)
                     for i in sorted(order[start:start + mega], key=lambda i: -self.lengths[i])]
        for step in range(self.steps_per_epoch):
            block = order[step * self.global_batch:(step + 1) * self.global_batch]
            for k in range(self.accumulation):
                start = (k * self.world_size + self.rank) * self.micro_batch
                yield block[start:start + self.micro_batch]
