"""A micro-batch's rope positions, computed on the host by the loader's collate.

Qwen's vision-language models place image and video tokens by 3D rope positions (time, height, width), which
their `get_rope_index` computes row by row from the token types and grids: a dozen reads of the device per row
when it runs inside the model's forward on a GPU (`.tolist()`, boolean masks), each of which stops the host from
queueing work ahead of the device. The same function, run by the collate on the CPU tensors of the batch (in the
loader's worker processes), costs the device nothing; the model then takes the positions as its `position_ids`.

The vision tower likewise lays its patches out from their grids before it runs (rotary position ids, attention
boundaries, Qwen2.5-VL's window order: `vision_layout`, with transformers' own functions), reading the grids each
time; the collate computes that layout too, and the tower takes it precomputed.

`HostRopeIndex` is the family's own `get_rope_index` (transformers' code, unchanged), bound to the checkpoint's
config without a model. `batch_positions` gives a batch's positions: the model's (3, batch, length) ones for a
batch with images or videos (a text-only batch needs none: the model counts 0, 1, 2, ... itself, without a read),
and for a packed batch (4, batch, length): text positions restarting at 0 in each row, then each row's 3D
positions computed with the row on a line of its own (`packed_positions`, which the model also runs, on the
device, for a packed batch made without them).
"""

from __future__ import annotations

import inspect

import torch


class HostRopeIndex:
    """`get_rope_index` of the model class of `config` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), without the model: its
    methods only read `config`, so they run bound to this object. Picklable, for the loader's workers."""

    def __init__(self, config):
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        self.config, self.model_class = config, MODEL_MAPPING[type(config)]
        self.takes_seconds = "second_per_grid_ts" in inspect.signature(self.model_class.get_rope_index).parameters

    def __getattr__(self, name: str):
        if name in ("config", "model_class", "takes_seconds"):  # not yet set (while unpickling)
            raise AttributeError(name)
        return getattr(self.model_class, name).__get__(self)

    def __call__(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask,
                 second_per_grid_ts=None) -> torch.Tensor:
        """(3, batch, length) positions, as the model's forward computes them."""
        extra = {"second_per_grid_ts": second_per_grid_ts} if self.takes_seconds else {}
        positions, _ = self.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                           attention_mask=attention_mask, **extra)
        return positions


def vision_layout(grid_thw: torch.Tensor, vision_config) -> dict:
    """What the vision tower computes from its grids before it runs (transformers' own vision_utils functions, which
    take these precomputed in their `kwargs`): rotary position ids, attention boundaries and their longest span,
    and Qwen2.5-VL's window order. `grid_thw` on the host; keys as the tower's keyword arguments."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    merge = vision_config.spatial_merge_size
    layout = {"position_ids": get_vision_position_ids(grid_thw, merge), "cu_seqlens": get_vision_cu_seqlens(grid_thw)}
    layout["max_seqlen"] = int((layout["cu_seqlens"][1:] - layout["cu_seqlens"][:-1]).max())
    if getattr(vision_config, "window_size", None):  # Qwen2.5-VL's windowed attention
        index, cumulative = get_vision_window_index(grid_thw, merge, vision_config.window_size,
                                                    vision_config.patch_size)
        layout.update(window_index=index, cu_window_seqlens=cumulative,
                      max_window_seqlen=int((cumulative[1:] - cumulative[:-1]).max()))
    return layout


def batch_vision_layout(batch: dict, vision_config) -> dict:
    """`vision_layout` of a collated batch's images and videos, in the order the model runs them through the tower
    (images, then videos), under `vision_` keys; {} for a batch without either."""
    grids = [batch[key] for key in ("image_grid_thw", "video_grid_thw") if key in batch]
    if not grids:
        return {}
    return {f"vision_{key}": value for key, value in vision_layout(torch.cat(grids), vision_config).items()}


def packed_positions(input_ids, mm_token_type_ids, segment_mask, segment_index, image_grid_thw, video_grid_thw,
                     rope_index, **extra) -> torch.Tensor:
    """(4, batch, length) positions of a packed micro-batch: text positions restarting at 0 in each segment, then
    `rope_index`'s 3D positions (a model's `get_rope_index`, or a HostRopeIndex's) computed for each row on its
    own, the segments laid out one per line (`segment_mask`, (segments, longest); `segment_index`, where each
    position of the batch goes in it). No read of the tensors' values: the same on the host and the device."""
    lines = segment_mask.shape
    per_row_ids = input_ids.new_zeros(lines.numel()).index_copy_(0, segment_index, input_ids.reshape(-1))
    per_row_types = mm_token_type_ids.new_zeros(lines.numel()).index_copy_(0, segment_index,
                                                                            mm_token_type_ids.reshape(-1))
    rope = rope_index(per_row_ids.view(lines), per_row_types.view(lines), image_grid_thw, video_grid_thw,
                      attention_mask=segment_mask.long(), **extra)
    rope = rope[0] if isinstance(rope, tuple) else rope
    text = torch.arange(lines[1], device=input_ids.device).expand(lines).reshape(-1).index_select(0, segment_index)
    return torch.cat([text[None], rope.reshape(3, -1).index_select(1, segment_index)]).view(4, *input_ids.shape)


def batch_positions(batch: dict, rope_index: HostRopeIndex) -> torch.Tensor | None:
    """The `position_ids` of a collated batch (see the module docstring), or None for an unpacked text-only one."""
    grids = batch.get("image_grid_thw"), batch.get("video_grid_thw")
    seconds = {"second_per_grid_ts": batch["second_per_grid_ts"]} if "second_per_grid_ts" in batch else {}
    if "segment_mask" in batch:
        return packed_positions(batch["input_ids"], batch["mm_token_type_ids"], batch["segment_mask"],
                                batch["segment_index"], *grids, rope_index, **seconds)
    if grids == (None, None):
        return None
    return rope_index(batch["input_ids"], batch["mm_token_type_ids"], *grids, batch["attention_mask"], **seconds)
