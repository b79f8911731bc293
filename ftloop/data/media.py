"""A row's images and videos as the model takes them: images opened as RGB, frames through Qwen's video layout,
the image processor with the run's pixel limits. Every row is encoded through `row_vision_inputs` (by
ftloop.data.encode), in training and in the checks alike.

Images: any mode pillow reads becomes RGB, with EXIF orientation applied; an image is a path, or an `ImageRef`
into a Hugging Face dataset whose bytes are read only here. 16-bit images keep their range (0..65535 -> 0..255);
32-bit integer and float ones, which have none, are scaled by their own (min..max -> 0..255; NaN or infinite
values are the row's error). Whatever pillow raises while opening, decoding or converting an image (a PNG text
chunk past pillow's limit, a truncated file, ...) is the row's one DataError line: `--skip-bad-rows` skips it.

Videos, without transformers' video processor: `Qwen2VLVideoProcessor` needs torchvision, which ftloop does not
require. It is not needed: a video is a list of frames, and Qwen's video processor treats each frame exactly as its
image processor treats an image (the same smart resize, rescale and normalisation) and differs only in the
temporal axis. So every frame goes through the checkpoint's own image processor (whatever its backend, with its own
patch size, merge size, pixel limits, mean and std), and only the temporal layout is done here:

- all frames of a video get one size: a frame whose size differs from the first frame's is resized to it
  first (decoded videos never differ; frame folders rarely do), so every frame gets the same grid;
- the image processor lays out an image as (h/merge, w/merge, merge, merge, channel, temporal, patch,
  patch) with the one frame repeated `temporal_patch_size` times; a video needs consecutive frames along
  that temporal axis instead, so frame k of a group of `temporal_patch_size` fills slot k, the frame count
  being padded to a multiple of `temporal_patch_size` by repeating the last frame (as Qwen's processor does);
- grid_thw = (frames / temporal_patch_size, h, w), and the groups follow each other in time.

A video of `temporal_patch_size` copies of one frame therefore gives exactly the pixel values that frame
gives as an image (tested). A video is either a file, decoded, sampled and sized by ftloop.data.video as Qwen's
qwen-vl-utils does (its frames then skip the image processor's resize), or a list of frame images, all taken, each
within the image processor's limits (--min-pixels / --max-pixels), as qwen-vl-utils takes a frame list.
`second_per_grid_ts` = temporal_patch_size x seconds per sampled frame places the groups in time in Qwen2.5-VL's
3D rope (Qwen2-VL and Qwen3-VL ignore it): a file's own timing, or for a frame list the row's fps (Qwen's default
2.0 unless the row says otherwise). Qwen3-VL instead writes each frame group's time into the text (`group_times`,
ftloop.data.encode).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ftloop.config import VideoArgs
from ftloop.data.rows import Row
from ftloop.data.sources import ImageRef
from ftloop.data.video import decode_video
from ftloop.errors import ConfigError, DataError, one_line


def _open(source: str | ImageRef, where: str) -> Image.Image:
    if not isinstance(source, ImageRef):
        return Image.open(source)
    try:
        data, path = source.read()
    except Exception as err:  # noqa: BLE001 - the dataset's files moved or broke since the rows were read
        raise DataError(f"{where}: cannot read image {source} ({type(err).__name__}: {err})") from None
    if data is None and path is None:
        raise DataError(f"{where}: image is empty (no bytes, no path): {source}")
    return Image.open(io.BytesIO(data)) if data is not None else Image.open(path)


def open_rgb(source: str | ImageRef, where: str) -> Image.Image:
    """The image at `source` (a path or an ImageRef) as RGB; transparent pixels are composed onto white.
    `where` names the row. Any failure of pillow's, opening, decoding or converting it, is one DataError line."""
    try:
        with _open(source, where) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
        if image.width == 0 or image.height == 0:
            raise DataError(f"{where}: image has zero size: {source}")
        return _to_rgb(image, source, where)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{where}: image not found: {source}") from None
    except Image.DecompressionBombError:  # decoding it would take gigabytes in every loader worker
        raise DataError(f"{where}: image {source} has more than twice pillow's limit of {Image.MAX_IMAGE_PIXELS} "
                        "pixels (a decompression bomb, or a giant scan); shrink it first (--max-pixels resizes only "
                        "after decoding)") from None
    except IsADirectoryError:
        raise DataError(f"{where}: image path is a folder: {source}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        # pillow names an in-memory file by its object address: say what it means instead
        reason = "not an image format pillow reads" if isinstance(err, UnidentifiedImageError) and \
            isinstance(source, ImageRef) else err
        raise DataError(f"{where}: cannot read image {source} ({reason})") from None
    except Exception as err:  # noqa: BLE001 - pillow's other complaints (a PNG text chunk past its limit, ...)
        raise DataError(f"{where}: cannot read image {source} ({one_line(err, with_type=True)})") from None


def _to_rgb(image: Image.Image, source: str | ImageRef, where: str) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):  # 16-bit, any byte order: 0..65535 -> 0..255
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    elif image.mode in ("I", "F"):
        image = _stretched(image, source, where)
    return image.convert("RGB")


