"""Reading training rows into one normal form.

A row becomes `{"messages": [{"role": "system"|"user"|"assistant", "content": str}], "images": [path],
"row": its number in the file}`
where the content keeps `<image>` placeholders in place and image paths are absolute. Every problem is
reported as one line naming the file and the 1-based row.
"""

from __future__ import annotations

import json
import os

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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


def normalize_llava_row(row: dict, where: str, image_folder: str) -> dict:
    """LLaVA layout: `image` (str or list, relative to image_folder) and `conversations` human/gpt turns."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: missing or empty `conversations` list")
    images = row.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: `image` must be a path or a list of paths")
    messages = []
    for turn in turns:
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"{where}: unknown role {turn.get('from') if isinstance(turn, dict) else turn!r}; "
                            "use human, gpt or system")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: a `{turn.get('from')}` turn has no text `value`")
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no gpt turn, so nothing to learn from")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        raise DataError(f"{where}: {placeholders} `<image>` placeholders but {len(images)} images")
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] != "user"):
        raise DataError(f"{where}: `<image>` placeholders belong in human turns")
    paths = [os.path.join(image_folder, p) for p in images]
    for path in paths:  # a stat per image is cheap, and finding a typo now beats finding it at step 5000
        if not os.path.isfile(path):
            what = "is a folder, not an image" if os.path.isdir(path) else "not found"
            raise DataError(f"{where}: image {what}: {path}")
    return {"messages": messages, "images": paths}


def load_rows(path: str, image_folder: str = "", errors: list[str] | None = None) -> list[dict]:
    """All rows of a LLaVA-style file, normalised; image paths resolved against image_folder.

    With an `errors` list, each bad row is appended there as its one-line message and skipped instead of
    raising (a file that cannot be read at all, or a malformed .json array, still raises: no row is readable).
    """
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    rows = read_json_rows(path, errors)
    if not rows and not errors:
        raise DataError(f"{path}: no rows")
    if errors is None:
        return [dict(normalize_llava_row(row, f"{path}: row {n}", folder), row=n) for n, row in rows]
    good = []
    for n, row in rows:
        try:
            good.append(dict(normalize_llava_row(row, f"{path}: row {n}", folder), row=n))
        except DataError as err:
            errors.append(str(err))
    return good
