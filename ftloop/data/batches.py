"""Rows -> tensors: a row's sample (`SFTDataset`), micro-batches of rows padded to the longest (`make_collate`) or of
packed sequences (`make_packed_collate`, with --packing), and the evaluation set's batches.

--packing: the sampler (ftloop.data.sampler) cuts an epoch's rows into packs; the loader hands a micro-batch of
packs to `make_packed_collate`, which lays each pack out as one sequence and records where each row starts
(`segment_lengths`); the model (ftloop.model) turns those into per-row 3D rope positions, from which transformers
builds a mask that keeps attention inside each row.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, get_worker_info

from ftloop.config import VideoArgs
from ftloop.data.encode import ChatFormat, cut_to_length, encode_row
from ftloop.data.rows import Row
from ftloop.data.sources import where as row_where
from ftloop.data.positions import HostRopeIndex, batch_positions, batch_vision_layout
from ftloop.loss import IGNORE_INDEX, supervised_index


class SFTDataset(Dataset):
    """Supervised fine-tuning rows: images and video frames through the model's image processor (videos laid
    out for its video path by ftloop.data.media), ChatML token ids, labels."""

    def __init__(self, rows: list[Row], tokenizer, image_processor, max_seq_length: int, chat: ChatFormat,
                 source: str = "data", video: VideoArgs = VideoArgs()):
        self.rows, self.tokenizer, self.image_processor = rows, tokenizer, image_processor
        self.max_seq_length, self.chat, self.source, self.video = max_seq_length, chat, source, video

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        where = row_where(row.source or self.source, row.number)
        sample, input_ids, labels = encode_row(row, self.tokenizer, self.image_processor, self.video, self.chat, where)
        if len(input_ids) > self.max_seq_length:
            input_ids, labels = cut_to_length(input_ids, labels, self.max_seq_length, self.tokenizer, where)
        sample["input_ids"] = torch.tensor(input_ids)
        sample["labels"] = torch.tensor(labels)
        return sample


def make_collate(pad_token_id: int, image_token_id: int, video_token_id: int | None = None,
                 rope_index: HostRopeIndex | None = None):
    """Right-pad a list of samples into one micro-batch; the image and video inputs of all rows are
    concatenated in row order (the order of their placeholders in the batch). With `rope_index`, the batch
    carries its rope positions (`position_ids`, ftloop.data.positions), computed here on the host."""

    def collate(samples: list[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = s["input_ids"], s["labels"], 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "mm_token_type_ids": token_types(input_ids, image_token_id, video_token_id),
                 "supervised_index": supervised_index(labels)}
        return in_one_buffer(with_positions({**batch, **vision_inputs(samples)}, rope_index))

    return collate


def in_one_buffer(batch: dict) -> dict:
    """In a DataLoader worker, the batch's tensors copied into one buffer and returned as views of it. A worker
    hands every storage of a batch over with a file descriptor of its own, which the training process receives
    and maps one at a time (measured on the demo: 12 tensors a micro-batch, ~0.38 ms each, 4.5 ms of a 45 ms
    step); one buffer is one. Outside a worker (no workers, an evaluation's stand-in batch) the batch is
    returned as it is."""
    if get_worker_info() is None:
        return batch
    tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
    starts, size = {}, 0
    for key, tensor in tensors.items():
        starts[key] = size = -(-size // 16) * 16  # aligned for every dtype
        size += tensor.numel() * tensor.element_size()
    buffer = torch.empty(size, dtype=torch.uint8)
    out = dict(batch)
    for key, tensor in tensors.items():
        start = starts[key]
        view = buffer[start:start + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        out[key] = view.copy_(tensor)
    return out


def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> torch.Tensor:
    """0 for text, 1 for image and 2 for video placeholders: what the model's rope index reads."""
    types = (input_ids == image_token_id).int()
    if video_token_id is not None:
        types[input_ids == video_token_id] = 2
    return types


def vision_inputs(samples: list[dict]) -> dict:
    """The image and video inputs of `samples` concatenated in row order (the order of their placeholders)."""
    batch = {}
    with_images = [s for s in samples if "pixel_values" in s]
    if with_images:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
    with_videos = [s for s in samples if "pixel_values_videos" in s]
    if with_videos:
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            batch[key] = torch.cat([s[key] for s in with_videos])
    return batch


def eval_batches(num_rows: int, world_size: int, rank: int, batch_size: int) -> list[list[int]]:
    """Rows r, r+W, ... of the eval set for rank r, in batches; every rank gets the same number of batches
    (a rank with fewer rows fills its last batch with index -1: a row with no supervised token), because a
    rank that stopped early would leave the others waiting in FSDP's all-gathers."""
    mine = list(range(rank, num_rows, world_size))
    per_rank = -(-num_rows // world_size)
    num_batches = -(-per_rank // batch_size)
    padded = mine + [-1] * (num_batches * batch_size - len(mine))
    return [padded[i:i + batch_size] for i in range(0, len(padded), batch_size)]


class EvalDataset(Dataset):
    """Wraps the eval SFTDataset: index -1 is a filler row (row 0 with no supervised token)."""

    def __init__(self, inner: SFTDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        if index >= 0:
            return self.inner[index]
        sample = dict(self.inner[0])
        sample["labels"] = torch.full_like(sample["labels"], IGNORE_INDEX)
        return sample


# ---- packed sequences -------------------------------------------------------------------------------------


class PackedRows(Dataset):
    """A dataset whose items are packs: item `(3, 8)` is the list of samples 3 and 8."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, pack: tuple) -> list[dict]:
        return [self.inner[i] for i in pack]


def segment_layout(lengths: torch.Tensor) -> dict:
    """A packed micro-batch's segments laid out one per line, for the model's rope positions (ftloop.model):
    `segment_lengths`, a tuple of ints (the host's: the model splits by them without asking the device), and
    `segment_starts`, their offsets from 0 to the last one's end (int64: what flash-linear-attention's kernels
    take); `segment_mask`, (segments, longest), True where a line holds a position; `segment_index`, where each
    position of the batch (flattened) goes in the flattened lines."""
    mask = torch.arange(int(lengths.max())) < lengths[:, None]
    return {"segment_lengths": tuple(lengths.tolist()), "segment_starts": torch.cat([lengths.new_zeros(1),
                                                                                     lengths.cumsum(0)]),
            "segment_mask": mask, "segment_index": mask.view(-1).nonzero().view(-1)}


def with_positions(batch: dict, rope_index: HostRopeIndex | None) -> dict:
    """The batch with its rope positions and its vision tower layout (ftloop.data.positions), when `rope_index`
    (whose config says the tower's) is given."""
    if rope_index is None:
        return batch
    positions = batch_positions(batch, rope_index)
    batch = batch if positions is None else {**batch, "position_ids": positions}
    return {**batch, **batch_vision_layout(batch, rope_index.config.vision_config)}


def make_packed_collate(pad_token_id: int, image_token_id: int, video_token_id: int | None = None,
                        rope_index: HostRopeIndex | None = None):
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
                 **segment_layout(torch.tensor(segments)), "supervised_index": supervised_index(labels)}
        return in_one_buffer(with_positions({**batch, **vision_inputs([s for pack in packs for s in pack])},
                                            rope_index))

    return collate