def _stretched(image: Image.Image, source: str | ImageRef, where: str) -> Image.Image:
    """A 32-bit integer (`I`) or float (`F`) image as 8-bit grey scaled by its own range, min -> 0 and max -> 255:
    such images (scientific TIFFs, depth maps, 16-bit PGMs, which pillow opens as `I`) have no fixed range, so
    scaling by the 16-bit one would leave a float image in 0..1 black. A constant image becomes black; NaN or
    infinite values are the row's problem (no range to scale by)."""
    values = np.asarray(image)  # float32 (F) or int32 (I), as stored
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DataError(f"{where}: image {source} ({image.mode} mode) has NaN or infinite pixel values; replace them "
                        "with finite ones or drop the image")
    low, high = float(values.min()), float(values.max())
    # float32 (8 bits out, half float64's memory) unless the range overflows it (a float image of -3e38..3e38)
    wide = high - low > float(np.finfo(np.float32).max)
    scaled = np.subtract(values, low, dtype=np.float64 if wide else np.float32)
    if high > low:  # else every value is `low`: 0, black
        scaled *= 255.0 / (high - low)
    return Image.fromarray(np.clip(np.rint(scaled, out=scaled), 0, 255).astype(np.uint8))  # mode L


# ---- videos -----------------------------------------------------------------------------------------------

DEFAULT_FPS = 2.0  # frames per second of the sampled frames, Qwen2.5-VL's default (qwen-vl-utils FPS)


def run_image_processor(image_processor, images: list, where: str) -> dict:
    """The image processor on a list of PIL images; its failure as one DataError line naming the row."""
    try:
        return image_processor(images=images, return_tensors="pt")
    except Exception as err:  # noqa: BLE001 - the processor's own complaint, on one line
        raise DataError(f"{where}: image processor failed ({one_line(err)})") from None


def video_patches(images: list[Image.Image], image_processor, where: str) -> tuple[torch.Tensor, list[int]]:
    """(pixel values (t*h*w, channel*temporal_patch_size*patch^2), [t, h, w]) of one video's frames (RGB images),
    each frame resized within the image processor's limits."""
    if not images:
        raise DataError(f"{where}: a video has no frames")
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


