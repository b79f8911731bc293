"""The demo bundle is a valid Hugging Face Qwen2.5-VL checkpoint + LLaVA data, and the evaluator runs on it."""

import json
import os

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from ftloop.demo.bundle import COLORS, SHAPES, SPECIAL_TOKENS, build_demo_bundle
from ftloop.demo.evaluate import build_inputs, evaluate_export


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_bundle["model_dir"]).eval()


def _rows(tiny_bundle, split):
    with open(tiny_bundle[f"{split}_json"]) as f:
        return json.load(f)


def _first_image_row(tiny_bundle, split="train"):
    row = next(r for r in _rows(tiny_bundle, split) if "image" in r)
    return row, Image.open(os.path.join(tiny_bundle["image_folder"], row["image"])).convert("RGB")


def test_model_reloads(tiny_bundle, model):
    assert os.path.isfile(os.path.join(tiny_bundle["model_dir"], "model.safetensors"))
    assert model.config.model_type == "qwen2_5_vl"
    assert model.config.vision_config.out_hidden_size == model.config.text_config.hidden_size
    rope = model.config.text_config.rope_parameters
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert sum(rope["mrope_section"]) == head_dim // 2


def test_special_tokens_match_config(tokenizer, model):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    for t, i in ids.items():
        assert tokenizer.convert_ids_to_tokens(i) == t
        assert tokenizer.encode(t, add_special_tokens=False) == [i], t  # never split
    cfg = model.config
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert cfg.text_config.eos_token_id == tokenizer.eos_token_id
    assert cfg.text_config.pad_token_id == tokenizer.pad_token_id
    assert cfg.text_config.bos_token_id == ids["<|endoftext|>"]
    assert ids["<|im_end|>"] in model.generation_config.eos_token_id
    assert len(tokenizer) <= cfg.text_config.vocab_size


def test_image_processor_grid(tiny_bundle, image_processor):
    _, image = _first_image_row(tiny_bundle)
    assert image.size == (56, 56)
    out = image_processor(images=[image], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4x4 patches -> 2x2 merged -> 4 image tokens
    assert out["pixel_values"].shape == (16, 3 * 2 * 14 * 14)


def test_chat_template(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]},
        {"role": "assistant", "content": "red"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_data_rows(tiny_bundle):
    train, evals = _rows(tiny_bundle, "train"), _rows(tiny_bundle, "eval")
    assert len(train) == 16 and len(evals) == 8
    assert any("image" not in r for r in train), "needs text-only rows"
    for row in train + evals:
        human, gpt = row["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        if "image" in row:
            assert human["value"].startswith("<image>\n")
            assert gpt["value"] in set(COLORS) | set(SHAPES)
            assert os.path.isfile(os.path.join(tiny_bundle["image_folder"], row["image"]))
        else:
            assert "<image>" not in human["value"]
    train_images = {r["image"] for r in train if "image" in r}
    assert not train_images & {r["image"] for r in evals if "image" in r}


def test_deterministic(tmp_path, tiny_bundle):
    again = build_demo_bundle(tmp_path, num_train=16, num_eval=8, seed=0, model_size="test")
    for key in ("train_json", "eval_json"):
        assert open(again[key]).read() == open(tiny_bundle[key]).read()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        a = open(os.path.join(again["model_dir"], name), "rb").read()
        assert a == open(os.path.join(tiny_bundle["model_dir"], name), "rb").read(), name


def test_forward_with_image_and_labels(tiny_bundle, model, tokenizer, image_processor):
    row, image = _first_image_row(tiny_bundle)
    question = row["conversations"][0]["value"]
    inputs = build_inputs(tokenizer, image_processor, model.config.image_token_id, question, image)
    ids = inputs["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 4
    assert inputs["mm_token_type_ids"].sum() == 4
    labels = ids.clone()
    labels[inputs["mm_token_type_ids"].bool()] = -100
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad is not None  # gradient reaches the vision tower
    model.zero_grad(set_to_none=True)


def test_evaluate_export_untrained(tiny_bundle, capsys):
    acc = evaluate_export(
        tiny_bundle["model_dir"], tiny_bundle["eval_json"], tiny_bundle["image_folder"], max_rows=4, show=2
    )
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and printed.count("ref:") == 2
