"""Opening user images: any mode pillow reads becomes RGB, with EXIF orientation applied."""

from __future__ import annotations

from PIL import Image, ImageOps, UnidentifiedImageError

from ftloop.data.formats import DataError


def open_rgb(path: str, where: str) -> Image.Image:
    """The image at `path` as RGB; transparent pixels are composed onto white. `where` names the row."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise DataError(f"{where}: image not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{where}: image path is a folder: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{where}: cannot read image {path} ({err})") from None
    if image.width == 0 or image.height == 0:
        raise DataError(f"{where}: image has zero size: {path}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16-bit (any byte order) and float
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
