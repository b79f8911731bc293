"""The normal form every layout's rows become (`Row`), and the checks all layouts share.

The layouts (ftloop.data.layouts) read a source's rows into Rows; everything after them (encoding, the check,
batching) reads Rows only. Every problem is one line that begins `<source>: row <N>:` (ftloop.data.sources.where).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ftloop.data.sources import ImageRef
from ftloop.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"  # LLaMA-Factory's and ms-swift's: refused, Qwen-VL models have no audio input


@dataclass
class Row:
    """One training row, as every layout normalises it."""
    messages: list[dict]
    """{"role": "system" | "user" | "assistant", "content": text}, the text holding one `<image>` / `<video>`
    placeholder where each image / video goes; an assistant message the row marks `"loss": false` (ms-swift's
    key) also holds "loss": False, and is context, not learnt."""
    images: list = field(default_factory=list)
    """Each image: an absolute path, or an `ImageRef` into a Hugging Face dataset (read only when opened)."""
    videos: list = field(default_factory=list)
    """Each video: the absolute path of a video file (or an `InlineImage` holding one: a data: URI), or the list of
    the absolute paths of its frames."""
    video_fps: list | None = None
    """Frames per second of each video, when the row gives any: a file's sampling rate (None: --video-fps), a
    frame list's own rate (None: Qwen's default, 2)."""
    number: int = 0
    """Its 1-based number in its source: the N of every message about it."""
    source: str = field(default="", compare=False)
    """The file it was read from, where that is not the --train-data / --eval-data given (a mixture's sources)."""


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
            problem = f"is a folder, not {'a video file' if what == 'video' else 'an image'}" \
                if os.path.isdir(path) else "not found"
            raise DataError(f"{where}: {what} {problem}: {path}")
        resolved.append(path)
    return resolved


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts")


def is_video_file(path: str) -> bool:
    """Whether a path names a video file by its suffix (what tells LLaVA's `video` list of files from a list of
    one video's frames)."""
    return path.lower().endswith(VIDEO_SUFFIXES)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_videos(value, where: str, field_name: str) -> list:
    """`value` if it is a list of videos, each a video file's path or a non-empty list of frame paths (a single
    frame image where a video goes is refused: the frames of a video are a list)."""
    if not isinstance(value, list) or not all(is_image(v) or isinstance(v, list) for v in value):
        raise DataError(f"{where}: `{field_name}` must be a list of videos, each a video file or a list of frame "
                        "paths")
    for number, video in enumerate(value, start=1):
        if isinstance(video, list) and (not video or not all(isinstance(p, str) for p in video)):
            raise DataError(f"{where}: video {number} of `{field_name}` must be a video file or a non-empty list of "
                            "frame paths")
        if isinstance(video, str) and video.lower().endswith(IMAGE_SUFFIXES):
            raise DataError(f"{where}: video {number} of `{field_name}` is an image ({video}); give a video file, or "
                            "the frames of one video as a list")
    return value


def per_video_fps(value, videos: int) -> list:
    """A row's `video_fps` as one entry per video: a single number applies to every video, a list gives one
    each, absent (None) means the default for all. The values themselves are checked where they are used
    (ftloop.data.media.video_inputs), which the check before training runs on every row."""
    if value is None:
        return [None] * videos
    return list(value) if isinstance(value, list) else [value] * max(videos, 1)  # kept when there is no video: refused


def message(role: str, content: str, turn: dict, where: str) -> dict:
    """One message of the normal form; `turn` is the row's own, whose `loss` (ms-swift: true, false or null) says
    whether an assistant reply is learnt (the default) or only context."""
    loss = turn.get("loss")
    if loss is not None and not isinstance(loss, bool):
        raise DataError(f"{where}: a message's `loss` is {loss!r}; give true, false or leave it out")
    if loss and role != "assistant":
        raise DataError(f"{where}: a {role} message has `loss`: true; only assistant replies are learnt")
    return {"role": role, "content": content, "loss": False} if loss is False else {"role": role, "content": content}


def finish_row(messages: list[dict], images: list, videos: list, where: str, folder: str,
               user: str = "human", assistant: str = "gpt", video_fps: list | None = None) -> Row:
    """The checks every layout shares, on the normal form; `user`/`assistant` are the layout's role names."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no {assistant} turn, so nothing to learn from")
    if not any(m["role"] == "assistant" and m.get("loss", True) for m in messages):
        raise DataError(f"{where}: every {assistant} turn has `loss`: false, so nothing to learn from")
    if any(AUDIO_PLACEHOLDER in m["content"] for m in messages):
        raise DataError(f"{where}: an `{AUDIO_PLACEHOLDER}` placeholder: Qwen-VL models have no audio input; drop "
                        "the audio or the row")
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
    frames = [resolve_images(video, folder, where, f"video {n} frame") if isinstance(video, list)
              else resolve_images([video], folder, where, "video")[0] for n, video in enumerate(videos, start=1)]
    fps = video_fps or [None] * len(videos)
    if any(rate is not None for rate in fps):
        if not videos:
            raise DataError(f"{where}: `video_fps` is given but the row has no videos")
        return Row(messages, paths, frames, fps)
    return Row(messages, paths, frames)
