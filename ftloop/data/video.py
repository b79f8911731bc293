"""Video rows through Qwen2-VL / Qwen2.5-VL / Qwen3-VL's video path, without transformers' video processor.

transformers' `Qwen2VLVideoProcessor` needs torchvision, which ftloop does not require. It is not needed:
a video is a list of frames, and Qwen's video processor treats each frame exactly as its image processor
treats an image (the same smart resize, rescale and normalisation) and differs only in the temporal axis.
So every frame goes through the checkpoint's own image processor (whatever its backend, with its own
patch size, merge size, pixel limits, mean and std), and only the temporal layout is done here:

- all frames of a video get one size: a frame whose size differs from the first frame's is resized to it
  first (decoded videos never differ; frame folders rarely do), so every frame gets the same grid;
- the image processor lays out an image as (h/merge, w/merge, merge, merge, channel, temporal, patch,
  patch) with the one frame repeated `temporal_patch_size` times; a video needs consecutive frames along
  that temporal axis instead, so frame k of a group of `temporal_patch_size` fills slot k, the frame count
  being padded to a multiple of `temporal_patch_size` by repeating the last frame (as Qwen's processor does);
- grid_thw = (frames / temporal_patch_size, h, w), and the groups follow each other in time.

A video of `temporal_patch_size` copies of one frame therefore gives exactly the pixel values that frame
gives as an image (tested). `second_per_grid_ts` = temporal_patch_size / fps places the groups in time in
Qwen2.5-VL's 3D rope (Qwen2-VL and Qwen3-VL ignore it); fps is Qwen's default 2.0 unless the row says
otherwise. Qwen3-VL instead writes each frame group's time into the text (`group_times`, ftloop.data.chat).
(Qwen3-VL's own video processor sizes frames by a pixel budget over the whole clip; here every frame gets the
image processor's per-image limits, --min-pixels / --max-pixels, as with the other families.)
"""

from __future__ import annotations

import torch
from PIL import Image

from ftloop.data.images import open_rgb
from ftloop.errors import DataError, one_line

DEFAULT_FPS = 2.0  # frames per second of the sampled frames, Qwen2.5-VL's default (qwen-vl-utils FPS)


def run_image_processor(image_processor, images: list, where: str) -> dict:
    """The image processor on a list of PIL images; its failure as one DataError line naming the row."""
    try:
        return image_processor(images=images, return_tensors="pt")
    except Exception as err:  # noqa: BLE001 - the processor's own complaint, on one line
        raise DataError(f"{where}: image processor failed ({one_line(err)})") from None


def video_patches(frames: list, image_processor, where: str) -> tuple[torch.Tensor, list[int]]:
    """(pixel values (t*h*w, channel*temporal_patch_size*patch^2), [t, h, w]) of one video's frames."""
    if not frames:
        raise DataError(f"{where}: a video has no frames")
    images = [open_rgb(source, where) for source in frames]
    size = images[0].size
    images = [im if im.size == size else im.resize(size, Image.Resampling.BICUBIC) for im in images]
    vision = run_image_processor(image_processor, images, where)
    grid = vision["image_grid_thw"]
    _, h, w = grid[0].tolist()
    temporal, patch = image_processor.temporal_patch_size, image_processor.patch_size
    pixels = vision["pixel_values"]
    channels = pixels.shape[-1] // (temporal * patch * patch)
    # (frame, h*w, channel, temporal copy, patch, patch): keep one copy of each frame.
    pixels = pixels.reshape(len(images), h * w, channels, temporal, patch, patch)[:, :, :, 0]
    if pad := -len(images) % temporal:
        pixels = torch.cat([pixels, pixels[-1:].expand(pad, *pixels.shape[1:])])
    t = pixels.shape[0] // temporal
    # (group, slot, h*w, channel, patch, patch) -> (group, h*w, channel, slot, patch, patch)
    pixels = pixels.reshape(t, temporal, h * w, channels, patch, patch).permute(0, 2, 3, 1, 4, 5)
    return pixels.reshape(t * h * w, channels * temporal * patch * patch), [t, h, w]


def group_times(frames: int, temporal: int, fps: float) -> list[float]:
    """Seconds of each group of `temporal` frames (the last padded by repeating its last frame): the mean time of
    its first and last frame, as Qwen3-VL's processor computes the timestamps it writes before each group."""
    index = [min(i, frames - 1) for i in range(-(-frames // temporal) * temporal)]
    return [(index[g] + index[g + temporal - 1]) / 2 / fps for g in range(0, len(index), temporal)]


def video_inputs(videos: list[list], image_processor, where: str, fps: list | None = None) -> tuple[dict, list]:
    """(`pixel_values_videos`, `video_grid_thw` and `second_per_grid_ts` of a row's videos, in order; each video's
    frame group times (`group_times`)).

    `fps`, when given, holds one frames-per-second value (or None for the default) per video."""
    fps = list(fps) if fps else [None] * len(videos)
    if len(fps) != len(videos):
        raise DataError(f"{where}: {len(fps)} fps values for {len(videos)} videos")
    patches, grids, seconds, times = [], [], [], []
    for frames, rate in zip(videos, fps):
        rate = DEFAULT_FPS if rate is None else rate
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
            raise DataError(f"{where}: a video's fps must be a positive number, got {rate!r}")
        pixels, grid = video_patches(frames, image_processor, where)
        patches.append(pixels)
        grids.append(grid)
        seconds.append(image_processor.temporal_patch_size / rate)
        times.append(group_times(len(frames), image_processor.temporal_patch_size, rate))
    return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
            "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32)}, times
