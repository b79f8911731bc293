"""Qwen ChatML rendering and tokenisation with supervision only on assistant replies.

The conversation is rendered to one string exactly as Qwen2.5-VL's chat template does, each `<image>`
replaced by `<|vision_start|>` + one `<|image_pad|>` per merged vision patch + `<|vision_end|>` (each
`<video>` likewise with `<|video_pad|>`: t*h*w / merge^2 of them, as Qwen's processor expands it), and
tokenised once. Labels come from character spans: a token is supervised when it starts inside an
assistant reply or its closing `<|im_end|>`. Tokenising once (rather than piece by piece) guarantees the
ids are the ones the model sees at inference.
"""

from __future__ import annotations

import re

from ftloop.data.rows import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

IGNORE_INDEX = -100  # the label of a position that is not supervised (cross-entropy's ignore_index)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def expand_vision(text: str, image_counts: list[int], video_counts: list[int] = ()) -> str:
    """Replace each `<image>` and `<video>`, in order, by its vision block of `count` pad tokens."""
    pieces = PLACEHOLDERS.split(text)  # text, placeholder, text, placeholder, ..., text
    images, videos = iter(image_counts), iter(video_counts)
    out = [pieces[0]]
    for placeholder, piece in zip(pieces[1::2], pieces[2::2]):
        count, pad = (next(images), IMAGE_PAD) if placeholder == IMAGE_PLACEHOLDER else (next(videos), VIDEO_PAD)
        out.append(VISION_START + pad * count + VISION_END + piece)
    assert next(images, None) is None and next(videos, None) is None, "placeholder counts were validated when reading"
    return "".join(out)


def render_chat(messages: list[dict], image_token_counts: list[int], system_prompt: str,
                video_token_counts: list[int] = ()):
    """The ChatML string and the [start, end) character spans to supervise."""
    if messages[0]["role"] != "system" and system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    text, spans, images_used, videos_used = "", [], 0, 0
    for message in messages:
        content = message["content"]
        n_images, n_videos = content.count(IMAGE_PLACEHOLDER), content.count(VIDEO_PLACEHOLDER)
        content = expand_vision(content, image_token_counts[images_used:images_used + n_images],
                                video_token_counts[videos_used:videos_used + n_videos])
        images_used, videos_used = images_used + n_images, videos_used + n_videos
        text += f"{IM_START}{message['role']}\n"
        if message["role"] == "assistant":
            spans.append((len(text), len(text) + len(content) + len(IM_END)))
        text += f"{content}{IM_END}\n"
    return text, spans


def encode_chat(messages: list[dict], image_token_counts: list[int], tokenizer, system_prompt: str,
                video_token_counts: list[int] = ()):
    """(input_ids, labels) as python lists of equal length."""
    text, spans = render_chat(messages, image_token_counts, system_prompt, video_token_counts)
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


def last_vision_end(input_ids: list[int], tokenizer) -> int:
    """Index of the last `<|vision_end|>` token (-1: none): the shortest a row can be cut to without cutting
    through an image or video, whose tokens and features must stay paired."""
    vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)
    return max((i for i, t in enumerate(input_ids) if t == vision_end_id), default=-1)


def vision_past_limit(where: str, length: int, last_vision_end: int, max_seq_length: int) -> str:
    """The one line for a row that cannot be cut to max_seq_length: an image or video ends past it."""
    return (f"{where}: {length} tokens and its images/videos end at token {last_vision_end + 1}, past "
            f"--max-seq-length {max_seq_length}; raise it or lower --max-pixels")
