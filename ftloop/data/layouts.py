"""The row layouts ftloop reads, each into the normal form (ftloop.data.rows.Row), and picking one per source.

- LLaVA: `conversations` of human/gpt turns (`from`, `value`; ms-swift's user/assistant/system too), `image` (a
  path or a list, relative to the image folder; or `images`, as LLaMA-Factory's sharegpt rows name it), `video`
  (or `videos`: a video file, a list of video files, the frame paths of one video, or a list of frame lists; a
  list of paths is files when every one has a video suffix, .mp4 and the like, and one video's frames when none
  has) and `video_fps` (one frame rate for all the row's videos, or a list of one per video: a file's sampling
  rate, a frame list's own rate).
- messages (OpenAI / TRL / Qwen): `messages` with `role` system, user or assistant and `content` either a string
  or a list of parts: `{"type": "text", "text": ...}`, `{"type": "image", "image": path}` and `{"type": "video",
  "video": file or [frame paths]}`, or OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` (or a bare
  string; `video_url` alike) and LLaMA-Factory v1's `{"type": "image_url" | "video_url" | "text", "value": ...}`;
  an image or video file may be a `file://` or a `data:` (base64) URI. A top-level `videos` entry is a video file
  (a string) or a frame list. An image or video part may instead be bare (`{"type": "image"}`, TRL's layout): its
  media then come, in order, from the row's top-level `images` (or `image`) and `videos` lists. The parts of a
  message are joined with nothing in between, as Qwen's chat template renders them, each image part becoming
  `<image>` and each video part `<video>`. A string content may itself hold `<image>` / `<video>` placeholders,
  which take their media from the top-level lists like bare parts. A video's frame rate is its part's `fps` (as
  in qwen-vl-utils) or, for videos from the top-level list, the row's `video_fps` (one number, or one per video).

In both, a turn may carry ms-swift's `"loss": false`: an assistant reply kept as context and not learnt. Audio
(`audios`, `<audio>`, audio parts) is refused: Qwen-VL models have no audio input, and it would train as text.
- query (ms-swift's older layouts): `query` and `response`, earlier turns in `history` (`[[query, response],
  ...]`), or `conversation` pairs (`[{"human": ..., "assistant": ...}]`), an optional `system`; images in
  `images` (videos in `videos`) placed by `<image>` tags or by Qwen-VL's `<img>path</img>` in the text. As
  ms-swift does, images beyond the `<image>` tags get their tags at the start of the first query (this layout
  only: elsewhere, a count that does not match is a bad row).
- several sources in one mixture file (`.yaml`: a list of `{path, image_folder, weight}`), each read as its own
  layout, its rows repeated `weight` times, concatenated in the file's order (the sampler then orders them all).
- a data set of LLaMA-Factory's `dataset_info.json` (`DIR/dataset_info.json:NAME`): its entry names the layout
  (`formatting`: sharegpt or alpaca) and the row's keys and roles (`columns`, `tags`), read into the messages
  layout.

The layout of a source is told from its first rows' keys (--data-format forces one). Every problem is reported
as one line naming the source and the row.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing

from ftloop.config import DataArgs
from ftloop.data.rows import (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Row, check_videos, finish_row, is_image,
                              is_video_file, message, per_video_fps)
from ftloop.data.sources import (dataset_info_entry, decode_data_uri, default_image_folder, is_dataset_source,
                                 read_dataset_rows, read_json_rows, read_mixture, where)
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
    if "query" in keys or "conversation" in keys:
        return "query"
    shown = ", ".join(sorted(map(str, keys))[:8]) or "none"
    raise DataError(f"{path}: rows have none of `conversations` (LLaVA layout), `messages` (messages layout) or "
                    f"`query` / `conversation` (query layout); their keys: {shown}")


def load_rows(path: str, image_folder: str = "", errors: list[str] | None = None, data_format: str = "auto",
              split: str = "train") -> list[Row]:
    """All rows of a file or dataset, normalised; image paths resolved against image_folder.

    With an `errors` list, each bad row is appended there as its one-line message and skipped instead of
    raising (a source that cannot be read at all, a malformed .json array, or rows whose layout cannot be
    detected still raise: no row is readable). `split` ("train" or "eval") picks the split of a Hugging
    Face DatasetDict (ftloop.data.sources.pick_split).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, not {data_format!r}")
    mixed = read_mixture(path)
    if mixed is not None:  # each source with its own media folder (else `image_folder`), its rows `weight` times
        return [dataclasses.replace(row, source=source.path) for source in mixed
                for row in load_rows(source.path, source.image_folder or image_folder, errors, data_format, split)
                * source.weight]
    folder = image_folder or default_image_folder(path)
    listed = dataset_info_entry(path)  # LLaMA-Factory's DIR/dataset_info.json:NAME
    if listed is not None:
        path, entry = listed
    rows = read_dataset_rows(path, split) if is_dataset_source(path) else read_json_rows(path, errors)
    if not rows:
        if not errors:
            raise DataError(f"{path}: no rows")
        return []
    if listed is not None:  # the entry names the layout and its keys
        normalize = functools.partial(normalize_llama_factory_row, entry=entry)
    else:
        normalize = {"llava": normalize_llava_row, "messages": normalize_messages_row,
                     "query": normalize_query_row}[detect_format(path, rows, data_format)]
    if errors is None:
        return [dataclasses.replace(normalize(row, where(path, n), folder), number=n) for n, row in rows]
    good = []
    for n, row in rows:
        try:
            good.append(dataclasses.replace(normalize(row, where(path, n), folder), number=n))
        except DataError as err:
            errors.append(str(err))
    return good


