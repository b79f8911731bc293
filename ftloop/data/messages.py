"""The messages layout (OpenAI / TRL / Qwen): `messages` with `role` system, user or assistant and
`content` either a string or a list of parts.

Parts are `{"type": "text", "text": ...}`, `{"type": "image", "image": path}` and `{"type": "video",
"video": [frame paths]}`. An image or video part may instead be bare (`{"type": "image"}`, TRL's layout):
its media then come, in order, from the row's top-level `images` (or `image`) and `videos` lists. The parts
of a message are joined with nothing in between, as Qwen's chat template renders them, each image part
becoming `<image>` and each video part `<video>`; the result is the same normal form as a LLaVA row
(ftloop.data.rows). A string content may itself hold `<image>` / `<video>` placeholders, which take
their media from the top-level lists like bare parts. A video's frame rate is its part's `fps` (as in
qwen-vl-utils) or, for videos from the top-level list, the row's `video_fps` (one number, or one per video).
"""

from __future__ import annotations

from ftloop.data.rows import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, check_videos, finish_row, is_image, per_video_fps
from ftloop.errors import DataError

ROLES = ("system", "user", "assistant")
LOCAL_SCHEME = "file://"  # Qwen's examples write local images as file:///path


def _path(value, where: str, kind: str):
    """An image part's path (or ImageRef) without a file:// prefix (a URL is refused with the other paths,
    ftloop.data.rows.resolve_images)."""
    if isinstance(value, str):
        return value[len(LOCAL_SCHEME):] if value.startswith(LOCAL_SCHEME) else value
    if is_image(value):
        return value
    raise DataError(f"{where}: an {kind} part's `{kind}` must be a path (or leave it out and list the "
                    f"{kind}s in the row's top-level `{kind}s`)")


def _render(content: list, where: str, images: list, videos: list, fps: list) -> str:
    """The parts as one string with placeholders; the media parts name are appended to images/videos (and
    each such video's `fps`, or None, to fps)."""
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise DataError(f"{where}: a text part has no string `text`")
            text.append(part["text"])
        elif kind == "image":
            if part.get("image") is not None:  # else bare: its image comes from the top-level list
                images.append(_path(part["image"], where, "image"))
            text.append(IMAGE_PLACEHOLDER)
        elif kind == "video":
            frames = part.get("video")
            if frames is not None:
                if not isinstance(frames, list) or not frames or not all(isinstance(f, str) for f in frames):
                    raise DataError(f"{where}: a video part's `video` must be a non-empty list of frame paths")
                videos.append([_path(f, where, "video frame") for f in frames])
                fps.append(part.get("fps"))
            elif part.get("fps") is not None:
                raise DataError(f"{where}: a bare video part has an `fps`; give the frame rates of the top-level "
                                "`videos` in the row's `video_fps`")
            text.append(VIDEO_PLACEHOLDER)
        else:
            shown = part.get("type") if isinstance(part, dict) else part
            raise DataError(f"{where}: unknown content part {shown!r}; use type text, image or video")
    return "".join(text)


def _media(row: dict, where: str, inline: list, kind: str, placeholders: int) -> list:
    """The row's images (kind "image") or videos: from the parts, or from the top-level list."""
    field = f"{kind}s"
    top = row.get(field)
    if top is None and kind == "image":
        top = row.get("image")  # a single-image column, common in datasets
        top = [top] if is_image(top) else top
    if inline and placeholders > len(inline):
        raise DataError(f"{where}: some {kind} parts carry a path and others (bare parts, `<{kind}>` "
                        f"placeholders) do not; give every {kind} in its part, or all in a top-level `{field}` list")
    if inline:
        if top:
            raise DataError(f"{where}: {kind} parts carry paths and the row also has a top-level `{field}` "
                            "list; use one of the two")
        return inline
    top = [] if top is None else top
    if kind == "image" and (not isinstance(top, list) or not all(is_image(p) for p in top)):
        raise DataError(f"{where}: `images` must be a list of paths")
    if kind == "video":
        check_videos(top, where, field)
    if len(top) != placeholders:
        raise DataError(f"{where}: {placeholders} bare {kind} parts or `<{kind}>` placeholders but "
                        f"{len(top)} entries in `{field}`")
    return top


def normalize_messages_row(row: dict, where: str, image_folder: str) -> dict:
    """Messages layout -> the normal form; paths are relative to image_folder (absolute ones stay)."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: missing or empty `messages` list")
    images, videos, part_fps = [], [], []
    messages = []
    for turn in turns:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            shown = turn.get("role") if isinstance(turn, dict) else turn
            raise DataError(f"{where}: unknown role {shown!r}; use system, user or assistant")
        content = turn.get("content")
        if isinstance(content, list):
            content = _render(content, where, images, videos, part_fps)
        elif not isinstance(content, str):
            raise DataError(f"{where}: a `{role}` message has no `content` (a string or a list of parts)")
        messages.append({"role": role, "content": content})
    counts = {p: sum(m["content"].count(p) for m in messages) for p in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)}
    image_list = _media(row, where, images, "image", counts[IMAGE_PLACEHOLDER])
    video_list = _media(row, where, videos, "video", counts[VIDEO_PLACEHOLDER])
    if videos:  # the videos came from their parts, and so do their frame rates
        if row.get("video_fps") is not None:
            raise DataError(f"{where}: video parts carry their frames and the row also has a top-level "
                            "`video_fps`; give each video part its `fps`")
        fps = part_fps
    else:
        fps = per_video_fps(row.get("video_fps"), len(video_list))
    return finish_row(messages, image_list, video_list, where, image_folder, user="user", assistant="assistant",
                      video_fps=fps)
