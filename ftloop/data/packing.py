"""--packing: several rows in one sequence, each with its own positions, none attending to another.

The sampler cuts an epoch's rows into packs (`pack_rows`); the loader hands a micro-batch of packs to
`make_packed_collate`, which lays each pack out as one sequence and records where each row starts
(`segment_lengths`); the model (ftloop.model) turns those into per-row 3D rope positions, from which
transformers builds a mask that keeps attention inside each row.
"""

from __future__ import annotations

import bisect

import torch
from torch.utils.data import Dataset

from ftloop.data.chat import IGNORE_INDEX
from ftloop.data.dataset import token_types, vision_inputs

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


class PackedRows(Dataset):
    """A dataset whose items are packs: item `(3, 8)` is the list of samples 3 and 8."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, pack: tuple) -> list[dict]:
        return [self.inner[i] for i in pack]


def make_packed_collate(pad_token_id: int, image_token_id: int, video_token_id: int | None = None):
    """A micro-batch of packs: each pack one sequence (its rows concatenated), right-padded to the longest.

    `segment_lengths` lists, sequence by sequence, the length of each row and of the padding after the
    last row (a segment of its own: nothing attends to it, it attends to nothing else), so the segments
    cover every position. `attention_mask` marks the real tokens, for counting only: the model attends by
    segment. A row's first label is ignored, so that no row's last token is trained to predict the next
    row (it is a prompt token anyway)."""

    def collate(packs: list[list[dict]]) -> dict:
        length = max(sum(len(s["input_ids"]) for s in pack) for pack in packs)
        input_ids = torch.full((len(packs), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(packs), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(packs), length), dtype=torch.long)
        segments = []
        for b, pack in enumerate(packs):
            at = 0
            for s in pack:
                n = len(s["input_ids"])
                input_ids[b, at:at + n], labels[b, at:at + n] = s["input_ids"], s["labels"]
                labels[b, at] = IGNORE_INDEX
                segments.append(n)
                at += n
            attention_mask[b, :at] = 1
            if at < length:
                segments.append(length - at)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "mm_token_type_ids": token_types(input_ids, image_token_id, video_token_id),
                 "segment_lengths": torch.tensor(segments)}
        return {**batch, **vision_inputs([s for pack in packs for s in pack])}

    return collate
