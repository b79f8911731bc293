"""Qwen3-VL (dense) through the same loop: 2-process training of the tiny random Qwen3-VL bundle that resumes
bit for bit, one process giving the same weights as two (sharded Adafactor), exports that `from_pretrained`
loads in the checkpoint's own key layout with the trained model's logits, and Qwen3-VL-MoE refused in one line.
(The one vision pass with DeepStack features against transformers' forward: test_vision_forward; packing:
test_packing; mixed ranks: test_vision_mixing; a frozen tower: test_distributed.)"""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, Qwen3VLMoeConfig
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from ftloop.config import Config, LoraArgs, ModelArgs
from ftloop.data.encode import video_block
from ftloop.data.check import main as check_main
from ftloop.data.media import group_times
from ftloop.data.media import load_image_processor
from ftloop.errors import ConfigError
from ftloop.lora import add_adapters
from ftloop.model import build_meta_model, build_skeleton, load_config
from ftloop.plan import fsdp_units
from ftloop.plan import main as plan_main
from ftloop.data.batches import make_collate
from ftloop.model import VisionLanguageSFT
from familyrun import train_export_resume_and_one_process
from launch import forked_python_m
from test_vision_forward import qwen3_case


def test_qwen3_vl_trains_resumes_exactly_and_exports_the_trained_model(qwen3_bundle, tmp_path):
    run = ["--max-steps", "3", "--logging-steps", "1", "--learning-rate", "1e-3", "--no-bf16", "--save-dtype", "fp32",
           "--eval-data", qwen3_bundle["eval_json"], "--eval-steps", "3", "--no-load-best-model-at-end"]
    stdout, final = train_export_resume_and_one_process(qwen3_bundle, tmp_path, run, AutoModelForImageTextToText)
    assert "eval_loss" in stdout
    source = load_file(f"{qwen3_bundle['model_dir']}/model.safetensors")
    assert final.keys() == source.keys()  # the hub checkpoints' key layout (model.visual.*, model.language_model.*)
    assert any(".deepstack_merger_list." in k for k in final)
    changed = [k for k in source if not torch.equal(final[k], source[k])]
    assert any(".deepstack_merger_list." in k for k in changed) and any(".pos_embed." in k for k in changed)


def test_a_qwen3_vl_moe_folder_is_refused_in_one_line(tmp_path):
    Qwen3VLMoeConfig().save_pretrained(tmp_path / "moe")
    with pytest.raises(ConfigError, match=r"a Qwen3-VL-MoE model \(qwen3_vl_moe\), which ftloop does not train yet"):
        load_config(ModelArgs(model_name_or_path=str(tmp_path / "moe")))
    result = forked_python_m("ftloop.plan", ["--model-name-or-path", str(tmp_path / "moe")])
    assert result.returncode == 2 and "does not train yet" in result.stderr.strip().splitlines()[-1]


def test_qwen3_vl_pixels_and_the_data_check_use_its_own_processor(qwen3_bundle, capsys):
    """Its patch grid is 16 pixels (32 per merged token): --min/--max-pixels bound the area in its processor's
    own settings, and the check before training measures rows the way training encodes them."""
    processor = load_image_processor(qwen3_bundle["model_dir"], 64 * 64, 96 * 96)
    assert processor.size == {"shortest_edge": 64 * 64, "longest_edge": 96 * 96} and processor.patch_size == 16
    with pytest.raises(ConfigError, match=r"--max-pixels 900 is below 1024 = \(patch_size 16 x merge_size 2\)\^2"):
        load_image_processor(qwen3_bundle["model_dir"], 800, 900)
    flags = ["--train-data", qwen3_bundle["train_json"], "--image-folder", qwen3_bundle["image_folder"],
             "--model-name-or-path", qwen3_bundle["model_dir"], "--workers", "1"]
    assert check_main(flags) == 0
    assert "0 errors" in capsys.readouterr().out


def test_lora_and_the_memory_plan_take_a_qwen3_vl_model(qwen3_bundle):
    """LoRA finds its decoder projections under the same names; the plan counts its units (the DeepStack
    mergers and the position embedding with the root) and its vision blocks' activations."""
    args = ModelArgs(model_name_or_path=qwen3_bundle["model_dir"])
    model = build_meta_model(load_config(args), args, "bf16")
    add_adapters(model, LoraArgs(lora_rank=4, lora_vision_target_modules=("qkv",)), torch.float32)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 + 2 * 2 and all(".lora_" in n for n in trainable)
    assert plan_main(["--model-name-or-path", qwen3_bundle["model_dir"], "--nproc-per-node", "2"]) == 0
    units = fsdp_units(build_skeleton(Config(model=args), load_config(args)))
    assert sum(u.numel for u in units) == sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(
        qwen3_bundle["model_dir"]).parameters())
    assert len(units) == 2 + 2 + 1  # decoder layers, vision blocks, the root


@pytest.mark.parametrize("frames, fps", [(3, 2.0), (5, 4.0), (2, 1.0)])
def test_a_qwen3_vl_video_is_written_as_its_processor_writes_its_frame_groups(frames, fps):
    """transformers' Qwen3VLProcessor.replace_video_token (its tokenizer and torchvision video processor left
    out: it reads only the token strings, the merge and temporal patch sizes and the frames' metadata)."""
    processor = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    processor.video_token = "<|video_pad|>"
    processor.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    groups = -(-frames // 2)
    inputs = {"video_grid_thw": torch.tensor([[groups, 4, 6]]),
              "video_metadata": [SimpleNamespace(fps=fps, frames_indices=list(range(frames)))]}
    expected = processor.replace_video_token(inputs, video_idx=0)
    assert video_block(groups * 4 * 6 // 4, group_times([k / fps for k in range(frames)], 2)) == expected
    assert expected.count("<|vision_start|>") == groups


def test_qwen3_vl_deepstack_features_count_and_videos_carry_timestamps(qwen3_bundle, tokenizer, tmp_path):
    """The DeepStack features change the loss (so dropping them from the one vision pass would be seen); each
    video's frame groups come with their timestamps."""
    model, samples, _ = qwen3_case(qwen3_bundle, tokenizer, tmp_path)
    collate = make_collate(tokenizer.pad_token_id, model.config.image_token_id, model.config.video_token_id)
    batch = collate([samples["images+videos"]])
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.count(" seconds>") == 2 + 1  # videos of 3 and 2 frames: 2 groups, then 1
    scorer = VisionLanguageSFT(model)
    with torch.no_grad():
        loss = float(scorer(**batch)[0])
        indexes = model.model.visual.deepstack_visual_indexes
        model.model.visual.deepstack_visual_indexes = []  # no DeepStack features
        try:
            without = float(scorer(**batch)[0])
        finally:
            model.model.visual.deepstack_visual_indexes = indexes
    assert abs(loss - without) > 1e-4
