"""Opening images: every pillow mode becomes RGB (32-bit and float ones by their range); bad files, and whatever
pillow raises, give errors naming the row and the path."""

import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from datautil import SYSTEM, one_line_error, save_rgb, turns, write_json
from ftloop.data.check import Measuring, checked_rows
from ftloop.data.layouts import load_rows
from ftloop.distributed import World
from ftloop.errors import DataError, DataErrors
from ftloop.data.media import open_rgb

# ------------------------------------------------------------------------------------------------ images


def _check_rgb(path, size):
    image = open_rgb(str(path), "d.json: row 1")
    assert image.mode == "RGB"
    assert image.size == size
    return np.asarray(image)


W, H = 12, 10


def test_open_rgb_modes(tmp_path):
    base = Image.new("RGB", (W, H), (10, 200, 30))
    base.save(tmp_path / "rgb.png")
    assert (_check_rgb(tmp_path / "rgb.png", (W, H)) == (10, 200, 30)).all()

    Image.new("L", (W, H), 100).save(tmp_path / "l.png")
    assert (_check_rgb(tmp_path / "l.png", (W, H)) == 100).all()

    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    px = _check_rgb(tmp_path / "cmyk.jpg", (W, H)).astype(int)
    assert (abs(px - (255, 0, 0)) <= 8).all()

    Image.new("1", (W, H), 1).save(tmp_path / "one.png")
    assert (_check_rgb(tmp_path / "one.png", (W, H)) == 255).all()


def test_open_rgb_palette(tmp_path):
    p = Image.new("P", (W, H), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png")
    px = _check_rgb(tmp_path / "p.png", (W, H))
    assert tuple(px[0, 0]) == (0, 0, 0) and tuple(px[1, 1]) == (10, 200, 30)

    p.save(tmp_path / "pt.png", transparency=0)
    assert Image.open(tmp_path / "pt.png").info.get("transparency") == 0
    px = _check_rgb(tmp_path / "pt.png", (W, H))
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[1, 1]) == (10, 200, 30)


def test_open_rgb_alpha_onto_white(tmp_path):
    rgba = Image.new("RGBA", (W, H), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    px = _check_rgb(tmp_path / "rgba.png", (W, H)).astype(int)
    assert tuple(px[0, 0]) == (255, 255, 255)  # transparent black -> white, not black
    assert (abs(px[0, 1] - 127) <= 1).all()  # half-transparent black -> mid grey
    assert tuple(px[5, 5]) == (10, 20, 30)

    la = Image.new("LA", (W, H), (100, 255))
    la.putpixel((0, 0), (0, 0))
    la.save(tmp_path / "la.png")
    px = _check_rgb(tmp_path / "la.png", (W, H))
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[5, 5]) == (100, 100, 100)


def test_open_rgb_16_bit(tmp_path):
    values = (np.arange(W * H).reshape(H, W) * 500).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    px = _check_rgb(tmp_path / "i16.png", (W, H))
    # scaled to 8 bits (value / 256), not clipped at 255
    assert (px[..., 0] == values // 256).all() and (px[..., 0] == px[..., 2]).all()
    assert px.max() > 200 and px.min() == 0


def test_open_rgb_16_bit_big_endian(tmp_path):
    values = (np.arange(W * H).reshape(H, W) * 500).astype(">u2")
    Image.frombytes("I;16B", (W, H), values.tobytes()).save(tmp_path / "i16b.tif")
    assert Image.open(tmp_path / "i16b.tif").mode == "I;16B"
    px = _check_rgb(tmp_path / "i16b.tif", (W, H))
    assert (px[..., 0] == values.astype(np.uint16) // 256).all()


def test_open_rgb_exif_orientation(tmp_path):
    image = Image.new("RGB", (30, 20), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 6, 6))  # a blue block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert Image.open(tmp_path / "rot.jpg").size == (30, 20)
    px = _check_rgb(tmp_path / "rot.jpg", (20, 30)).astype(int)
    assert px[1, -2, 2] > 150 and px[1, -2, 0] < 60  # blue block now top-right
    assert px[1, 1, 0] > 150 and px[1, 1, 2] < 60


def test_open_rgb_errors_name_the_path(tmp_path):
    noise = np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    for ext in ("png", "jpg"):
        data = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"trunc.{ext}").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name in ("missing.png", "folder.png", "trunc.png", "trunc.jpg", "junk.png", "empty.png"):
        path = str(tmp_path / name)
        with pytest.raises(DataError) as excinfo:
            open_rgb(path, "d.json: row 4")
        one_line_error(excinfo, path, "d.json: row 4")


def test_an_image_past_pillows_bomb_limit_is_a_bad_row(tmp_path, monkeypatch):
    """A giant scan (here: pillow's limit lowered to 1000 pixels) is one line naming the row, not a
    DecompressionBombError traceback on one rank and a dead peer on the others."""
    path = tmp_path / "scan.png"
    Image.new("RGB", (56, 56)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError) as excinfo:
        open_rgb(str(path), "train.json: row 4")
    one_line_error(excinfo, "train.json: row 4: image", "more than twice pillow's limit of 1000 pixels")


