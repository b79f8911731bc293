"""One row as training sees it: rendered as Qwen's ChatML, tokenised once, labelled, with its vision inputs.

Training (ftloop.data.batches), the check before training and the data check (ftloop.data.check) all go through
`encode_row`, so the lengths they measure are the lengths trained on.

The conversation is rendered to one string exactly as Qwen2.5-VL's chat template does (Qwen3-VL's differs in
its default system prompt and its videos' layout: ChatFormat), each `<image>` replaced by `<|vision_start|>` +
one `<|image_pad|>` per merged vision patch + `<|vision_end|>` (each `<video>` likewise with `<|video_pad|>`:
t*h*w / merge^2 of them, as Qwen's processor expands it), and tokenised once. Labels come from character spans: a
token is supervised when it starts inside an assistant reply (one the row marks `"loss": false` excepted: context
only) or its closing `<|im_end|>`; every other position is
labelled IGNORE_INDEX (ftloop.loss). Tokenising once (rather than piece by piece) guarantees the ids are the ones
the model sees at inference.

Special tokens in a row's text are refused (`check_text`): the tokenizer turns `<|im_end|>`, `<|im_start|>`,
`<|image_pad|>`, `<|vision_start|>`, ... written in a message into the control tokens themselves, not into text, so a
reply holding `<|im_end|>` would train a fake end of turn (and what follows as a turn of its own), and a stray
`<|image_pad|>` or `<|vision_start|>` would make the image tokens and image features disagree and crash the training
step that meets it. The refused tokens are read from the tokenizer (every token it marks special, and the ChatML
and vision tokens ftloop writes itself), except Qwen's grounding markup (`<|object_ref_start|>`, `<|box_start|>`,
`<|quad_start|>` and their ends), which Qwen-VL's grounding data writes in replies and which breaks no structure.
Each message's text is checked as the row holds it, before ftloop adds its own tokens; `<image>` / `<video>`
placeholders are not tokens. A row holding one is a DataError naming the token and the message, found by the
check like any bad row (--skip-bad-rows skips it); --system-prompt holding one is a ConfigError
(`check_system_prompt`), for it would spoil every row.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from ftloop.config import VideoArgs
from ftloop.data.media import load_image_processor, row_vision_inputs
from ftloop.data.rows import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Row
from ftloop.errors import ConfigError, DataError
from ftloop.family import QWEN_SYSTEM_PROMPT, default_system_prompt, empty_think_block, timestamped_videos
from ftloop.loss import IGNORE_INDEX


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


@dataclass(frozen=True)
class ChatFormat:
    """How a model family renders a conversation (ftloop.family): the system prompt of a conversation that has
    none ("" for none), whether each video is one block per frame group after its timestamp (Qwen3-VL), and the
    empty think block written before a final reply without reasoning (Qwen3.5; --empty-think), trained or not."""
    system_prompt: str = QWEN_SYSTEM_PROMPT
    timestamped_videos: bool = False
    think_block: str = ""
    think_block_trained: bool = False


def chat_format(system_prompt: str | None, model_type: str, empty_think: str = "context") -> ChatFormat:
    """The format of this family, with --system-prompt (None: the family's default) and --empty-think."""
    prompt = default_system_prompt(model_type) if system_prompt is None else system_prompt
    block = "" if empty_think == "none" else empty_think_block(model_type)
    return ChatFormat(prompt, timestamped_videos(model_type), block, bool(block) and empty_think == "trained")


# Qwen's grounding markup: special tokens that Qwen-VL's grounding data writes in replies, around a phrase and its
# box ("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"); they mark no
# structure, so a row may hold them.
CONTENT_TOKENS = frozenset({"<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                            "<|quad_start|>", "<|quad_end|>"})
_SPECIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, special_tokens)


def special_tokens(tokenizer) -> re.Pattern | None:
    """One pattern matching every special token of `tokenizer` a row's text must not hold (its special tokens,
    added or named, and ftloop's own ChatML and vision tokens; not CONTENT_TOKENS), built once per tokenizer (and
    again if tokens are added to it); None when there is none."""
    size = len(tokenizer)
    try:
        cached = _SPECIAL.get(tokenizer)
    except TypeError:  # not weakly referable: built each time
        return _special_pattern(tokenizer)
    if cached is None or cached[0] != size:
        cached = _SPECIAL[tokenizer] = (size, _special_pattern(tokenizer))
    return cached[1]


def _special_pattern(tokenizer) -> re.Pattern | None:
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(token.content for token in added.values() if getattr(token, "special", False))
    tokens.update((IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD))
    tokens = {t for t in tokens if isinstance(t, str) and t} - CONTENT_TOKENS - {IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER}
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))


