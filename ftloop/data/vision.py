"""A row's vision inputs as the model takes them, and the image processor with the run's pixel limits.

Every row is encoded through `row_vision_inputs` (ftloop.data.encode), in training and in the checks alike.
"""

from __future__ import annotations

from ftloop.data.images import open_rgb
from ftloop.data.video import run_image_processor, video_inputs
from ftloop.errors import ConfigError


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


def row_vision_inputs(row: dict, image_processor, where: str) -> tuple[dict, list[int], list[int], list]:
    """(tensors, image token counts, video token counts, video frame group times) of one normalised row.

    tensors holds `pixel_values` and `image_grid_thw` when the row has images, and `pixel_values_videos`,
    `video_grid_thw` and `second_per_grid_ts` when it has videos; each image or video becomes
    grid t*h*w / merge^2 pad tokens. Unreadable images and processor failures are one DataError line."""
    tensors, image_counts, video_counts, video_times = {}, [], [], []
    merged = image_processor.merge_size ** 2
    if row["images"]:
        images = [open_rgb(source, where) for source in row["images"]]
        vision = run_image_processor(image_processor, images, where)
        tensors["pixel_values"], tensors["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
        image_counts = (vision["image_grid_thw"].prod(-1) // merged).tolist()
    if row.get("videos"):
        videos, video_times = video_inputs(row["videos"], image_processor, where, row.get("video_fps"))
        tensors.update(videos)
        video_counts = (tensors["video_grid_thw"].prod(-1) // merged).tolist()
    return tensors, image_counts, video_counts, video_times
