"""Qwen ChatML rendering and tokenisation with supervision only on assistant replies.

The conversation is rendered to one string exactly as Qwen2.5-VL's chat template does, each `<image>`
replaced by `<|vision_start|>` + one `<|image_pad|>` per merged vision patch + `<|vision_end|>`, and
tokenised once. Labels come from character spans: a token is supervised when it starts inside an
assistant reply or its closing `<|im_end|>`. Tokenising once (rather than piece by piece) guarantees the
ids are the ones the model sees at inference.
"""

from __future__ import annotations

from ftloop.data.formats import IMAGE_PLACEHOLDER

IGNORE_INDEX = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


def expand_images(text: str, counts: list[int]) -> str:
    """Replace each `<image>` in order by its vision block of `count` pad tokens."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    assert len(pieces) - 1 == len(counts), "placeholder count was validated when reading"
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out.append(VISION_START + IMAGE_PAD * count + VISION_END + piece)
    return "".join(out)


def render_chat(messages: list[dict], image_token_counts: list[int], system_prompt: str):
    """The ChatML string and the [start, end) character spans to supervise."""
    if messages[0]["role"] != "system" and system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    text, spans, used = "", [], 0
    for message in messages:
        content = message["content"]
        n = content.count(IMAGE_PLACEHOLDER)
        content = expand_images(content, image_token_counts[used:used + n])
        used += n
        text += f"{IM_START}{message['role']}\n"
        if message["role"] == "assistant":
            spans.append((len(text), len(text) + len(content) + len(IM_END)))
        text += f"{content}{IM_END}\n"
    return text, spans


def encode_chat(messages: list[dict], image_token_counts: list[int], tokenizer, system_prompt: str):
    """(input_ids, labels) as python lists of equal length."""
    text, spans = render_chat(messages, image_token_counts, system_prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1] and end > start:
            labels[i] = input_ids[i]
    return input_ids, labels
