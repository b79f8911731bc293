"""Video files (.mp4, .avi, .mov, .mkv, .webm, ...) decoded with PyAV and sampled as Qwen's own tools sample them.

qwen-vl-utils (`fetch_video`, the loader of Qwen's fine-tuning and inference scripts) is the rule, because the
models were trained on what it gives:

- frame count (`smart_nframes`): the video's frames / its frame rate x --video-fps, at least --video-min-frames
  (rounded up to a multiple of the temporal patch, 2), at most --video-max-frames and the video's own frame count
  (rounded down), then rounded down to a multiple of 2; fewer than 2 frames is an error;
- which frames: `linspace(0, frames - 1, count).round()` in float32, as `torch.linspace` computes it;
- frame size (`fetch_video`): `smart_resize` (transformers' own) to multiples of f = patch_size x merge_size, its area
  within --video-min-pixels and max(min(--video-max-pixels, 2 x --video-total-pixels / count), 1.05 x
  --video-min-pixels): a long video's frames shrink to keep the clip inside the budget. Bicubic, with pillow.
- time: the sampled frame rate is count / duration, so Qwen2.5-VL's `second_per_grid_ts` is 2 / that rate, and
  Qwen3-VL's `<t seconds>` are each frame group's mean time.

Where qwen-vl-utils reads the frame rate from the container (decord's and torchvision's average rate) and a frame's
time as its index / that rate, this reads the frames' own timestamps: the rate is (frames - 1) / (last - first
timestamp) and a frame's time is its timestamp from the first. On a constant-rate file the two are equal to the
last bit (tested); on a variable-rate file (phone video) the timestamps are the truth.

Decoding uses PyAV's own demuxer and decoder, not transformers' `read_video_pyav`: that one counts frames with the
container's header (0 in .mkv and .webm, wrong in some .mp4), does not close the file, and has no timestamps. Two
passes: the packets are counted without decoding (cheap), then frames are decoded up to the last one sampled, and
only the sampled ones are converted to RGB. A file PyAV cannot open, without a video stream, with no frames or
fewer than its packets promise (truncated) is the row's one DataError line.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from PIL import Image

from ftloop.config import VideoArgs
from ftloop.data.sources import ImageRef
from ftloop.errors import DataError, one_line

# qwen-vl-utils' budgets, in tokens of the model's patch (x f^2 for pixels) and its context (MODEL_SEQ_LEN)
MIN_TOKENS, MAX_TOKENS, CONTEXT_TOKENS = 128, 768, 128000


@dataclass
class DecodedVideo:
    frames: list[Image.Image]  # the sampled frames, RGB, resized
    times: list[float]  # each sampled frame's time in seconds from the first frame
    seconds_per_frame: float  # of the sampled frames: duration / count (1 / qwen-vl-utils' sample_fps)
    total_frames: int  # in the file


def frame_count(total: int, video_fps: float, video: VideoArgs, factor: int, fps: float | None = None) -> int:
    """qwen-vl-utils' `smart_nframes`: how many frames to sample from `total` frames at `video_fps`, at `fps` (None:
    --video-fps) frames per second, a multiple of `factor` (the temporal patch)."""
    fps = video.video_fps if fps is None else fps
    least = math.ceil(video.video_min_frames / factor) * factor
    most = math.floor(min(video.video_max_frames, total) / factor) * factor
    count = min(max(total / video_fps * fps, least), most, total)
    return math.floor(count / factor) * factor


def frame_indices(total: int, count: int) -> list[int]:
    """qwen-vl-utils' choice of `count` frames out of `total`: evenly spaced, first and last included."""
    return torch.linspace(0, total - 1, count).round().long().tolist()


def pixel_budget(video: VideoArgs, factor: int, count: int) -> tuple[int, float]:
    """(min, max) area of each of `count` frames, as qwen-vl-utils' `fetch_video` bounds them."""
    low = video.video_min_pixels or MIN_TOKENS * factor * factor
    high = video.video_max_pixels or MAX_TOKENS * factor * factor
    total = video.video_total_pixels or CONTEXT_TOKENS * factor * factor * 0.9
    return low, max(min(high, total / count * 2), int(low * 1.05))


