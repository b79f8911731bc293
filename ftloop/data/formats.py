"""Reading training rows into one normal form (ftloop.data.rows).

Sources (ftloop.data.sources): a .json (array) or .jsonl file, or a Hugging Face dataset
(ftloop.data.hf_datasets: a `save_to_disk` folder, a .parquet or .arrow file, a hub name). Layouts: LLaVA
(`conversations`, ftloop.data.llava) and messages (OpenAI/TRL/Qwen, ftloop.data.messages), detected per
source from the first rows' keys. Every problem is reported as one line naming the source and the row.
"""

from __future__ import annotations

import typing

from ftloop.config import DataArgs
from ftloop.data.hf_datasets import read_dataset_rows
from ftloop.data.llava import normalize_llava_row
from ftloop.data.messages import normalize_messages_row
from ftloop.data.rows import where
from ftloop.data.sources import default_image_folder, is_dataset_source, read_json_rows
from ftloop.errors import DataError

DATA_FORMATS = typing.get_args(typing.get_type_hints(DataArgs)["data_format"])  # --data-format's choices
DETECT_ROWS = 20  # rows looked at to tell the layouts apart


def detect_format(path: str, rows: list[tuple[int, dict]], data_format: str = "auto") -> str:
    """`llava` or `messages`: `data_format` unless it is auto, else told from the keys of the first rows."""
    if data_format != "auto":
        return data_format
    keys = set().union(*(row.keys() for _, row in rows[:DETECT_ROWS]))
    if "conversations" in keys and "messages" in keys:
        raise DataError(f"{path}: rows have both `conversations` and `messages`; "
                        "pass --data-format llava or messages")
    if "conversations" in keys or "messages" in keys:
        return "llava" if "conversations" in keys else "messages"
    shown = ", ".join(sorted(map(str, keys))[:8]) or "none"
    raise DataError(f"{path}: rows have neither `conversations` (LLaVA layout) nor `messages` (messages "
                    f"layout); their keys: {shown}")


def load_rows(path: str, image_folder: str = "", errors: list[str] | None = None, data_format: str = "auto",
              split: str = "train") -> list[dict]:
    """All rows of a file or dataset, normalised; image paths resolved against image_folder.

    With an `errors` list, each bad row is appended there as its one-line message and skipped instead of
    raising (a source that cannot be read at all, a malformed .json array, or rows whose layout cannot be
    detected still raise: no row is readable). `split` ("train" or "eval") picks the split of a Hugging
    Face DatasetDict (ftloop.data.hf_datasets.pick_split).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, not {data_format!r}")
    folder = image_folder or default_image_folder(path)
    rows = read_dataset_rows(path, split) if is_dataset_source(path) else read_json_rows(path, errors)
    if not rows:
        if not errors:
            raise DataError(f"{path}: no rows")
        return []
    layout = detect_format(path, rows, data_format)
    normalize = normalize_llava_row if layout == "llava" else normalize_messages_row
    if errors is None:
        return [dict(normalize(row, where(path, n), folder), row=n) for n, row in rows]
    good = []
    for n, row in rows:
        try:
            good.append(dict(normalize(row, where(path, n), folder), row=n))
        except DataError as err:
            errors.append(str(err))
    return good