def refuse_audio(row: dict, where: str) -> None:
    """Audio (LLaMA-Factory's and ms-swift's `audios`) would otherwise train as plain text beside its placeholder."""
    if row.get("audios") or row.get("audio"):
        raise DataError(f"{where}: the row has audio (`audios`): Qwen-VL models have no audio input; drop the audio "
                        "or the row")


# ---- LLaVA ------------------------------------------------------------------------------------------------

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalize_llava_row(row: dict, where: str, image_folder: str) -> Row:
    """LLaVA layout -> the normal form (ftloop.data.rows)."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: missing or empty `conversations` list")
    refuse_audio(row, where)
    if row.get("image") and row.get("images"):
        raise DataError(f"{where}: the row has both `image` and `images`; give its images in one of them")
    images = row.get("image") or row.get("images") or []  # `images`: LLaMA-Factory's sharegpt rows
    images = [images] if is_image(images) else images
    if not isinstance(images, list) or not all(is_image(p) for p in images):
        raise DataError(f"{where}: `image` must be a path or a list of paths")
    if row.get("video") and row.get("videos"):
        raise DataError(f"{where}: the row has both `video` and `videos`; give its videos in one of them")
    videos = row.get("video") or row.get("videos") or []  # `videos`: LLaMA-Factory's sharegpt rows
    if is_image(videos):
        videos = [videos]  # one video file
    elif isinstance(videos, list) and videos and all(isinstance(p, str) for p in videos):
        files = [is_video_file(p) for p in videos]
        if not any(files):
            videos = [videos]  # the frames of one video
        elif not all(files):
            raise DataError(f"{where}: `video` mixes video files and frame images; give video files (.mp4, ...), "
                            "or the frames of one video, or a list of frame lists")
    videos = check_videos(videos, where, "video")
    messages = []
    for turn in turns:
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"{where}: unknown role {turn.get('from') if isinstance(turn, dict) else turn!r}; "
                            "use human, gpt or system")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: a `{turn.get('from')}` turn has no text `value`")
        messages.append(message(role, turn["value"], turn, where))
    return finish_row(messages, images, videos, where, image_folder,
                      video_fps=per_video_fps(row.get("video_fps"), len(videos)))


# ---- messages -------------------------------------------------------------------------------------------

MESSAGES_ROLES = ("system", "user", "assistant")
LOCAL_SCHEME = "file://"  # Qwen's examples write local images as file:///path


def _path(value, where: str, kind: str):
    """An image part's path (or ImageRef) without a file:// prefix (a URL is refused with the other paths,
    ftloop.data.rows.resolve_images)."""
    if isinstance(value, str):
        if value.startswith("data:"):
            return decode_data_uri(value, where)
        return value[len(LOCAL_SCHEME):] if value.startswith(LOCAL_SCHEME) else value
    if is_image(value):
        return value
    raise DataError(f"{where}: an {kind} part's `{kind}` must be a path (or leave it out and list the "
                    f"{kind}s in the row's top-level `{kind}s`)")


def _part_value(part: dict, kind: str):
    """What a `kind` part (text, image or video) holds, in whichever shape the row's tool writes it: ours and Qwen's
    (`{"type": "image", "image": path}`), OpenAI's (`{"type": "image_url", "image_url": {"url": ...}}` or a bare
    string) or LLaMA-Factory v1's (`{"type": "image_url", "value": path}`, `{"type": "text", "value": ...}`)."""
    if kind in part:
        return part[kind]
    url = part.get(f"{kind}_url")
    if url is not None:
        return url.get("url") if isinstance(url, dict) else url
    return part.get("value")