def _found(pattern: re.Pattern, text: str) -> list[str]:
    """The special tokens `text` holds, each once, in order of first appearance (one search for clean text)."""
    if pattern.search(text) is None:
        return []
    return list(dict.fromkeys(pattern.findall(text)))


def _named(tokens: list[str]) -> str:
    """What a row or flag holding `tokens` is told: the tokens, why they cannot stay, and how to write them as text
    (`<|im_end|>` -> `<| im_end |>`)."""
    shown = ", ".join(f"`{t}`" for t in tokens)
    several = len(tokens) > 1
    example = tokens[0].replace("<|", "<| ").replace("|>", " |>")
    return (f"the special token{'s' * several} {shown}, which the tokenizer reads as {'' if several else 'a '}control "
            f"token{'s' * several}, not as text; remove or reword {'them' if several else 'it'}"
            + (f" (e.g. `{example}`)" if example != tokens[0] else ""))


def check_text(messages: list[dict], tokenizer, where: str) -> None:
    """A DataError naming the token and the message when a message's text holds one of the tokenizer's special
    tokens (see the module's docstring): the first such message, numbered from 1 as the row lists them."""
    pattern = special_tokens(tokenizer)
    if pattern is None:
        return
    for number, message in enumerate(messages, start=1):
        if found := _found(pattern, message["content"]):
            raise DataError(f"{where}: message {number} ({message['role']}) holds {_named(found)}")


def check_system_prompt(chat: ChatFormat, tokenizer) -> None:
    """A ConfigError when --system-prompt (the prompt of every row that has none) holds a special token."""
    pattern = special_tokens(tokenizer)
    if pattern is not None and chat.system_prompt and (found := _found(pattern, chat.system_prompt)):
        raise ConfigError(f"--system-prompt (the system message of every row that has none) holds {_named(found)}")


def video_block(count: int, times: list[float] | None) -> str:
    """A video's `count` pad tokens: one block, or (with its frame groups' times) one block per group, each after
    its `<t seconds>`, as Qwen3-VL's processor writes them (the layout of transformers 4.57, which the released
    models were trained with; 5.x keeps an extra start/end pair around them)."""
    if times is None:
        return VISION_START + VIDEO_PAD * count + VISION_END
    per_group = count // len(times)
    return "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_PAD * per_group}{VISION_END}" for t in times)


def expand_vision(text: str, image_counts: list[int], video_counts: list[int] = (),
                  video_times: list[list[float]] | None = None) -> str:
    """Replace each `<image>` and `<video>`, in order, by its vision block of `count` pad tokens (a video's, with
    `video_times`, split over its frame groups)."""
    pieces = PLACEHOLDERS.split(text)  # text, placeholder, text, placeholder, ..., text
    images, videos = iter(image_counts), iter(video_counts)
    times = iter(video_times) if video_times is not None else None
    out = [pieces[0]]
    for placeholder, piece in zip(pieces[1::2], pieces[2::2]):
        if placeholder == IMAGE_PLACEHOLDER:
            out.append(VISION_START + IMAGE_PAD * next(images) + VISION_END + piece)
        else:
            out.append(video_block(next(videos), next(times) if times is not None else None) + piece)
    assert next(images, None) is None and next(videos, None) is None, "placeholder counts were validated when reading"
    return "".join(out)


