"""The LLaVA layout: `conversations` of human/gpt turns (`from`, `value`), `image` (a path or a list, relative
to the image folder), `video` (the frame paths of one video, or a list of such lists) and `video_fps` (one
frame rate for all the row's videos, or a list of one per video)."""

from __future__ import annotations

from ftloop.data.rows import check_videos, finish_row, is_image, per_video_fps
from ftloop.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalize_llava_row(row: dict, where: str, image_folder: str) -> dict:
    """LLaVA layout -> the normal form (ftloop.data.rows)."""
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
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"{where}: unknown role {turn.get('from') if isinstance(turn, dict) else turn!r}; "
                            "use human, gpt or system")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: a `{turn.get('from')}` turn has no text `value`")
        messages.append({"role": role, "content": turn["value"]})
    return finish_row(messages, images, videos, where, image_folder,
                      video_fps=per_video_fps(row.get("video_fps"), len(videos)))
