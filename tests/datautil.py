"""Small helpers shared by the data-layer tests."""

import json

import numpy as np
from PIL import Image

from ftloop.data.encode import ChatFormat
from ftloop.data.rows import Row

SYSTEM = ChatFormat("You are a helpful assistant.")  # Qwen2.5-VL's format


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def save_rgb(path, size=(56, 56), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message



def noise_frames(folder, count: int = 8) -> list[str]:
    """`count` PNGs of seeded noise, 56x56 but the last 56x84 (another patch grid), for image and video rows."""
    frames = []
    for k in range(count):
        pixels = np.random.default_rng(k).integers(0, 256, (56, 84 if k == count - 1 else 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
        frames.append(str(folder / f"{k}.png"))
    return frames


def vl_row(images=(), videos=(), reply="a red circle", turns: int = 1) -> Row:
    """A row of the normal form: the images, "Look.", the videos, a question; then `turns - 1` more text turns."""
    content = "".join("<image>" for _ in images) + "Look. " + "".join("<video>" for _ in videos) + "\nWhat?"
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
    for t in range(1, turns):
        messages += [{"role": "user", "content": f"And then {t}?"}, {"role": "assistant", "content": f"then {t}"}]
    return Row(messages, list(images), [list(v) for v in videos])
