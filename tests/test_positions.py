"""Video time positions under bf16 mixed precision: the same as inference computes them, in fp32.

FSDP's MixedPrecision casts the root forward's floating inputs to bf16 unless told not to; Qwen2.5-VL then computes
each video's temporal rope positions from a bf16 `second_per_grid_ts` (`(arange(t) * tokens_per_second * s).long()`)
and they drift (fps 3) or collide (fps 2, past 256 temporal patches). ftloop keeps the root's inputs as they are
(ftloop.fsdp.wrap.mixed_precision) and casts the pixels itself.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from ftloop.config import FSDPArgs
from ftloop.fsdp.wrap import mixed_precision
from ftloop.loss import IGNORE_INDEX
from ftloop.model import VisionLanguageSFT


@pytest.fixture
def one_process():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def video_batch(config, temporal_patches: int, fps: float) -> dict:
    """One row: a few text tokens, one video of `temporal_patches` x 2 x 2 patches (one merged token per temporal
    patch), a supervised reply."""
    vision = config.vision_config
    text = [11, 12, 13]
    ids = [*text, config.vision_start_token_id, *[config.video_token_id] * temporal_patches,
           config.vision_end_token_id, *text]
    types = [2 if token == config.video_token_id else 0 for token in ids]
    labels = [IGNORE_INDEX] * (len(ids) - 3) + text
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "labels": torch.tensor([labels]), "mm_token_type_ids": torch.tensor([types]),
            "pixel_values_videos": torch.randn(temporal_patches * 4, patch_dim),
            "video_grid_thw": torch.tensor([[temporal_patches, 2, 2]]),
            "second_per_grid_ts": torch.tensor([vision.temporal_patch_size / fps], dtype=torch.float32)}


@pytest.mark.parametrize("fps, temporal_patches", [(2.0, 260), (3.0, 300), (30.0, 8)])
def test_video_positions_under_bf16_equal_the_fp32_ones(tiny_bundle, one_process, fps, temporal_patches):
    config = AutoConfig.from_pretrained(tiny_bundle["model_dir"])
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(config)
    batch = video_batch(config, temporal_patches, fps)
    expected, _ = hf.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], None,
                                          batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"],
                                          attention_mask=batch["attention_mask"])
    seen = []
    compute = hf.model.get_rope_index

    def recorded(*args, **kwargs):
        positions, deltas = compute(*args, **kwargs)
        seen.append(positions)
        return positions, deltas

    hf.model.get_rope_index = recorded
    model = FSDP(VisionLanguageSFT(hf), mixed_precision=mixed_precision(FSDPArgs(bf16=True)),
                 device_id=torch.device("cpu"))
    loss, count = model(**batch)
    assert count == 3 and torch.isfinite(loss)
    assert seen, "the model computed no rope positions"
    assert torch.equal(seen[0], expected), (seen[0][0] - expected[0]).abs().max()
    if config.vision_config.tokens_per_second * batch["second_per_grid_ts"] >= 1:  # a time step >= 1 position
        temporal = seen[0][0, 0, 4:4 + temporal_patches]  # every temporal patch at its own time position
        assert len(set(temporal.tolist())) == temporal_patches
