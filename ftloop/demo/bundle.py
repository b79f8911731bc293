"""Build a self-contained demo bundle: a tiny random Qwen2.5-VL (or Qwen3-VL) checkpoint plus a toy VQA data set.

Everything is made locally (tokenizer trained with `tokenizers`, weights random, images drawn with pillow), so
the training loop can be exercised end to end with no network access. The checkpoint folder uses the same
Hugging Face layout as a real Qwen2.5-VL-Instruct (Qwen3-VL-Instruct) release, so code that works on the bundle
works on the real model too: `AutoModelForImageTextToText.from_pretrained`, `AutoTokenizer`, `AutoImageProcessor`
(the models: ftloop.demo.models).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from ftloop.demo.models import (FAMILIES, MODEL_SIZES, build_config, build_image_processor, build_model,
                                save_image_processor, special_token_ids)
from ftloop.family import QWEN_SYSTEM_PROMPT

# Qwen2.5-VL's special tokens, in Qwen's own id order (151643.. in the real vocab). Here they follow the
# learned BPE vocab, so their ids are len(bpe_vocab) + index in this list.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
BPE_VOCAB_SIZE = 498  # + 14 special tokens = 512 ids (fewer if the corpus runs out of merges)
DEFAULT_SYSTEM_PROMPT = QWEN_SYSTEM_PROMPT  # Qwen2.5-VL's, which its chat template below inserts too

# Qwen2.5-VL's official chat template (chat_template.json of Qwen2.5-VL-*-Instruct), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template, reduced to what the demo's rows use (the real one also renders tools and reasoning):
# the same ChatML and vision blocks, and no default system prompt.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3.5's: Qwen3-VL's, with thinking off: the generation prompt ends with an empty think block (what
# --empty-think context trains a final reply after), as a post-trained Qwen3.5's template writes it.
QWEN35_CHAT_TEMPLATE = QWEN3_CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                                   "<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")

# Clearly distinct colours, so that "what colour" is learnable from a 4-token image embedding.
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 210, 20), "purple": (140, 40, 180), "orange": (250, 130, 20),
}  # fmt: skip
SHAPES = ["circle", "square", "triangle"]
COLOR_Q = "What color is the shape?"
SHAPE_Q = "What shape is it?"
CAPTION_Q = "Describe the picture."
# Caption sentences of the mixed variant (--caption-share): a reply of 1 to 6 of them, so rows range from a
# one-word answer to a paragraph, as real mixed data does. Their words are in GENERAL_TEXT, so the tokenizer
# (trained on the same corpus either way) splits them sensibly.
CAPTION_SENTENCES = [
    "The picture shows one {color} {shape}.", "It is a {shape} and it is {color}.",
    "The {shape} is in the middle of a plain light background.", "There is nothing else in the picture.",
    "The colour of the {shape} is {color}.", "I can see a {color} {shape} on a light background.",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]



# A little general English so that the BPE fills its vocab (and out-of-demo text tokenizes sensibly).
GENERAL_TEXT = """The quick brown fox jumps over the lazy dog. A small picture shows one simple object on a plain
light background. Please answer the question with a single word. I can see a round circle, a square box and a
pointed triangle. This model was trained from scratch on toy data and knows very little about the world.
Numbers like 12, 345 and 6789 are split into digits. Here is a short list: apple, banana, water, house, river,
mountain, window, garden, table, chair, paper, music, yesterday, tomorrow, morning, evening, because, should,
would, could, before, after, between, under, above, inside, outside, left, right, top, bottom, middle, large,
little, bright, dark, color, colour, image, question, answer, describe, explain, count, where, which, when, why,
how, who, yes, no, true, false, hello, thanks, sorry, good, great, there are two shapes in the picture."""


def _tokenizer_corpus() -> list[str]:
    """Every string the demo can produce, rendered as ChatML, so BPE learns merges for all of it."""
    texts = GENERAL_TEXT.split("\n")
    texts += [DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant", COLOR_Q, SHAPE_Q, "<image>"]
    texts += list(COLORS) + SHAPES + NUMBER_WORDS + [str(i) for i in range(19)]
    texts += [f"What is {a} plus {b}?" for a in range(10) for b in range(10)]
    texts += [f"{DEFAULT_SYSTEM_PROMPT}\nuser\n{q}\nassistant\n{a}" for q in (COLOR_Q, SHAPE_Q) for a in COLORS]
    return texts


def build_tokenizer() -> Qwen2Tokenizer:
    """Train a byte-level BPE with Qwen2's exact pre-tokenization, then wrap it as a Qwen2 tokenizer."""
    # Same normalizer / pre-tokenizer / decoder as transformers' Qwen2Tokenizer, which rebuilds this pipeline
    # from vocab + merges when it loads tokenizer.json: training with anything else would not round-trip.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_tokenizer_corpus() * 4, trainer)
    state = json.loads(bpe.to_str())["model"]
    # Give the special tokens fixed ids right after the learned vocab (Qwen's layout). Putting them in the
    # vocab dict pins the ids; otherwise Qwen2Tokenizer would add eos/pad first and shuffle the order.
    vocab = dict(state["vocab"])
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",  # as Qwen2.5-VL-Instruct: generation stops at the end of the assistant turn
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    # Registered as added special tokens (never split, skipped by decode(skip_special_tokens=True)).
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def draw_image(rng: random.Random, image_size: int, color: str, shape: str) -> Image.Image:
    bg = tuple(rng.randint(225, 255) for _ in range(3))  # light, so every shape colour stands out
    img = Image.new("RGB", (image_size, image_size), bg)
    draw = ImageDraw.Draw(img)
    # Half-size of the shape's bounding box: large enough that the shape dominates the 4 image tokens.
    r = rng.uniform(0.22, 0.42) * image_size
    cx, cy = rng.uniform(r, image_size - r), rng.uniform(r, image_size - r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_rows(rng: random.Random, n: int, split: str, image_dir: Path, image_size: int,
              shape_share: float = 0.25, caption_share: float = 0.0) -> list[dict]:
    """LLaVA-format rows; every 12th row (from index 3) is text-only, so text-only batches occur in training
    and even a tiny test split contains one. `caption_share` of the image rows ask for a caption instead."""
    rows = []
    for i in range(n):
        row_id = f"{split}-{i:05d}"
        if i % 12 == 3:
            a, b = rng.randrange(10), rng.randrange(10)
            rows.append({"id": row_id, "conversations": [
                {"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": str(a + b)}]})
            continue
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        rel = f"{split}/{i:05d}.png"
        draw_image(rng, image_size, color, shape).save(image_dir / rel)
        # Mostly colour (learnt in ~100 steps from random weights); shape is harder and learnt later.
        question, answer = (SHAPE_Q, shape) if rng.random() < shape_share else (COLOR_Q, color)
        if caption_share and rng.random() < caption_share:
            sentences = CAPTION_SENTENCES[:rng.randint(1, len(CAPTION_SENTENCES))]
            question, answer = CAPTION_Q, " ".join(t.format(color=color, shape=shape) for t in sentences)
        rows.append({"id": row_id, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})  # fmt: skip
    return rows


def build_demo_bundle(
    out_dir,
    num_train: int = 400,
    num_eval: int = 60,
    image_size: int = 56,
    seed: int = 0,
    model_size: str = "demo",
    shape_share: float = 0.25,
    caption_share: float = 0.0,
    family: str = "qwen2.5-vl",
) -> dict:
    """Write model/, images/, train.json and eval.json under out_dir; return their paths.

    `shape_share` of the image rows ask for the shape, the others for the colour; with `caption_share`, that
    share of them ask for a caption of one to six sentences instead (a set of mixed lengths). `family`: the
    model's (ftloop.demo.models.FAMILIES)."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {sorted(MODEL_SIZES)}, got {model_size!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = Path(out_dir)
    model_dir, image_dir = out / "model", out / "images"
    for d in (model_dir, image_dir / "train", image_dir / "eval"):
        d.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    if family in ("qwen3-vl", "qwen3.5"):
        tok.chat_template = QWEN35_CHAT_TEMPLATE if family == "qwen3.5" else QWEN3_CHAT_TEMPLATE
    config = build_config(tok, model_size, family)
    model = build_model(config, seed)
    ids = special_token_ids(tok)
    # Greedy by default so evaluation is deterministic; stop on <|im_end|> (or <|endoftext|>) like Qwen.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(model_dir)  # safetensors by default
    tok.save_pretrained(model_dir)
    save_image_processor(build_image_processor(image_size, family), model_dir)

    # Separate RNG streams per split: eval images never coincide with train ones, and changing num_train
    # does not change the eval set.
    train_rows = make_rows(random.Random(f"{seed}-train"), num_train, "train", image_dir, image_size, shape_share,
                           caption_share)
    eval_rows = make_rows(random.Random(f"{seed}-eval"), num_eval, "eval", image_dir, image_size, shape_share,
                          caption_share)
    train_json, eval_json = out / "train.json", out / "eval.json"
    train_json.write_text(json.dumps(train_rows, indent=1))
    eval_json.write_text(json.dumps(eval_rows, indent=1))
    return {
        "model_dir": str(model_dir),
        "image_folder": str(image_dir),
        "train_json": str(train_json),
        "eval_json": str(eval_json),
    }


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build the ftloop demo bundle (tiny Qwen2.5-VL + toy shapes data).")
    p.add_argument("out_dir")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-eval", type=int, default=60)
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-size", default="demo", choices=sorted(MODEL_SIZES))
    p.add_argument("--caption-share", type=float, default=0.0, help="image rows asking for a caption (mixed set)")
    p.add_argument("--family", default="qwen2.5-vl", choices=FAMILIES)
    a = p.parse_args()
    paths = build_demo_bundle(a.out_dir, a.num_train, a.num_eval, a.image_size, a.seed, a.model_size,
                              caption_share=a.caption_share, family=a.family)
    print(json.dumps(paths, indent=2))
