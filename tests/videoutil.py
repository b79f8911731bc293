"""Small video files made with PyAV for the tests, each frame telling its own index by its colour, and the rules of
Qwen's qwen-vl-utils written out (the reference the tests hold ftloop.data.video to)."""

import math
from fractions import Fraction

import av
import numpy as np
import torch

LEVELS = 10  # per channel: frame index k -> colour digits of k in base 10, 25 apart (a lossy codec moves them < 8)


def frame_colour(index: int) -> tuple[int, int, int]:
    return tuple(12 + 25 * ((index // LEVELS ** c) % LEVELS) for c in range(3))


def frame_index(pixels: np.ndarray) -> int:
    """The index (mod 1000) a frame's colour tells, from its mean colour."""
    mean = pixels.reshape(-1, 3).mean(0)
    return sum(int(round((mean[c] - 12) / 25)) * LEVELS ** c for c in range(3))


def make_video(path, frames: int, fps=30, size=(64, 48), codec: str = "libx264", durations_ms=None,
               index_first: bool = False, textured: bool = False) -> str:
    """A video of `frames` flat frames (frame k in `frame_colour(k)`), `size` = (width, height). `fps`: a number
    or Fraction; `durations_ms`: each frame's duration instead (a variable frame rate, millisecond timestamps);
    `index_first`: an .mp4's index before its frames (`-movflags faststart`, as files made for streaming);
    `textured`: random pixels instead (no two patches alike: a wrong layout shows)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if index_first else {}) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(100000))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if durations_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        start = 0
        for k in range(frames):
            pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
            pixels[:] = np.random.default_rng(k).integers(0, 256, pixels.shape) if textured else frame_colour(k)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if durations_ms is not None:
                frame.pts, frame.time_base = start, Fraction(1, 1000)
                start += durations_ms[k]
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return str(path)


# ---- qwen-vl-utils (vision_process.py), written out ----------------------------------------------------------

def qwen_nframes(total: int, video_fps: float, fps=2.0, min_frames=4, max_frames=768, factor=2) -> int:
    """smart_nframes."""
    min_frames = math.ceil(min_frames / factor) * factor
    max_frames = math.floor(min(max_frames, total) / factor) * factor
    nframes = total / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total)
    return math.floor(nframes / factor) * factor


def qwen_indices(total: int, nframes: int) -> list[int]:
    """_read_video_*: idx = torch.linspace(0, total_frames - 1, nframes).round().long()."""
    return torch.linspace(0, total - 1, nframes).round().long().tolist()


def qwen_max_pixels(nframes: int, factor: int, min_pixels=None, max_pixels=None, total_pixels=None) -> float:
    """fetch_video: max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))."""
    min_pixels = min_pixels or 128 * factor * factor
    max_pixels = max_pixels or 768 * factor * factor
    total_pixels = total_pixels or 128000 * factor * factor * 0.9
    return max(min(max_pixels, total_pixels / nframes * 2), int(min_pixels * 1.05))


def qwen_video_layout(frames: torch.Tensor, processor) -> tuple[torch.Tensor, list[int]]:
    """transformers' Qwen2VLVideoProcessor.patchify (padding by the last frame, view, permute), written out here
    because that class cannot be imported without torchvision. frames: (F, C, H, W)."""
    video = frames[None]
    temporal, patch, merge = processor.temporal_patch_size, processor.patch_size, processor.merge_size
    if pad := -video.shape[1] % temporal:
        video = torch.cat([video, video[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    _, num_frames, channel, height, width = video.shape
    t, h, w = num_frames // temporal, height // patch, width // patch
    patches = video.reshape(1, t, temporal, channel, h // merge, merge, patch, w // merge, merge, patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(t * h * w, channel * temporal * patch * patch), [t, h, w]
