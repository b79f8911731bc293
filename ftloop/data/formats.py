"""Reading training rows into one normal form.

A row becomes `{"messages": [{"role": "system"|"user"|"assistant", "content": str}], "images": [image],
"videos": [[frame path, ...], ...], "row": its 1-based number in the source}` where the content keeps
`<image>` and `<video>` placeholders in place, an image is an absolute path or an `ImageRef` into a
Hugging Face dataset (read only when opened), and frame paths are absolute. Every problem is reported as
one line naming the source and the row.

Sources: a .json (array) or .jsonl file, or a Hugging Face dataset (`ftloop.data.hf_datasets`: a
`save_to_disk` folder, a .parquet or .arrow file, a hub name). Layouts: LLaVA (`conversations`, here) and
messages (OpenAI/TRL/Qwen, `ftloop.data.messages`), detected per source from the first rows' keys.
"""

from __future__ import annotations

import json
import os
import re

from ftloop.data.image_ref import ImageRef

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DATA_FORMATS = ("auto", "llava", "messages")
DETECT_ROWS = 20  # rows looked at to tell the layouts apart
JSON_SUFFIXES, DATASET_SUFFIXES = (".json", ".jsonl"), (".parquet", ".arrow")
# A hub dataset id: "name" or "org/name" (a local path that does not exist is not one: see looks_like_hub_id).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class DataError(ValueError):
    """A problem with the user's data; the message names file and row."""


def read_json_rows(path: str, errors: list[str] | None = None) -> list[tuple[int, dict]]:
    """(row number, row) pairs of a .json array or a .jsonl file (told apart by the first character).

    In a .jsonl file the row number is the line number, blank lines included, so that every message about
    a row points at the line an editor shows. With an `errors` list, a row that is not valid json (.jsonl)
    or not an object is appended there as its one-line message and skipped instead of raising.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            text = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid json at line {err.lineno} column {err.colno}: {err.msg}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                problem = f"{path}: row {number}: not valid json ({err.msg})"
                if errors is None:
                    raise DataError(problem) from None
                errors.append(problem)
    good = []
    for number, row in rows:
        if not isinstance(row, dict):
            problem = f"{path}: row {number}: expected a json object, got {type(row).__name__}"
            if errors is None:
                raise DataError(problem)
            errors.append(problem)
        else:
            good.append((number, row))
    return good


def looks_like_hub_id(path: str) -> bool:
    """`name` or `org/name` that is not a local path and not a data file name (`x.json` is a missing file)."""
    return (not os.path.exists(path) and HUB_ID.fullmatch(path) is not None
            and not path.lower().endswith(JSON_SUFFIXES + DATASET_SUFFIXES))


def source_problem(path: str) -> str | None:
    """None when `path` can be tried as data (an existing file or folder, or a hub dataset name, which may
    still fail to load later), else what is wrong with it."""
    if os.path.exists(path) or looks_like_hub_id(path):
        return None
    if path.lower().endswith(JSON_SUFFIXES + DATASET_SUFFIXES):
        return "file not found"
    return "file not found (nor a folder, nor a hub dataset name such as org/name)"


def is_dataset_source(path: str) -> bool:
    """Read with `datasets` (a folder, a .parquet/.arrow file, a hub name) rather than as json/jsonl."""
    return os.path.isdir(path) or path.lower().endswith(DATASET_SUFFIXES) or looks_like_hub_id(path)


def is_image(value) -> bool:
    return isinstance(value, (str, ImageRef))


def resolve_images(images: list, folder: str, where: str, what: str = "image") -> list:
    """Paths joined to `folder` (absolute ones stay) and checked to be files; ImageRefs pass through."""
    resolved = []
    for image in images:
        if isinstance(image, ImageRef):
            resolved.append(image)
            continue
        path = os.path.join(folder, image)
        # a stat per image is cheap, and finding a typo now beats finding it at step 5000
        if not os.path.isfile(path):
            problem = "is a folder, not an image" if os.path.isdir(path) else "not found"
            raise DataError(f"{where}: {what} {problem}: {path}")
        resolved.append(path)
    return resolved


def check_videos(value, where: str, field: str) -> list[list[str]]:
    """`value` if it is a list of videos, each a non-empty list of frame paths."""
    if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
        raise DataError(f"{where}: `{field}` must be a list of videos, each a list of frame paths")
    for number, video in enumerate(value, start=1):
        if not video or not all(isinstance(p, str) for p in video):
            raise DataError(f"{where}: video {number} of `{field}` must be a non-empty list of frame paths")
    return value


def finish_row(messages: list[dict], images: list, videos: list[list[str]], where: str, folder: str,
               user: str = "human", assistant: str = "gpt") -> dict:
    """The checks every layout shares, on the normal form; `user`/`assistant` are the layout's role names."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no {assistant} turn, so nothing to learn from")
    for placeholder, items, noun in ((IMAGE_PLACEHOLDER, images, "images"), (VIDEO_PLACEHOLDER, videos, "videos")):
        count = sum(m["content"].count(placeholder) for m in messages)
        if count != len(items):
            raise DataError(f"{where}: {count} `{placeholder}` placeholders but {len(items)} {noun}")
        if any(placeholder in m["content"] for m in messages if m["role"] != "user"):
            raise DataError(f"{where}: `{placeholder}` placeholders belong in {user} turns")
    paths = resolve_images(images, folder, where)
    frames = [resolve_images(video, folder, where, f"video {n} frame") for n, video in enumerate(videos, start=1)]
    return {"messages": messages, "images": paths, "videos": frames}


def normalize_llava_row(row: dict, where: str, image_folder: str) -> dict:
    """LLaVA layout: `image` (str or list, relative to image_folder), `video` (the frame paths of one video,
    or a list of such lists) and `conversations` human/gpt turns."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: missing or empty `conversations` list")
    images = row.get("image") or []
    images = [images] if is_image(images) else images
    if not isinstance(images, list) or not all(is_image(p) for p in images):
        raise DataError(f"{where}: `image` must be a path or a list of paths")
    videos = row.get("video") or []
    if isinstance(videos, list) and all(isinstance(p, str) for p in videos) and videos:
        videos = [videos]  # the frames of one video
    videos = check_videos(videos, where, "video")
    messages = []
    for turn in turns:
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"{where}: unknown role {turn.get('from') if isinstance(turn, dict) else turn!r}; "
                            "use human, gpt or system")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: a `{turn.get('from')}` turn has no text `value`")
        messages.append({"role": role, "content": turn["value"]})
    return finish_row(messages, images, videos, where, image_folder)


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


def default_image_folder(path: str) -> str:
    """Where relative image paths point without --image-folder: the data file's folder, a dataset folder
    itself, or the working directory for a hub dataset."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    return os.path.dirname(os.path.abspath(path)) if os.path.exists(path) else os.getcwd()


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
    if is_dataset_source(path):
        from ftloop.data.hf_datasets import read_dataset_rows  # imports `datasets`: only when needed
        rows = read_dataset_rows(path, split)
    else:
        rows = read_json_rows(path, errors)
    if not rows:
        if not errors:
            raise DataError(f"{path}: no rows")
        return []
    from ftloop.data.messages import normalize_messages_row  # it builds on this module
    layout = detect_format(path, rows, data_format)
    normalize = normalize_llava_row if layout == "llava" else normalize_messages_row
    if errors is None:
        return [dict(normalize(row, f"{path}: row {n}", folder), row=n) for n, row in rows]
    good = []
    for n, row in rows:
        try:
            good.append(dict(normalize(row, f"{path}: row {n}", folder), row=n))
        except DataError as err:
            errors.append(str(err))
    return good
