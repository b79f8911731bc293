"""Small helpers shared by the data-layer tests."""

import json

from PIL import Image

SYSTEM = "You are a helpful assistant."


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

