"""Evaluate an exported Qwen2.5-VL or Qwen3-VL folder on LLaVA-format VQA rows with plain transformers.

Deliberately independent of the training code: it loads the export exactly as a user would
(`from_pretrained` on the folder), so it checks that what ftloop writes is a usable Hugging Face checkpoint.

Notes on transformers 5.x that shape this file:
  * AutoProcessor for Qwen2.5-VL also builds the video processor, which needs torchvision; we only need
    the tokenizer and the image processor, so they are loaded separately (AutoImageProcessor falls back to
    the PIL backend without torchvision).
  * The 3-D (M-RoPE) position ids are only computed when `mm_token_type_ids` (1 at image-pad tokens, 0 for
    text) is passed along with `image_grid_thw`; without it the model silently uses 1-D text positions,
    which differ from what the model was trained with. generate() extends it with zeros for new tokens.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's marker in the human turn
IMAGE_PAD = "<|image_pad|>"


def to_messages(question: str, has_image: bool) -> list[dict]:
    """Turn a LLaVA human turn into a chat message, keeping the image where `<image>` stood."""
    if not has_image:
        return [{"role": "user", "content": question.replace(IMAGE_PLACEHOLDER, "").strip()}]
    if IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question  # LLaVA convention: image first when unmarked
    content = []
    for i, part in enumerate(question.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
        part = part.strip("\n")
        if part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def build_inputs(tokenizer, image_processor, image_token_id: int, question: str, image: Image.Image | None):
    """Tokenize one prompt the way Qwen2_5_VLProcessor would, without needing torchvision."""
    text = tokenizer.apply_chat_template(to_messages(question, image is not None), tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    extra = {}
    if image is not None:
        vision = image_processor(images=[image], return_tensors="pt")
        grid = vision["image_grid_thw"]
        # One placeholder becomes one token per merged patch group: t*h*w / merge_size**2.
        n_tokens = int(grid[0].prod()) // image_processor.merge_size**2
        text = text.replace(IMAGE_PAD, IMAGE_PAD * n_tokens, 1)
        extra = {"pixel_values": vision["pixel_values"], "image_grid_thw": grid}
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    input_ids = enc["input_ids"]
    mm_token_type_ids = (input_ids == image_token_id).to(torch.int32)  # 1 = image token, 0 = text
    return {
        "input_ids": input_ids,
        "attention_mask": enc["attention_mask"],
        "mm_token_type_ids": mm_token_type_ids,
        **extra,
    }


def normalize(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def first_qa(row: dict) -> tuple[str, str]:
    conv = row["conversations"]
    human = next(t["value"] for t in conv if t["from"] == "human")
    gpt = next(t["value"] for t in conv if t["from"] == "gpt")
    return human, gpt


@torch.no_grad()
def evaluate_export(
    model_dir, eval_json, image_folder, max_rows: int | None = None, show: int = 3, max_new_tokens: int = 8
) -> float:
    """Greedy-decode each eval row and return exact-match accuracy over rows that have an image.

    Text-only rows are scored too and printed separately, but do not count towards the returned accuracy
    (the demo task is about whether the model learned to look at the image).
    """
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    image_token_id = model.config.image_token_id

    with open(eval_json) as f:
        rows = json.load(f)
    if max_rows is not None:
        rows = rows[:max_rows]

    scores = {"image": [0, 0], "text": [0, 0]}  # kind -> [correct, total]
    shown = 0
    for row in rows:
        question, reference = first_qa(row)
        image = None
        if row.get("image"):
            image = Image.open(os.path.join(image_folder, row["image"])).convert("RGB")
        inputs = build_inputs(tokenizer, image_processor, image_token_id, question, image)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        generated = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct = normalize(generated) == normalize(reference)
        kind = "image" if image is not None else "text"
        scores[kind][0] += int(correct)
        scores[kind][1] += 1
        if shown < show:
            shown += 1
            q = question.replace(IMAGE_PLACEHOLDER, "").strip()
            mark = "OK" if correct else "X"
            print(f"[{row.get('id', '?')}] Q: {q!r}  ref: {reference!r}  got: {generated!r}  {mark}")

    img_correct, img_total = scores["image"]
    accuracy = img_correct / img_total if img_total else 0.0
    print(f"image-row accuracy: {img_correct}/{img_total} = {accuracy:.3f}")
    if scores["text"][1]:
        print(f"text-only rows: {scores['text'][0]}/{scores['text'][1]} correct (not counted above)")
    return accuracy


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Exact-match VQA accuracy of an exported Qwen2.5-VL or Qwen3-VL folder.")
    p.add_argument("model_dir")
    p.add_argument("eval_json")
    p.add_argument("image_folder")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--show", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args(argv)
    evaluate_export(a.model_dir, a.eval_json, a.image_folder, a.max_rows, a.show, a.max_new_tokens)


if __name__ == "__main__":
    main()