def frame_size(height: int, width: int, video: VideoArgs, factor: int, count: int) -> tuple[int, int]:
    """(height, width) every sampled frame is resized to: transformers' `smart_resize` within `pixel_budget`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    low, high = pixel_budget(video, factor, count)
    return smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)


def _open(source: str | ImageRef):
    import av

    if isinstance(source, ImageRef):  # a data: URI, decoded in memory
        data, path = source.read()
        return av.open(io.BytesIO(data) if data is not None else path)
    return av.open(source)


def _timestamps(source, where: str) -> tuple[list[Fraction], Fraction]:
    """Pass 1, no decoding: each frame's presentation time (seconds, sorted) from the packets, and the stream's
    average rate (the fallback where packets carry no time)."""
    with _open(source) as container:
        if not container.streams.video:
            raise DataError(f"{where}: video {source} has no video stream (audio only, or not a video)")
        stream = container.streams.video[0]
        base = stream.time_base or Fraction(1, 1)
        stamps = [packet.pts if packet.pts is not None else packet.dts
                  for packet in container.demux(stream) if packet.size]
        rate = stream.average_rate or stream.guessed_rate
    if None in stamps:
        if not rate:
            raise DataError(f"{where}: video {source} has neither frame timestamps nor a frame rate; re-encode it")
        return [Fraction(i) / Fraction(rate) for i in range(len(stamps))], Fraction(rate)
    return [Fraction(s) * base for s in sorted(stamps)], Fraction(rate) if rate else None


def decode_video(source: str | ImageRef, video: VideoArgs, factor: int, temporal: int, where: str,
                 fps: float | None = None) -> DecodedVideo:
    """The frames of the video file `source` that Qwen's rule samples (`fps`: the row's own rate, None: --video-fps),
    resized within the budget; `factor` = patch_size x merge_size, `temporal` the temporal patch size."""
    try:
        return _decode(source, video, factor, temporal, where, fps)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{where}: video not found: {source}") from None
    except Exception as err:  # noqa: BLE001 - PyAV's and FFmpeg's complaints (not a video, damaged data), one line
        raise DataError(f"{where}: cannot decode video {source} ({one_line(err, with_type=True)})") from None


def _decode(source, video: VideoArgs, factor: int, temporal: int, where: str, fps: float | None) -> DecodedVideo:
    stamps, rate = _timestamps(source, where)
    total = len(stamps)
    if total < temporal:
        raise DataError(f"{where}: video {source} has {total} frame{'s' if total != 1 else ''}; a video needs at "
                        f"least {temporal} (give a single frame as an image)")
    span = stamps[-1] - stamps[0]
    video_fps = Fraction(total - 1) / span if span > 0 else rate
    if not video_fps:
        raise DataError(f"{where}: video {source}: all its frames have one timestamp, and it has no frame rate")
    count = frame_count(total, float(video_fps), video, temporal, fps)
    if count < temporal:
        raise DataError(f"{where}: video {source}: {count} frames sampled, fewer than {temporal}; raise --video-fps "
                        "or --video-min-frames")
    indices = frame_indices(total, count)
    wanted, frames, times, decoded = set(indices), [], [], 0
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
        size = None
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted:
                image = frame.to_image()  # RGB
                if size is None:
                    size = frame_size(image.height, image.width, video, factor, count)
                frames.append(image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
                              if (image.height, image.width) != size else image)
                times.append(float(stamps[index] - stamps[0]))
            if index >= indices[-1]:
                break
    if len(frames) < count:
        raise DataError(f"{where}: video {source} lists {total} frames but only {decoded} decode (truncated or "
                        "damaged); re-encode it or drop the row")
    return DecodedVideo(frames, times, float(Fraction(total) / video_fps / count), total)