def decoded_video_patches(frames: list[Image.Image], image_processor) -> tuple[torch.Tensor, list[int]]:
    """`video_patches` of a decoded video file's frames, already sized (ftloop.data.video), computed as transformers'
    Qwen2VLVideoProcessor computes them: laid out as its `patchify` lays them out, then normalised with the image
    processor's own mean, std and rescale factor fused as its torchvision backend fuses them ((x - 255 mean) /
    (255 std), float32). Whole-clip tensor operations, the layout done on the 8-bit pixels and the arithmetic in
    place: the image processor takes each frame on its own, twice (its temporal copies), and a 300-frame clip
    then takes seconds (measured: 4.1 s against 0.2 s, README: Videos)."""
    video = torch.from_numpy(np.stack([np.asarray(frame) for frame in frames]))  # (T, H, W, C) uint8
    temporal, patch, merge = image_processor.temporal_patch_size, image_processor.patch_size, image_processor.merge_size
    if pad := -video.shape[0] % temporal:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    frames_fed, height, width, channels = video.shape
    t, h, w = frames_fed // temporal, height // patch, width // patch
    # (t, temporal, h/m, m, patch, w/m, m, patch, channel) -> (t, h/m, w/m, m, m, channel, temporal, patch, patch)
    patches = video.view(t, temporal, h // merge, merge, patch, w // merge, merge, patch, channels)
    patches = patches.permute(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(t * h * w, channels, temporal * patch * patch)
    pixels = patches.float()
    scale = 1 / image_processor.rescale_factor
    mean, std = ([v * scale for v in values] for values in (image_processor.image_mean, image_processor.image_std))
    pixels.sub_(torch.tensor(mean, dtype=torch.float32).view(-1, 1))
    pixels.div_(torch.tensor(std, dtype=torch.float32).view(-1, 1))
    return pixels.view(t * h * w, channels * temporal * patch * patch), [t, h, w]


def group_times(times: list[float], temporal: int) -> list[float]:
    """Seconds of each group of `temporal` frames, whose own times are `times` (the last group padded by repeating
    its last frame): the mean time of its first and last frame, as Qwen3-VL's processor computes the timestamps it
    writes before each group."""
    index = [min(i, len(times) - 1) for i in range(-(-len(times) // temporal) * temporal)]
    return [(times[index[g]] + times[index[g + temporal - 1]]) / 2 for g in range(0, len(index), temporal)]


def video_inputs(videos: list, image_processor, video: VideoArgs, where: str,
                 fps: list | None = None) -> tuple[dict, list]:
    """(`pixel_values_videos`, `video_grid_thw` and `second_per_grid_ts` of a row's videos, in order; each video's
    frame group times (`group_times`)).

    A video is a file (a path or a data: URI: decoded and sampled by ftloop.data.video with `video`'s settings) or
    the list of its frames' paths (all of them, each within the image processor's limits). `fps`, when given,
    holds one frames-per-second value (or None for the default) per video: a file's sampling rate, a frame list's
    own rate."""
    fps = list(fps) if fps else [None] * len(videos)
    if len(fps) != len(videos):
        raise DataError(f"{where}: {len(fps)} fps values for {len(videos)} videos")
    temporal = image_processor.temporal_patch_size
    factor = image_processor.patch_size * image_processor.merge_size
    patches, grids, seconds, times = [], [], [], []
    for source, rate in zip(videos, fps):
        if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0):
            raise DataError(f"{where}: a video's fps must be a positive number, got {rate!r}")
        if isinstance(source, list):  # frames at `rate` per second, all taken
            rate = DEFAULT_FPS if rate is None else rate
            pixels, grid = video_patches([open_rgb(frame, where) for frame in source], image_processor, where)
            seconds.append(temporal / rate)
            times.append(group_times([k / rate for k in range(len(source))], temporal))
        else:
            decoded = decode_video(source, video, factor, temporal, where, rate)
            pixels, grid = decoded_video_patches(decoded.frames, image_processor)
            seconds.append(temporal * decoded.seconds_per_frame)
            times.append(group_times(decoded.times, temporal))
        patches.append(pixels)
        grids.append(grid)
    return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
            "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32)}, times


# ---- the image processor and a row's inputs -------------------------------------------------------------

def pixels_out_of_order(low: str, high: str) -> str:
    """The line for a smallest image area above the largest (each named by its flag or the checkpoint)."""
    return f"{low} is above {high}; give --min-pixels <= --max-pixels"


def load_image_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's image processor; `--min-pixels` / `--max-pixels` (None: the checkpoint's) replace its
    limits on the resized image area. They bound every image and every video frame, and being the processor's
    own settings, they are written with it when the model is exported. The flags on their own are checked
    with the others (ftloop.config.DataArgs.check); here, against the checkpoint's limits and patch grid."""
    from transformers import AutoImageProcessor

    overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = AutoImageProcessor.from_pretrained(path, **overrides)
    low, high = processor.size["shortest_edge"], processor.size["longest_edge"]
    low_name = f"--min-pixels {low}" if min_pixels is not None else f"the checkpoint's min_pixels {low}"
    high_name = f"--max-pixels {high}" if max_pixels is not None else f"the checkpoint's max_pixels {high}"
    if (min_pixels is None) != (max_pixels is None) and low > high:  # both given: checked with the flags
        raise ConfigError(pixels_out_of_order(low_name, high_name))
    smallest = (processor.patch_size * processor.merge_size) ** 2
    if max_pixels is not None and high < smallest:
        raise ConfigError(f"--max-pixels {high} is below {smallest} = (patch_size {processor.patch_size} x "
                          f"merge_size {processor.merge_size})^2, the smallest image the model takes")
    return processor


def row_vision_inputs(row: Row, image_processor, video: VideoArgs,
                      where: str) -> tuple[dict, list[int], list[int], list]:
    """(tensors, image token counts, video token counts, video frame group times) of one normalised row; `video`:
    how its video files are sampled.

    tensors holds `pixel_values` and `image_grid_thw` when the row has images, and `pixel_values_videos`,
    `video_grid_thw` and `second_per_grid_ts` when it has videos; each image or video becomes
    grid t*h*w / merge^2 pad tokens. Unreadable images and processor failures are one DataError line."""
    tensors, image_counts, video_counts, video_times = {}, [], [], []
    merged = image_processor.merge_size ** 2
    if row.images:
        images = [open_rgb(source, where) for source in row.images]
        vision = run_image_processor(image_processor, images, where)
        tensors["pixel_values"], tensors["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
        image_counts = (vision["image_grid_thw"].prod(-1) // merged).tolist()
    if row.videos:
        videos, video_times = video_inputs(row.videos, image_processor, video, where, row.video_fps)
        tensors.update(videos)
        video_counts = (tensors["video_grid_thw"].prod(-1) // merged).tolist()
    return tensors, image_counts, video_counts, video_times
