"""Opening user images: any mode pillow reads becomes RGB, with EXIF orientation applied.

An image is a path, or an `ImageRef` into a Hugging Face dataset whose bytes are read only here.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from ftloop.data.image_ref import ImageRef
from ftloop.errors import DataError


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
    `where` names the row."""
    try:
        with _open(source, where) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
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
    if image.width == 0 or image.height == 0:
        raise DataError(f"{where}: image has zero size: {source}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16-bit (any byte order) and float
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