def _render(content: list, where: str, images: list, videos: list, fps: list) -> str:
    """The parts as one string with placeholders; the media parts name are appended to images/videos (and
    each such video's `fps`, or None, to fps)."""
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind[:-len("_url")] if kind in ("image_url", "video_url") else kind
        if kind == "text":
            if not isinstance(_part_value(part, "text"), str):
                raise DataError(f"{where}: a text part has no string `text`")
            text.append(_part_value(part, "text"))
        elif kind == "image":
            if _part_value(part, "image") is not None:  # else bare: its image comes from the top-level list
                images.append(_path(_part_value(part, "image"), where, "image"))
            text.append(IMAGE_PLACEHOLDER)
        elif kind == "video":
            value = _part_value(part, "video")
            if value is not None:
                if isinstance(value, str):  # a video file (a path, file:// or data: URI)
                    videos.append(_path(value, where, "video"))
                elif isinstance(value, list) and value and all(isinstance(f, str) for f in value):
                    videos.append([_path(f, where, "video frame") for f in value])
                else:
                    raise DataError(f"{where}: a video part's `video` must be a video file or a non-empty list of "
                                    "frame paths")
                fps.append(part.get("fps"))
            elif part.get("fps") is not None:
                raise DataError(f"{where}: a bare video part has an `fps`; give the frame rates of the top-level "
                                "`videos` in the row's `video_fps`")
            text.append(VIDEO_PLACEHOLDER)
        elif kind == "audio":
            raise DataError(f"{where}: an audio part: Qwen-VL models have no audio input; drop the audio or the row")
        else:
            shown = part.get("type") if isinstance(part, dict) else part
            raise DataError(f"{where}: unknown content part {shown!r}; use type text, image or video (or OpenAI's "
                            "image_url, video_url)")
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


