"""The normal form every layout's rows become, and the checks all layouts share.

A row is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}], "images": [image],
"videos": [[frame path, ...], ...], "row": its 1-based number in the source}`, plus `"video_fps": [fps or
None, ...]` (one per video; None: Qwen's default) when the row gives a frame rate for any of its videos.
The content keeps `<image>` and `<video>` placeholders in place, an image is an absolute path or an
`ImageRef` into a Hugging Face dataset (read only when opened), and frame paths are absolute. The layouts
(ftloop.data.llava, ftloop.data.messages) build on this module; ftloop.data.formats picks one per source.

Every problem is one line that begins `<source>: row <N>:` (`where`), so that problems from every stage can
be sorted back into file order (`row_number`).
"""

from __future__ import annotations

import os

from ftloop.data.image_ref import ImageRef
from ftloop.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


def where(source: str, number) -> str:
    """The prefix of every message about row `number` of `source`."""
    return f"{source}: row {number}"


def row_number(message: str) -> int:
    """The N of a "<source>: row N: ..." message (0 for a message about the whole source)."""
    _, _, rest = message.partition(": row ")
    number = rest.split(":", 1)[0]
    return int(number) if number.isdigit() else 0


def is_image(value) -> bool:
    return isinstance(value, (str, ImageRef))


def resolve_images(images: list, folder: str, where: str, what: str = "image") -> list:
    """Paths joined to `folder` (absolute ones stay) and checked to be files; ImageRefs pass through."""
    resolved = []
    for image in images:
        if isinstance(image, ImageRef):
            resolved.append(image)
            continue
        if image.startswith(("http://", "https://")):
            raise DataError(f"{where}: {what} URL {image}: ftloop reads local files only; download it first")
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


def per_video_fps(value, videos: int) -> list:
    """A row's `video_fps` as one entry per video: a single number applies to every video, a list gives one
    each, absent (None) means the default for all. The values themselves are checked where they are used
    (ftloop.data.video.video_inputs), which the check before training runs on every row."""
    if value is None:
        return [None] * videos
    return list(value) if isinstance(value, list) else [value] * max(videos, 1)  # kept when there is no video: refused


def finish_row(messages: list[dict], images: list, videos: list[list[str]], where: str, folder: str,
               user: str = "human", assistant: str = "gpt", video_fps: list | None = None) -> dict:
    """The checks every layout shares, on the normal form; `user`/`assistant` are the layout's role names."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no {assistant} turn, so nothing to learn from")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with a {assistant} turn: a reply to no prompt; begin "
                        f"with a {user} turn")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise DataError(f"{where}: a {assistant} turn is empty: only its end token would be learnt; drop the turn "
                        "or the row")
    for placeholder, items, noun in ((IMAGE_PLACEHOLDER, images, "images"), (VIDEO_PLACEHOLDER, videos, "videos")):
        count = sum(m["content"].count(placeholder) for m in messages)
        if count != len(items):
            raise DataError(f"{where}: {count} `{placeholder}` placeholders but {len(items)} {noun}")
        if any(placeholder in m["content"] for m in messages if m["role"] != "user"):
            raise DataError(f"{where}: `{placeholder}` placeholders belong in {user} turns")
    paths = resolve_images(images, folder, where)
    frames = [resolve_images(video, folder, where, f"video {n} frame") for n, video in enumerate(videos, start=1)]
    row = {"messages": messages, "images": paths, "videos": frames}
    fps = video_fps or [None] * len(videos)
    if any(rate is not None for rate in fps):
        if not videos:
            raise DataError(f"{where}: `video_fps` is given but the row has no videos")
        row["video_fps"] = fps
    return row
