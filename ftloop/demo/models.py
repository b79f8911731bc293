"""The demo's tiny random models of each family, and their image processors: the configs a real checkpoint of
that family has (its layer layout, rope, patch grid, processor settings), at a few thousandth of its width.

`family` is "qwen2.5-vl" (the default, what `make demo` trains), "qwen3-vl" (dense; DeepStack features from
an intermediate vision block, a learned position embedding, 16-pixel patches, interleaved mRoPE, QK norm) or
"qwen3.5" (dense; Qwen3-VL's tower without DeepStack, and a hybrid decoder: three of every four layers Gated DeltaNet
linear attention, every fourth gated full attention with QK norm and partial rotary; zero-centred RMSNorm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, PretrainedConfig, Qwen2_5_VLConfig, Qwen3_5Config, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


FAMILIES = ("qwen2.5-vl", "qwen3-vl", "qwen3.5")

# Model sizes. "demo" is small enough to train in minutes on 2 CPU processes; "test" builds and runs in
# well under a second for the test suite. Text head_dim = hidden / heads; mrope sections sum to head_dim / 2
# (Qwen2.5-VL's [t, h, w] in blocks; Qwen3-VL's interleaved, as its real [24, 20, 20] for head_dim 128).
MODEL_SIZES = {
    "demo": dict(hidden=128, layers=4, heads=4, kv_heads=2, inter=256, mrope=[4, 6, 6], mrope3=[6, 5, 5],
                 v_hidden=64, v_heads=2, v_inter=128),
    "test": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, mrope=[2, 3, 3], mrope3=[4, 2, 2],
                 v_hidden=32, v_heads=2, v_inter=64),
}  # fmt: skip
PATCH = {"qwen2.5-vl": 14, "qwen3-vl": 16, "qwen3.5": 16}  # pixels per patch side; a merged token covers 2 x 2 patches


def special_token_ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}


def build_config(tok, model_size: str = "demo", family: str = "qwen2.5-vl") -> PretrainedConfig:
    s = MODEL_SIZES[model_size]
    ids = special_token_ids(tok)
    vocab_size = math.ceil(len(tok) / 64) * 64  # pad the embedding like Qwen does (rows past len(tok) unused)
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": s["mrope"]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=2,
        hidden_size=s["v_hidden"],
        intermediate_size=s["v_inter"],
        num_heads=s["v_heads"],
        out_hidden_size=s["hidden"],
        patch_size=PATCH[family],
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen3.5":
        # The real layout at a tiny width: every fourth layer full attention (the last of 4; with 2 layers, the
        # second), head_dim 32 with a quarter of it rotary (mrope sections sum to 32 x 0.25 / 2), linear attention
        # with 2 key heads and 4 value heads of 16.
        layers = s["layers"]
        text_config.update(
            head_dim=32, layer_types=["full_attention" if (i + 1) % min(4, layers) == 0 else "linear_attention"
                                      for i in range(layers)],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=4, rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                                       "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                                       "mrope_interleaved": True})
        vision_config.update(in_channels=3, num_position_embeddings=64, hidden_act="gelu_pytorch_tanh")
        return Qwen3_5Config(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                             **tokens)
    if family == "qwen3-vl":
        # head_dim given: Qwen3's default is 128 whatever the width. The first block's features also reach the
        # decoder's first layer (DeepStack; the real models take blocks 8, 16 and 24 of 27).
        text_config.update(head_dim=s["hidden"] // s["heads"], rope_parameters={
            "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": s["mrope3"], "mrope_interleaved": True})
        vision_config.update(in_channels=3, num_position_embeddings=64, deepstack_visual_indexes=[0],
                             hidden_act="gelu_pytorch_tanh")
        return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **tokens)
    vision_config.update(window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
    # Untied (like Qwen2.5-VL-7B): lm_head is its own parameter, which keeps FSDP sharding simple.
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **tokens)


def build_image_processor(image_size: int = 56, family: str = "qwen2.5-vl") -> Qwen2VLImageProcessorPil:
    # smart_resize rounds each side to a multiple of patch*merge (28; 32 for Qwen3-VL) and clamps the area to
    # [min, max]: min keeps a small image at a 4x4 patch grid (= 2x2 merged = 4 image tokens); max allows the
    # requested image size (rounded up) and nothing larger, so token counts stay tiny.
    unit = 2 * PATCH[family]
    side = max(2 * unit, math.ceil(image_size / unit) * unit)
    # Qwen3-VL and Qwen3.5 normalise with mean and std 0.5 (Qwen2.5-VL with CLIP's).
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if family in ("qwen3-vl", "qwen3.5") else {}
    return Qwen2VLImageProcessorPil(min_pixels=(2 * unit) ** 2, max_pixels=side * side, patch_size=PATCH[family],
                                    temporal_patch_size=2, merge_size=2, **norm)


def save_image_processor(processor, model_dir: Path) -> None:
    processor.save_pretrained(model_dir)
    # Name the class as the real checkpoints do; AutoImageProcessor then picks the torchvision backend
    # when torchvision is installed and falls back to the PIL one otherwise.
    path = model_dir / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    cfg["image_processor_type"] = "Qwen2VLImageProcessor"
    cfg.update(min_pixels=processor.size["shortest_edge"], max_pixels=processor.size["longest_edge"])
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_model(config: PretrainedConfig, seed: int):
    # fork_rng: deterministic weights for a given seed without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    return model.float().eval()