def render_chat(messages: list[dict], image_token_counts: list[int], system_prompt: str,
                video_token_counts: list[int] = (), video_times: list[list[float]] | None = None,
                think_block: str = "", think_block_trained: bool = False):
    """The ChatML string and the [start, end) character spans to supervise. `video_times`: each video's frame
    group times, for a family that writes them (ChatFormat.timestamped_videos); None: one block a video.
    `think_block`: written before each reply after the last user turn that holds no `<think>` (Qwen3.5's empty
    think block), inside the reply's trained span when `think_block_trained`."""
    if messages[0]["role"] != "system" and system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    text, spans, images_used, videos_used = "", [], 0, 0
    for index, message in enumerate(messages):
        content = message["content"]
        n_images, n_videos = content.count(IMAGE_PLACEHOLDER), content.count(VIDEO_PLACEHOLDER)
        times = video_times[videos_used:videos_used + n_videos] if video_times is not None else None
        content = expand_vision(content, image_token_counts[images_used:images_used + n_images],
                                video_token_counts[videos_used:videos_used + n_videos], times)
        images_used, videos_used = images_used + n_images, videos_used + n_videos
        text += f"{IM_START}{message['role']}\n"
        block = think_block if (message["role"] == "assistant" and index > last_user
                                and "<think>" not in message["content"]) else ""
        if block and not think_block_trained:  # context, as it ends the prompt at inference
            text += block
            block = ""
        if message["role"] == "assistant" and message.get("loss", True):
            spans.append((len(text), len(text) + len(block) + len(content) + len(IM_END)))
        text += f"{block}{content}{IM_END}\n"
    return text, spans


def encode_chat(messages: list[dict], image_token_counts: list[int], tokenizer, system_prompt: str,
                video_token_counts: list[int] = (), video_times: list[list[float]] | None = None,
                think_block: str = "", think_block_trained: bool = False):
    """(input_ids, labels) as python lists of equal length."""
    text, spans = render_chat(messages, image_token_counts, system_prompt, video_token_counts, video_times,
                              think_block, think_block_trained)
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
            f"--max-seq-length {max_seq_length}; raise it or lower --max-pixels (videos: --video-total-pixels, "
            "--video-max-frames)")


# ---- a row as training sees it ------------------------------------------------------------------------

def load_tokenizer_and_processor(model: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's tokenizer and its image processor with the run's pixel limits (--min/max-pixels)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model), load_image_processor(model, min_pixels, max_pixels)


def encode_row(row: Row, tokenizer, image_processor, video: VideoArgs, chat: ChatFormat, where: str):
    """(vision tensors, input_ids, labels) of one normalised row, uncut, in the family's `chat` format, its video
    files sampled as `video` says; DataError naming `where` for text holding a special token (`check_text`) or an
    unreadable image, frame or video."""
    check_text(row.messages, tokenizer, where)
    if row.messages[0]["role"] != "system":
        check_system_prompt(chat, tokenizer)  # refused before any row is measured (ftloop.data.check.Measuring)
    tensors, image_counts, video_counts, video_times = row_vision_inputs(row, image_processor, video, where)
    input_ids, labels = encode_chat(row.messages, image_counts, tokenizer, chat.system_prompt, video_counts,
                                    video_times if chat.timestamped_videos else None, chat.think_block,
                                    chat.think_block_trained)
    return tensors, input_ids, labels


def measure(row: Row, tokenizer, image_processor, video: VideoArgs, chat: ChatFormat, where: str,
            max_images: int = 0) -> tuple[int, int, list[list[int]]]:
    """(token length, index of the last `<|vision_end|>` or -1, [frames, tokens] of each video) of a row. More
    than `max_images` images (0: no limit; videos do not count) is a DataError."""
    if max_images and len(row.images) > max_images:
        raise DataError(f"{where}: {len(row.images)} images, more than --max-images-per-sample {max_images}")
    tensors, input_ids, _ = encode_row(row, tokenizer, image_processor, video, chat, where)
    grids = tensors["video_grid_thw"].tolist() if "video_grid_thw" in tensors else []
    videos = [[t * image_processor.temporal_patch_size, t * h * w // image_processor.merge_size ** 2]
              for t, h, w in grids]
    return len(input_ids), last_vision_end(input_ids, tokenizer), videos


def cut_to_length(input_ids: list[int], labels: list[int], max_seq_length: int, tokenizer, where: str):
    """Cut text from the right, never through an image or a video (each ends with `<|vision_end|>`): its
    tokens and features must stay paired."""
    vision_end = last_vision_end(input_ids, tokenizer)
    if vision_end >= max_seq_length:
        raise DataError(vision_past_limit(where, len(input_ids), vision_end, max_seq_length))
    return input_ids[:max_seq_length], labels[:max_seq_length]
