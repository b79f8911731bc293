"""The data layer: reading rows, opening images, samples, collation and the order ranks see rows in."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from ftloop.data.chat import IGNORE_INDEX
from ftloop.data.dataset import EvalDataset, SFTDataset, StepBatchSampler, eval_batches, make_collate
from ftloop.data.formats import DataError, load_rows
from ftloop.data.images import open_rgb

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


# ------------------------------------------------------------------------------------------------ formats

GOOD = {"image": "a.png", "conversations": turns(("human", "<image>\nWhat?"), ("gpt", "red"))}


@pytest.fixture
def data_dir(tmp_path):
    """A folder for data files, holding the images GOOD and friends refer to (rows are checked on reading)."""
    (tmp_path / "x").mkdir()
    for name in ("a.png", "x/1.png", "2.png"):
        save_rgb(tmp_path / name)
    return tmp_path


def test_load_rows_json_array_and_jsonl_agree(data_dir):
    rows = [GOOD, {"conversations": turns(("human", "hi"), ("gpt", "hello"))}]
    a = load_rows(write_json(data_dir / "d.json", rows))
    b = load_rows(write_jsonl(data_dir / "d.jsonl", rows))
    assert a == b
    assert a[0] == {"messages": [{"role": "user", "content": "<image>\nWhat?"},
                                 {"role": "assistant", "content": "red"}],
                    "images": [os.path.join(str(data_dir), "a.png")], "row": 1}
    assert a[1] == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                    "images": [], "row": 2}


def test_load_rows_jsonl_skips_blank_lines(data_dir):
    path = data_dir / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD) + "\n")
    assert len(load_rows(str(path))) == 2


def test_load_rows_image_list_and_roles(data_dir):
    row = {"image": ["x/1.png", "2.png"], "conversations": turns(
        ("system", "Be brief."), ("human", "<image> and <image>"), ("gpt", "two"), ("user", "more?"),
        ("assistant", "no"))}
    (got,) = load_rows(write_json(data_dir / "d.json", [row]))
    assert [m["role"] for m in got["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in got["messages"]] == ["Be brief.", "<image> and <image>", "two", "more?", "no"]
    assert got["images"] == [os.path.join(str(data_dir), "x/1.png"), os.path.join(str(data_dir), "2.png")]


def test_load_rows_image_folder_and_absolute_paths(tmp_path, data_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_rgb(folder / "a.png")
    absolute = str(data_dir / "2.png")
    rows = [GOOD, {"image": absolute, "conversations": GOOD["conversations"]}]
    got = load_rows(write_json(tmp_path / "d.json", rows), str(folder))
    assert got[0]["images"] == [os.path.join(str(folder), "a.png")]
    assert got[1]["images"] == [absolute]


def test_load_rows_relative_data_path_gives_absolute_images(data_dir, monkeypatch):
    write_json(data_dir / "d.json", [GOOD])
    monkeypatch.chdir(data_dir)
    (got,) = load_rows("d.json")
    assert got["images"] == [os.path.join(str(data_dir), "a.png")]
    assert os.path.isabs(got["images"][0])


@pytest.mark.parametrize("image,needle", [("gone.png", "not found"), ("x", "folder")])
def test_load_rows_checks_image_paths(data_dir, image, needle):
    path = write_json(data_dir / "d.json", [GOOD, GOOD, {"image": image, "conversations": GOOD["conversations"]}])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    one_line_error(excinfo, path, "row 3", needle, os.path.join(str(data_dir), image))


def test_load_rows_bundle(tiny_bundle):
    rows = load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"])
    assert len(rows) == 16
    assert rows[3]["images"] == [] and rows[15]["images"] == []  # the bundle's text-only rows
    assert all(os.path.isfile(p) for r in rows for p in r["images"])
    assert sum(len(r["images"]) for r in rows) == 14


BAD_ROWS = {
    "unknown role": ({"conversations": turns(("human", "hi"), ("robot", "beep"))}, "robot"),
    "missing conversations": ({"image": "a.png"}, "conversations"),
    "empty conversations": ({"conversations": []}, "conversations"),
    "too few images": ({"conversations": turns(("human", "<image><image>"), ("gpt", "x")), "image": "a.png"},
                       "2 `<image>` placeholders but 1 images"),
    "too many images": ({"conversations": turns(("human", "<image>"), ("gpt", "x")), "image": ["a", "b"]},
                        "1 `<image>` placeholders but 2 images"),
    "image without placeholder": ({"conversations": turns(("human", "hi"), ("gpt", "x")), "image": "a.png"},
                                  "0 `<image>`"),
    "no gpt turn": ({"conversations": turns(("human", "hi"), ("human", "again"))}, "no gpt turn"),
    "placeholder in gpt turn": ({"conversations": turns(("human", "hi"), ("gpt", "<image>")), "image": "a"},
                                "human turns"),
    "turn without value": ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "value"),
    "image not a path": ({"conversations": turns(("human", "<image>"), ("gpt", "x")), "image": [3]}, "image"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_load_rows_bad_row_names_file_and_row(data_dir, case, fmt):
    bad, needle = BAD_ROWS[case]
    path = (write_json if fmt == "json" else write_jsonl)(data_dir / f"d.{fmt}", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    one_line_error(excinfo, path, "row 2", needle)


@pytest.mark.parametrize("bad", [[1, 2], "text", 7, None])
def test_load_rows_non_object_row(data_dir, bad):
    path = write_json(data_dir / "d.json", [GOOD, bad])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    one_line_error(excinfo, path, "row 2", "json object")


def test_load_rows_malformed_jsonl_line(data_dir):
    path = data_dir / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"conversations": [\n')
    with pytest.raises(DataError) as excinfo:
        load_rows(str(path))
    one_line_error(excinfo, str(path), "row 3", "not valid json")


def test_load_rows_malformed_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n{oops}\n]")
    with pytest.raises(DataError) as excinfo:
        load_rows(str(path))
    one_line_error(excinfo, str(path), "line 3")


@pytest.mark.parametrize("text", ["", "\n  \n", "[]"])
def test_load_rows_empty_file(tmp_path, text):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError) as excinfo:
        load_rows(str(path))
    one_line_error(excinfo, str(path), "no rows")


def test_load_rows_missing_file(tmp_path):
    path = str(tmp_path / "absent.json")
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    one_line_error(excinfo, path)


def test_load_rows_jsonl_row_number_counts_blank_lines_consistently(data_dir):
    path = data_dir / "d.jsonl"
    bad = {"conversations": turns(("human", "hi"), ("robot", "beep"))}
    path.write_text(json.dumps(GOOD) + "\n\n" + "{oops\n")
    with pytest.raises(DataError) as bad_json:
        load_rows(str(path))
    assert "row 3" in str(bad_json.value)  # a malformed line 3 is reported as row 3 ...
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")  # the bad row is on line 3
    with pytest.raises(DataError) as bad_role:
        load_rows(str(path))
    assert "row 3" in str(bad_role.value)  # ... but an unknown role on line 3 as row 2


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


# ------------------------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def tok(tiny_bundle):
    return AutoTokenizer.from_pretrained(tiny_bundle["model_dir"])


@pytest.fixture(scope="module")
def proc(tiny_bundle):
    return AutoImageProcessor.from_pretrained(tiny_bundle["model_dir"])


@pytest.fixture(scope="module")
def ids(tok):
    names = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>", "<|video_pad|>"]
    return dict(zip(names, tok.convert_tokens_to_ids(names)))


@pytest.fixture(scope="module")
def bundle_rows(tiny_bundle):
    return load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"])


def image_row(paths, reply="red"):
    placeholders = "".join("<image>" for _ in paths)
    return {"messages": [{"role": "user", "content": placeholders + "\nWhat color?"},
                         {"role": "assistant", "content": reply}], "images": [str(p) for p in paths]}


def text_row(reply="nine"):
    return {"messages": [{"role": "user", "content": "What is 4 plus 5?"},
                         {"role": "assistant", "content": reply}], "images": []}


def test_dataset_image_row(tok, proc, ids, bundle_rows):
    ds = SFTDataset(bundle_rows, tok, proc, 4096, SYSTEM)
    assert len(ds) == 16
    s = ds[0]
    assert set(s) == {"pixel_values", "image_grid_thw", "input_ids", "labels"}
    grid = s["image_grid_thw"]
    assert grid.shape == (1, 3)
    n_pad = int((s["input_ids"] == ids["<|image_pad|>"]).sum())
    assert n_pad == int(grid.prod()) // proc.merge_size**2 > 0
    assert s["pixel_values"].shape[0] == int(grid.prod())
    assert s["input_ids"].dtype == torch.long and s["labels"].shape == s["input_ids"].shape
    assert (s["labels"][s["labels"] != IGNORE_INDEX] != ids["<|image_pad|>"]).all()


def test_dataset_multi_image_counts(tmp_path, tok, proc, ids):
    # different aspect ratios give different grids; the pad runs must follow the images in order
    paths = [save_rgb(tmp_path / "wide.png", (112, 56)), save_rgb(tmp_path / "sq.png", (56, 56)),
             save_rgb(tmp_path / "tall.png", (56, 168))]
    s = SFTDataset([image_row(paths)], tok, proc, 4096, SYSTEM)[0]
    grid = s["image_grid_thw"]
    counts = (grid.prod(-1) // proc.merge_size**2).tolist()
    assert len(set(counts)) > 1
    assert s["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    input_ids = s["input_ids"].tolist()
    runs, i = [], 0
    while i < len(input_ids):
        if input_ids[i] == ids["<|vision_start|>"]:
            j = input_ids.index(ids["<|vision_end|>"], i)
            runs.append(j - i - 1)
            i = j
        i += 1
    assert runs == counts


def test_dataset_text_row(tok, proc, bundle_rows):
    ds = SFTDataset(bundle_rows, tok, proc, 4096, SYSTEM)
    s = ds[3]
    assert set(s) == {"input_ids", "labels"}
    assert (s["labels"] != IGNORE_INDEX).any()


def test_dataset_truncates_text_after_last_image(tmp_path, tok, proc, ids):
    path = save_rgb(tmp_path / "a.png")
    row = image_row([path], reply="the quick brown fox jumps over the lazy dog " * 8)
    full = SFTDataset([row], tok, proc, 4096, SYSTEM)[0]
    n = len(full["input_ids"])
    vision_end = full["input_ids"].tolist().index(ids["<|vision_end|>"])
    for limit in (n - 1, vision_end + 5, vision_end + 1):  # vision_end + 1: the image just fits
        s = SFTDataset([row], tok, proc, limit, SYSTEM)[0]
        assert len(s["input_ids"]) == len(s["labels"]) == limit
        assert torch.equal(s["input_ids"], full["input_ids"][:limit])
        assert torch.equal(s["labels"], full["labels"][:limit])
        assert torch.equal(s["pixel_values"], full["pixel_values"])
    assert len(SFTDataset([row], tok, proc, n, SYSTEM)[0]["input_ids"]) == n  # no cut when it fits exactly


def test_dataset_truncates_text_row(tok, proc):
    row = text_row("one two three four five six seven eight nine ten " * 5)
    full = SFTDataset([row], tok, proc, 4096, SYSTEM)[0]
    s = SFTDataset([row], tok, proc, 20, SYSTEM)[0]
    assert len(full["input_ids"]) > 20
    assert torch.equal(s["input_ids"], full["input_ids"][:20])
    assert torch.equal(s["labels"], full["labels"][:20])


def test_dataset_refuses_to_cut_an_image(tmp_path, tok, proc, ids):
    path = save_rgb(tmp_path / "a.png")
    rows = [text_row(), image_row([path], reply="long " * 30)]
    full = SFTDataset(rows, tok, proc, 4096, SYSTEM, source="train.json")[1]
    vision_end = full["input_ids"].tolist().index(ids["<|vision_end|>"])
    for limit in (vision_end, vision_end - 2, 5):
        with pytest.raises(DataError) as excinfo:
            SFTDataset(rows, tok, proc, limit, SYSTEM, source="train.json")[1]
        one_line_error(excinfo, "train.json: row 2", str(limit))


def test_dataset_bad_image_names_row(tmp_path, tok, proc):
    rows = [text_row(), image_row([tmp_path / "gone.png"])]
    with pytest.raises(DataError) as excinfo:
        SFTDataset(rows, tok, proc, 4096, SYSTEM, source="train.json")[1]
    one_line_error(excinfo, "train.json: row 2", str(tmp_path / "gone.png"))


# ------------------------------------------------------------------------------------------------ collate


def test_collate_mixed_batch(tok, proc, ids, bundle_rows):
    ds = SFTDataset(bundle_rows, tok, proc, 4096, SYSTEM)
    samples = [ds[0], ds[3], ds[1]]  # image, text-only, image
    pad = ids["<|endoftext|>"]
    batch = make_collate(pad, ids["<|image_pad|>"])(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1
    length = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, length)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][i, :n], s["input_ids"])
        assert torch.equal(batch["labels"][i, :n], s["labels"])
        assert (batch["input_ids"][i, n:] == pad).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i, :n].eq(1).all() and batch["attention_mask"][i, n:].eq(0).all()
    is_image = batch["input_ids"] == ids["<|image_pad|>"]
    assert torch.equal(batch["mm_token_type_ids"].bool(), is_image)
    assert set(batch["mm_token_type_ids"].unique().tolist()) == {0, 1}
    assert int(is_image[1].sum()) == 0
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"],
                       torch.cat([samples[0]["image_grid_thw"], samples[2]["image_grid_thw"]]))
    assert int(is_image.sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // proc.merge_size**2
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long


def test_collate_text_only_batch(tok, proc, ids, bundle_rows):
    ds = SFTDataset(bundle_rows, tok, proc, 4096, SYSTEM)
    batch = make_collate(ids["<|endoftext|>"], ids["<|image_pad|>"], ids["<|video_pad|>"])([ds[3], ds[15]])
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert not batch["mm_token_type_ids"].any()


def test_collate_synthetic_pad_and_video():
    samples = [{"input_ids": torch.tensor([5, 7, 7, 9]), "labels": torch.tensor([-100, -100, -100, 9])},
               {"input_ids": torch.tensor([8, 6]), "labels": torch.tensor([-100, 6])}]
    batch = make_collate(0, 7, 8)(samples)
    assert batch["input_ids"].tolist() == [[5, 7, 7, 9], [8, 6, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9], [-100, 6, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [2, 0, 0, 0]]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids"}


# ------------------------------------------------------------------------------------------------ samplers


def step_rows(num_rows, world, micro, accum, seed, epoch):
    """Rows each optimizer step covers, gathered over all ranks: list of sets."""
    per_rank = []
    for rank in range(world):
        sampler = StepBatchSampler(num_rows, world, rank, micro, accum, seed)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len(b) == micro for b in batches)
        per_rank.append(batches)
    steps = len(per_rank[0]) // accum
    assert all(len(b) == steps * accum for b in per_rank)
    return [set().union(*(set(b) for r in per_rank for b in r[s * accum:(s + 1) * accum])) for s in range(steps)]


@pytest.mark.parametrize("num_rows", [48, 50, 7])
def test_step_sampler_same_rows_per_step_at_any_world_size(num_rows):
    configs = [(1, 1, 4), (2, 1, 2), (4, 1, 1), (1, 2, 2), (2, 2, 1), (1, 4, 1)]  # world, micro, accum: 4 rows
    for epoch in (0, 3):
        reference = step_rows(num_rows, *configs[0], seed=11, epoch=epoch)
        assert len(reference) == num_rows // 4
        assert all(len(rows) == 4 for rows in reference)
        for world, micro, accum in configs[1:]:
            assert step_rows(num_rows, world, micro, accum, seed=11, epoch=epoch) == reference


def test_step_sampler_rows_at_most_once_per_epoch():
    for world, micro, accum in [(1, 3, 2), (2, 2, 3), (4, 1, 1), (3, 2, 2)]:
        seen = []
        for rank in range(world):
            seen += [i for b in StepBatchSampler(50, world, rank, micro, accum, seed=1) for i in b]
        global_batch = world * micro * accum
        assert len(seen) == len(set(seen)) == (50 // global_batch) * global_batch
        assert set(seen) <= set(range(50))


def test_step_sampler_ranks_disjoint_within_step():
    samplers = [StepBatchSampler(40, 2, r, 2, 2, seed=0) for r in range(2)]
    a, b = (list(s) for s in samplers)
    assert all(not set(x) & set(y) for x, y in zip(a, b))


def test_step_sampler_epoch_and_seed():
    sampler = StepBatchSampler(64, 2, 1, 2, 2, seed=5)
    first = list(sampler)
    assert list(sampler) == first  # deterministic for a given (seed, epoch)
    assert list(StepBatchSampler(64, 2, 1, 2, 2, seed=5)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(StepBatchSampler(64, 2, 1, 2, 2, seed=6)) != first
    # the order is a shuffle, not the identity
    assert [i for b in StepBatchSampler(64, 1, 0, 64, 1, seed=5) for i in b] != list(range(64))


@pytest.mark.parametrize("num_rows,world,micro,accum,expected",
                         [(50, 1, 1, 4, 48), (50, 2, 2, 1, 12), (50, 4, 1, 1, 12), (50, 3, 2, 2, 8),
                          (11, 4, 1, 3, 0), (12, 1, 3, 4, 4)])
def test_step_sampler_len(num_rows, world, micro, accum, expected):
    sampler = StepBatchSampler(num_rows, world, 0, micro, accum, seed=0)
    assert len(sampler) == expected
    assert len(list(sampler)) == expected
    assert sampler.steps_per_epoch * accum == expected


@pytest.mark.parametrize("num_rows,world,batch", [(8, 1, 3), (8, 3, 2), (7, 4, 2), (2, 4, 1), (10, 2, 5),
                                                  (13, 4, 3)])
def test_eval_batches(num_rows, world, batch):
    per_rank = [eval_batches(num_rows, world, rank, batch) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of forwards
    assert all(len(x) == batch for b in per_rank for x in b)
    flat = [i for b in per_rank for x in b for i in x]
    real = [i for i in flat if i >= 0]
    assert sorted(real) == list(range(num_rows))
    assert all(i == -1 for i in flat if i < 0)
    # no more batches than needed: the rank with most rows fills its last batch at least partly
    assert len(per_rank[0]) == -(-(-(-num_rows // world)) // batch)


def test_eval_dataset_filler(tok, proc, bundle_rows):
    inner = SFTDataset(bundle_rows[:4], tok, proc, 4096, SYSTEM)
    ds = EvalDataset(inner)
    assert len(ds) == 4
    real = ds[2]
    assert torch.equal(real["labels"], inner[2]["labels"]) and (real["labels"] != IGNORE_INDEX).any()
    filler = ds[-1]
    assert (filler["labels"] == IGNORE_INDEX).all()
    assert torch.equal(filler["input_ids"], inner[0]["input_ids"])
    assert filler["labels"].shape == filler["input_ids"].shape
    assert "pixel_values" in filler  # keeps row 0's images so the vision tower runs on every rank
    # collating real rows with fillers changes nothing about the real rows' supervision
    batch = make_collate(tok.pad_token_id, tok.convert_tokens_to_ids("<|image_pad|>"))([ds[i] for i in [1, -1]])
    assert (batch["labels"][1] == IGNORE_INDEX).all() and (batch["labels"][0] != IGNORE_INDEX).any()


def test_train_loader_integration(tiny_bundle, tok, proc):
    """DataLoader over the sampler and collate, as build_train_loader wires them (no workers)."""
    from torch.utils.data import DataLoader

    rows = load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"])
    ds = SFTDataset(rows, tok, proc, 4096, SYSTEM)
    seen = []
    for rank in range(2):
        sampler = StepBatchSampler(len(rows), 2, rank, 2, 2, seed=0)
        loader = DataLoader(ds, batch_sampler=sampler,
                            collate_fn=make_collate(tok.pad_token_id, tok.convert_tokens_to_ids("<|image_pad|>")))
        batches = list(loader)
        assert len(batches) == len(sampler) == 4
        for b in batches:
            assert b["input_ids"].shape[0] == 2
            if "pixel_values" in b:
                assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
        seen += [ids for ids in sampler]
    assert sorted(i for b in seen for i in b) == list(range(16))
