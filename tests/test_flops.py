"""Model FLOPs and MFU (ftloop.flops): the count against a hand count from the config's dimensions and against
torch's FlopCounterMode on the model's own forward and backward; `mfu` in the log only where a peak is known."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText

from datautil import SYSTEM
from ftloop.data.batches import SFTDataset, make_collate, make_packed_collate
from ftloop.data.layouts import load_rows
from ftloop.flops import batch_work, flop_model, peak_flops
from ftloop.loss import supervised_tokens
from ftloop.model import VisionLanguageSFT
from launch import check, forked_torchrun, train_flags


def hand_count(config) -> tuple[int, int, int]:
    """(per token, per supervised token, per patch) from the config alone: Qwen2.5-VL's matrices written out."""
    t, v = config.text_config, config.vision_config
    head_dim = t.hidden_size // t.num_attention_heads
    attention = t.hidden_size * head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)  # q, o; k, v
    mlp = 3 * t.hidden_size * t.intermediate_size
    embed = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * v.hidden_size
    block = 4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size  # qkv, proj; gate, up, down
    merged = v.hidden_size * v.spatial_merge_size ** 2
    merger = (merged * merged + merged * v.out_hidden_size) // v.spatial_merge_size ** 2
    return (6 * t.num_hidden_layers * (attention + mlp), 6 * t.vocab_size * t.hidden_size,
            4 * embed + 6 * (v.depth * block + merger))


def test_the_count_is_the_hand_count_and_frozen_parts_count_forward_only(tiny_bundle):
    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"])
    flops = flop_model(model, model.config.text_config)
    assert (flops.per_token, flops.per_supervised_token, flops.per_patch) == hand_count(model.config)
    assert flops.attention_width == model.config.text_config.hidden_size
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    for p in model.model.language_model.layers[0].parameters():
        p.requires_grad_(False)
    frozen = flop_model(model, model.config.text_config)
    assert frozen.per_patch == sum(  # every vision matrix: 2 x, forward only
        2 * (m.weight.numel() // (4 if "merger" in n else 1)) for n, m in model.model.visual.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))
    assert frozen.per_token == flops.per_token // 2  # one of two decoder layers trains


def test_only_qwen3_5_s_full_attention_layers_count_attention(qwen35_bundle):
    """Its Gated DeltaNet layers are linear in length: of the tiny model's two layers, one counts the length^2 term
    (its gated query projection, twice the heads x head_dim, counts among the matmuls); every Linear and the
    depthwise conv1d aside (not a Linear), its matmuls are counted as any model's."""
    model = AutoModelForImageTextToText.from_pretrained(qwen35_bundle["model_dir"])
    text = model.config.text_config
    flops = flop_model(model, text)
    assert text.layer_types == ["linear_attention", "full_attention"] and flops.layers == 1
    assert flops.attention_width == text.num_attention_heads * text.head_dim
    decoder = sum(m.weight.numel() for n, m in model.model.language_model.named_modules()
                  if isinstance(m, torch.nn.Linear))
    assert flops.per_token == 6 * decoder


def test_the_count_matches_torchs_flop_counter_on_a_forward_and_backward(tiny_bundle, tokenizer, image_processor):
    """Eager attention, so that the counter sees its matmuls; one row, so that there is no padding (which the
    model computes but the count leaves out). The vision tower's attention is the difference left (not counted)."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"], attn_implementation="eager")
    rows = load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"], [])
    row = next(r for r in rows if r.images)
    batch = make_collate(tokenizer.pad_token_id, model.config.image_token_id, model.config.video_token_id)(
        [SFTDataset([row], tokenizer, image_processor, 4096, SYSTEM)[0]])
    pairs, patches = batch_work(batch)
    tokens, supervised = batch["attention_mask"].sum(), supervised_tokens(batch["labels"])
    counted = flop_model(model, model.config.text_config).step_flops(tokens, supervised, pairs, patches)
    with FlopCounterMode(display=False) as counter:
        loss, _ = VisionLanguageSFT(model)(**batch)
        loss.backward()
    v = model.config.vision_config
    vision_attention = 12 * v.depth * v.hidden_size * patches ** 2  # what the count leaves out, at most
    assert 0 <= counter.get_total_flops() - counted <= vision_attention, (counter.get_total_flops(), float(counted))


def test_a_packed_batch_counts_each_row_s_own_attention(tokenizer, image_processor, tiny_bundle):
    rows = load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"], [])[:3]
    samples = [SFTDataset(rows, tokenizer, image_processor, 4096, SYSTEM)[i] for i in range(3)]
    lengths = [len(s["input_ids"]) for s in samples]
    packed = make_packed_collate(tokenizer.pad_token_id, 1, 2)([samples[:2], samples[2:]])
    pairs, patches = batch_work(packed)
    assert pairs == sum(n * n for n in lengths)  # not the packed sequences' lengths, nor the padding
    assert patches == sum(int(s["image_grid_thw"].prod(-1).sum()) for s in samples if "image_grid_thw" in s)


def test_the_peak_comes_from_the_flag_or_the_gpu(monkeypatch):
    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), 100.0) == 100e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), None) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert peak_flops(torch.device("cuda"), None) is None


def test_mfu_is_logged_with_a_peak_and_not_without(tiny_bundle, tmp_path):
    for name, extra in (("with", ["--peak-tflops", "0.001"]), ("without", [])):
        out = tmp_path / name
        check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(tiny_bundle, out, "--max-steps", "2",
                                                                      "--logging-steps", "1", *extra)]))
        records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
        if name == "with":
            assert all(0 < r["mfu"] for r in records), records
        else:
            assert not any("mfu" in r for r in records)
