"""One normalised row as training sees it: vision tensors, token ids and labels, and its length.

Training (SFTDataset), the check before training (ftloop.data.validate) and the data preflight
(ftloop.data.preflight) all go through `encode_row`, so the lengths they measure are the lengths trained on.
"""

from __future__ import annotations

from ftloop.data.chat import ChatFormat, encode_chat, last_vision_end, vision_past_limit
from ftloop.data.rows import where as row_where
from ftloop.data.vision import load_image_processor, row_vision_inputs
from ftloop.errors import DataError
from ftloop.family import check_supported


def load_tokenizer_and_processor(model: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's tokenizer and its image processor with the run's pixel limits (--min/max-pixels)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model), load_image_processor(model, min_pixels, max_pixels)


def load_model_type(model: str) -> str:
    """config.json's `model_type` (the family: ftloop.family), refused in one line unless ftloop trains it."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model).model_type
    check_supported(model_type, f"--model-name-or-path {model}")
    return model_type


def encode_row(row: dict, tokenizer, image_processor, chat: ChatFormat, where: str):
    """(vision tensors, input_ids, labels) of one normalised row, uncut, in the family's `chat` format;
    DataError naming `where` for an unreadable image or frame."""
    tensors, image_counts, video_counts, video_times = row_vision_inputs(row, image_processor, where)
    input_ids, labels = encode_chat(row["messages"], image_counts, tokenizer, chat.system_prompt, video_counts,
                                    video_times if chat.timestamped_videos else None)
    return tensors, input_ids, labels


def measure(row: dict, tokenizer, image_processor, chat: ChatFormat, where: str,
            max_images: int = 0) -> tuple[int, int]:
    """(token length, index of the last `<|vision_end|>` or -1) of a row. More than `max_images` images
    (0: no limit; videos do not count) is a DataError."""
    if max_images and len(row["images"]) > max_images:
        raise DataError(f"{where}: {len(row['images'])} images, more than --max-images-per-sample {max_images}")
    _, input_ids, _ = encode_row(row, tokenizer, image_processor, chat, where)
    return len(input_ids), last_vision_end(input_ids, tokenizer)


def measure_row(row: dict, tokenizer, image_processor, chat: ChatFormat, max_seq_length: int | None = None,
                source: str = "data", max_images: int = 0) -> int:
    """Token length of one normalised row (images and videos included); DataError (naming `source` and the
    row) for an unreadable image or frame, more than `max_images` images (0: no limit), or when
    max_seq_length is given and the row's images or videos end past it (training could not truncate it)."""
    where = row_where(source, row.get("row", "?"))
    length, vision_end = measure(row, tokenizer, image_processor, chat, where, max_images)
    if max_seq_length is not None and vision_end >= max_seq_length:
        raise DataError(vision_past_limit(where, length, vision_end, max_seq_length))
    return length


def cut_to_length(input_ids: list[int], labels: list[int], max_seq_length: int, tokenizer, where: str):
    """Cut text from the right, never through an image or a video (each ends with `<|vision_end|>`): its
    tokens and features must stay paired."""
    vision_end = last_vision_end(input_ids, tokenizer)
    if vision_end >= max_seq_length:
        raise DataError(vision_past_limit(where, len(input_ids), vision_end, max_seq_length))
    return input_ids[:max_seq_length], labels[:max_seq_length]