# ------------------------------------------------------------------------------------------------ 32-bit and float


def _stretched(values) -> np.ndarray:
    """What an image of `values` becomes: min -> 0, max -> 255, linear between."""
    values = values.astype(np.float64)
    return np.rint((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)


@pytest.mark.parametrize("values", [
    np.linspace(0.0, 1.0, W * H, dtype=np.float32).reshape(H, W),  # a float image in 0..1: was all black
    np.linspace(-3.5, 2.0, W * H, dtype=np.float32).reshape(H, W)[::-1].copy(),  # negative values too
    (np.arange(W * H).reshape(H, W) * 9).astype(np.int32),  # 0..1071: was 0..4, black
    (np.arange(W * H).reshape(H, W) * 10_000_000 - 50_000).astype(np.int32),  # past 16 bits: was white
    np.linspace(-3e38, 3e38, W * H, dtype=np.float32).reshape(H, W),  # a range past float32's largest value
], ids=["float-0-1", "float-negative", "int32-small", "int32-large", "float-huge"])
def test_open_rgb_32_bit_and_float_by_their_range(tmp_path, values):
    Image.fromarray(values).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == ("F" if values.dtype == np.float32 else "I")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way
        px = _check_rgb(tmp_path / "deep.tif", (W, H))
    assert (px[..., 0] == _stretched(values)).all() and (px[..., 0] == px[..., 2]).all()
    assert px.min() == 0 and px.max() == 255


def test_open_rgb_constant_deep_image_is_black(tmp_path):
    """No range to scale by: black, without a division by zero."""
    for mode, value in (("F", 0.5), ("F", -7.0), ("F", 3e38), ("I", 123456), ("I", -5), ("I", 0)):
        Image.new(mode, (W, H), value).save(tmp_path / "flat.tif")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert (_check_rgb(tmp_path / "flat.tif", (W, H)) == 0).all(), (mode, value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_image_with_nan_or_inf_is_a_bad_row(tmp_path, bad):
    values = np.linspace(0.0, 1.0, W * H, dtype=np.float32).reshape(H, W)
    values[3, 4] = bad
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(DataError) as excinfo:
        open_rgb(str(tmp_path / "nan.tif"), "d.json: row 4")
    message = one_line_error(excinfo)
    assert message.startswith(f"d.json: row 4: image {tmp_path / 'nan.tif'} (F mode) has NaN or infinite pixel "
                              "values; replace them"), message


# ------------------------------------------------------------------------------------------------ pillow's errors


def _png_with_huge_text(path):
    """A small PNG whose zTXt chunk inflates past pillow's PngImagePlugin.MAX_TEXT_CHUNK (1 MiB): pillow raises
    ValueError("Decompressed data too large ..."), not an OSError."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
    Image.new("RGB", (W, H), (10, 20, 30)).save(path, pnginfo=info)
    return str(path)


def test_any_pillow_error_is_the_rows_line(tmp_path, monkeypatch):
    path = _png_with_huge_text(tmp_path / "text.png")
    with pytest.raises(DataError) as excinfo:
        open_rgb(path, "d.json: row 4")
    assert one_line_error(excinfo).startswith(f"d.json: row 4: cannot read image {path} (ValueError: Decompressed "
                                              "data too large"), excinfo.value

    save_rgb(tmp_path / "ok.png")

    def broken(image, **kwargs):
        raise KeyError("a broken EXIF tag")  # what pillow raises is not ours to list: any Exception

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with pytest.raises(DataError) as excinfo:
        open_rgb(str(tmp_path / "ok.png"), "d.json: row 5")
    assert one_line_error(excinfo).startswith(f"d.json: row 5: cannot read image {tmp_path / 'ok.png'} (KeyError: "), \
        excinfo.value


def test_unreadable_images_are_skipped_with_skip_bad_rows(tmp_path, tokenizer, image_processor):
    """Through the check before training: refused with the rows' lines, skipped with --skip-bad-rows."""
    nan = np.zeros((H, W), dtype=np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    images = [save_rgb(tmp_path / "ok.png"), _png_with_huge_text(tmp_path / "text.png"), str(tmp_path / "nan.tif")]
    data = write_json(tmp_path / "train.json", [
        {"conversations": turns(("human", "<image>\nWhat color?"), ("gpt", "red")), "image": image} for image in images])
    errors = []
    rows = load_rows(data, "", errors)
    measuring = Measuring(tokenizer, image_processor, SYSTEM)
    with pytest.raises(DataErrors) as refused:
        checked_rows(data, rows, errors, measuring, False, World.single())
    assert [line.split(" (")[0] for line in refused.value.lines[:-1]] == [
        f"{data}: row 2: cannot read image {images[1]}", f"{data}: row 3: image {images[2]}"]
    kept = checked_rows(data, rows, errors, measuring, True, World.single())
    assert kept.skipped_bad == 2 and [r.number for r in kept.rows] == [1]