def normalize_messages_row(row: dict, where: str, image_folder: str) -> Row:
    """Messages layout -> the normal form; paths are relative to image_folder (absolute ones stay)."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: missing or empty `messages` list")
    refuse_audio(row, where)
    images, videos, part_fps = [], [], []
    messages = []
    for turn in turns:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in MESSAGES_ROLES:
            shown = turn.get("role") if isinstance(turn, dict) else turn
            raise DataError(f"{where}: unknown role {shown!r}; use system, user or assistant")
        content = turn.get("content")
        if isinstance(content, list):
            content = _render(content, where, images, videos, part_fps)
        elif not isinstance(content, str):
            raise DataError(f"{where}: a `{role}` message has no `content` (a string or a list of parts)")
        messages.append(message(role, content, turn, where))
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


# ---- query (ms-swift) -------------------------------------------------------------------------------------

QWEN_VL_IMAGE = re.compile(r"<img>(.*?)</img>")  # Qwen-VL's inline image, which ms-swift reads too


def normalize_query_row(row: dict, where: str, image_folder: str) -> Row:
    """Query layout -> the messages layout's row -> the normal form."""
    if "conversation" in row:
        pairs = row["conversation"]
        if not isinstance(pairs, list) or not pairs or not all(isinstance(p, dict) for p in pairs):
            raise DataError(f"{where}: `conversation` must be a non-empty list of "
                            '{"human": ..., "assistant": ...}')
        pairs = [(p.get("human"), p.get("assistant")) for p in pairs]
    else:
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise DataError(f"{where}: `history` must be a list of [query, response] pairs")
        pairs = [*map(tuple, history), (row.get("query"), row.get("response"))]
    if not all(isinstance(text, str) for pair in pairs for text in pair):
        raise DataError(f"{where}: every query and response must be text (`query`, `response`, `history`)")
    inline = [QWEN_VL_IMAGE.findall(query) for query, _ in pairs]
    images = row.get("images") or []
    if any(inline) and images:
        raise DataError(f"{where}: images both in `<img>` tags and in `images`; give them in one of the two")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") is not None else []
    for query, response in pairs:
        messages += [{"role": "user", "content": QWEN_VL_IMAGE.sub(IMAGE_PLACEHOLDER, query)},
                     {"role": "assistant", "content": response}]
    images = [path for paths in inline for path in paths] or images
    tags = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if isinstance(images, list) and len(images) > tags:  # ms-swift's rule: the missing tags open the first query
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = IMAGE_PLACEHOLDER * (len(images) - tags) + first["content"]
    return normalize_messages_row({"messages": messages, "images": images, "videos": row.get("videos"),
                                   "audios": row.get("audios")}, where, image_folder)


# ---- LLaMA-Factory's dataset_info.json ---------------------------------------------------------------------

SHAREGPT_DEFAULTS = {"messages": "conversations", "role_tag": "from", "content_tag": "value", "user_tag": "human",
                     "assistant_tag": "gpt", "system_tag": "system"}
ALPACA_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output"}


def normalize_llama_factory_row(row: dict, where: str, image_folder: str, entry: dict) -> Row:
    """A row of a data set listed in LLaMA-Factory's dataset_info.json, read as LLaMA-Factory reads it: its
    `formatting` (sharegpt or alpaca), `columns` and `tags` name the row's keys and roles; -> the messages layout."""
    names = {**(entry.get("columns") or {}), **(entry.get("tags") or {})}
    formatting = entry.get("formatting", "alpaca")
    system = row.get(names["system"]) if names.get("system") else None
    messages = [{"role": "system", "content": system}] if system else []
    if formatting == "sharegpt":
        names = {**SHAREGPT_DEFAULTS, **names}
        roles = {names["user_tag"]: "user", names["assistant_tag"]: "assistant", names["system_tag"]: "system"}
        turns = row.get(names["messages"])
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: missing or empty `{names['messages']}` list (dataset_info.json's columns)")
        for turn in turns:
            role = roles.get(turn.get(names["role_tag"])) if isinstance(turn, dict) else None
            if role is None:
                shown = turn.get(names["role_tag"]) if isinstance(turn, dict) else turn
                raise DataError(f"{where}: role {shown!r} is none of dataset_info.json's tags "
                                f"{sorted(map(str, roles))} (tool turns are not trained)")
            messages.append({"role": role, "content": turn.get(names["content_tag"])})
    elif formatting == "alpaca":
        names = {**ALPACA_DEFAULTS, **names}
        history = (row.get(names["history"]) if names.get("history") else None) or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise DataError(f"{where}: `{names['history']}` must be a list of [query, response] pairs")
        for query, response in history:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        prompt = "\n".join(part for part in (row.get(names["prompt"]), row.get(names["query"])) if part)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row.get(names["response"])}]
    else:
        raise DataError(f"{where}: dataset_info.json's formatting {formatting!r}: ftloop reads sharegpt and alpaca")
    media = {kind: row.get(names[kind]) for kind in ("images", "videos") if names.get(kind)}
    return normalize_messages_row({"messages": messages, **media}, where, image_folder)
