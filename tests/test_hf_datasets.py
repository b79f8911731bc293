"""Hugging Face datasets as --train-data / --eval-data: save_to_disk folders, .parquet and .arrow files with
a `datasets.Image` column, images read lazily through references, DatasetDict splits, hub names, the
preflight check, --eval-ratio, and a short training run."""

import dataclasses
import json
import os
import pickle

import datasets
import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

from datautil import one_line_error, write_json
from ftloop.config import parse_args
from ftloop.data.layouts import load_rows
from ftloop.data.rows import Row
from ftloop.errors import ConfigError, DataError
from ftloop.data.sources import ImageRef
from ftloop.data.media import open_rgb
from ftloop.data.loaders import hold_out, read_sources
from test_cli import check_flags
from launch import check, python_m, train_flags
from test_formats_messages import LLAVA, MESSAGES, TRL

COLORS = {"a.png": (200, 30, 30), "b.png": (30, 200, 30), "c.png": (30, 30, 200)}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """from_parquet converts to Arrow in the datasets cache: keep it in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def data_dir(tmp_path):
    for name, color in COLORS.items():
        PILImage.new("RGB", (40, 32), color).save(tmp_path / name)
    return tmp_path


def pil(name):
    return PILImage.new("RGB", (40, 32), COLORS[name])


def llava_dataset(rows=LLAVA) -> Dataset:
    """LLaVA rows with the images themselves (bytes) in a list-of-Image column."""
    images = [[pil(p) for p in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", []))]
              for r in rows]
    return Dataset.from_dict({"conversations": [r["conversations"] for r in rows], "image": images}) \
        .cast_column("image", List(Image()))


def trl_dataset(rows=TRL) -> Dataset:
    """TRL layout: bare image parts, images in a list-of-Image column; every content a list of parts (Arrow
    wants one type per column)."""
    def parts(content):
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    messages = [[dict(m, content=parts(m["content"])) for m in r["messages"]] for r in rows]
    return Dataset.from_dict({"messages": messages,
                              "images": [[pil(p) for p in r["images"]] for r in rows]}) \
        .cast_column("images", List(Image()))


def single_image_dataset(images, prompts) -> Dataset:
    """One `image` column (not a list) holding images or None, LLaVA layout."""
    return Dataset.from_dict({"image": images, "conversations": [
        [{"from": "human", "value": p}, {"from": "gpt", "value": "x"}] for p in prompts]}).cast_column("image", Image())


def pixels(source):
    return np.asarray(open_rgb(source, "test"))


def without_images(rows):
    return [dataclasses.replace(r, images=[]) for r in rows]


def test_json_and_dataset_forms_give_the_same_rows(data_dir):
    """LLaVA json, messages json, and the same rows as a save_to_disk folder (LLaVA), a parquet file
    (messages, TRL style) and an arrow file: identical rows except where the images come from."""
    llava_dataset().save_to_disk(str(data_dir / "llava_ds"))
    trl_dataset().to_parquet(str(data_dir / "trl.parquet"))
    arrow = [f for f in os.listdir(data_dir / "llava_ds") if f.endswith(".arrow")][0]
    forms = {
        "llava json": load_rows(write_json(data_dir / "llava.json", LLAVA)),
        "messages json": load_rows(write_json(data_dir / "messages.json", MESSAGES)),
        "save_to_disk": load_rows(str(data_dir / "llava_ds")),
        "parquet": load_rows(str(data_dir / "trl.parquet")),
        "arrow": load_rows(str(data_dir / "llava_ds" / arrow)),
    }
    reference = forms["llava json"]
    for name, rows in forms.items():
        assert without_images(rows) == without_images(reference), name
        for got, want in zip(rows, reference):
            assert len(got.images) == len(want.images)
            for a, b in zip(got.images, want.images):
                assert (pixels(a) == pixels(b)).all(), name
    assert all(isinstance(i, str) for r in forms["messages json"] for i in r.images)
    assert all(isinstance(i, ImageRef) for name in ("save_to_disk", "parquet", "arrow")
               for r in forms[name] for i in r.images)


def test_images_are_lazy_references_that_pickle_by_file(data_dir):
    big = [PILImage.fromarray(np.random.default_rng(i).integers(0, 255, (128, 128, 3), dtype=np.uint8))
           for i in range(8)]
    ds = single_image_dataset(big, ["<image>what?"] * 8)
    ds.save_to_disk(str(data_dir / "ds"))
    rows = load_rows(str(data_dir / "ds"))
    refs = [r.images[0] for r in rows]
    assert all(type(ref) is ImageRef for ref in refs)
    assert {"bytes", "data"}.isdisjoint(dir(refs[0]))  # a row holds where an image is, not the image
    assert isinstance(refs[0].source.dataset.data, datasets.table.MemoryMappedTable)
    stored = sum(len(cell["bytes"]) for cell in ds.cast_column("image", Image(decode=False))["image"])
    assert stored > 8 * 128 * 128  # random pixels do not compress
    pickled = pickle.dumps(rows)
    assert len(pickled) < stored / 10  # the dataset pickles as its file names, not its bytes
    again = pickle.loads(pickled)
    for ref, image in zip((r.images[0] for r in again), big):
        assert (pixels(ref) == np.asarray(image)).all()


def test_paths_inside_a_dataset_resolve_against_the_image_folder(data_dir, tmp_path, monkeypatch):
    # Image column holding paths only (no bytes), and a plain string column: both are paths.
    path_only = single_image_dataset(["a.png", None], ["<image>what?", "hi"])
    assert path_only.cast_column("image", Image(decode=False))[0]["image"]["bytes"] is None
    monkeypatch.chdir(data_dir)  # to_parquet measures the files behind relative paths
    path_only.to_parquet(str(tmp_path / "paths.parquet"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # reading must not depend on where we are
    strings = Dataset.from_dict({"image": ["b.png"], "conversations": [LLAVA[0]["conversations"]]})
    strings.save_to_disk(str(tmp_path / "strings"))
    got = load_rows(str(tmp_path / "paths.parquet"), str(data_dir))
    assert got[0].images == [str(data_dir / "a.png")] and got[1].images == []
    assert load_rows(str(tmp_path / "strings"), str(data_dir))[0].images == [str(data_dir / "b.png")]
    with pytest.raises(DataError) as excinfo:
        load_rows(str(tmp_path / "paths.parquet"), str(tmp_path / "nowhere"))
    one_line_error(excinfo, str(tmp_path / "paths.parquet"), "row 1", "image not found")


def test_bad_rows_and_bad_images_in_a_dataset_are_one_line(data_dir):
    rows = [LLAVA[0], {"image": [], "conversations": LLAVA[0]["conversations"]}]  # row 2: placeholder, no image
    llava_dataset(rows).save_to_disk(str(data_dir / "ds"))
    errors = []
    assert len(load_rows(str(data_dir / "ds"), errors=errors)) == 1
    assert errors == [f"{data_dir / 'ds'}: row 2: 1 `<image>` placeholders but 0 images"]
    junk = single_image_dataset([{"bytes": b"not an image", "path": None}], ["<image>?"])
    junk.to_parquet(str(data_dir / "junk.parquet"))
    (row,) = load_rows(str(data_dir / "junk.parquet"))
    with pytest.raises(DataError) as excinfo:
        open_rgb(row.images[0], "junk.parquet: row 1")
    one_line_error(excinfo, "junk.parquet: row 1", "cannot read image `image` of row 1", "not an image format")
    nested = Features({"messages": List({"role": Value("string"), "content": List(
        {"type": Value("string"), "text": Value("string"), "image": Image()})})})
    part = {"type": "image", "text": None, "image": pil("a.png")}
    Dataset.from_dict({"messages": [[{"role": "user", "content": [part]}]]}, features=nested).save_to_disk(
        str(data_dir / "nested"))
    with pytest.raises(DataError) as excinfo:  # python formatting would decode every image: refused
        load_rows(str(data_dir / "nested"))
    one_line_error(excinfo, "column `messages` holds images inside it")
    no_layout = Dataset.from_dict({"text": ["hi"]})
    no_layout.save_to_disk(str(data_dir / "plain"))
    with pytest.raises(DataError) as excinfo:
        load_rows(str(data_dir / "plain"))
    one_line_error(excinfo, str(data_dir / "plain"), "neither a `conversations`", "its columns: text")


def test_dataset_dict_splits(data_dir):
    DatasetDict({"train": llava_dataset(), "validation": llava_dataset(LLAVA[:1])}).save_to_disk(
        str(data_dir / "dd"))
    assert len(load_rows(str(data_dir / "dd"), split="train")) == 3
    assert len(load_rows(str(data_dir / "dd"), split="eval")) == 1
    DatasetDict({"train": llava_dataset()}).save_to_disk(str(data_dir / "only_train"))
    with pytest.raises(DataError) as excinfo:
        load_rows(str(data_dir / "only_train"), split="eval")
    one_line_error(excinfo, "`validation` or `test` split", "it has train", "--eval-ratio")


def test_hub_names_and_missing_sources(data_dir, monkeypatch, tiny_bundle):
    def offline(name, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as excinfo:
        load_rows("someorg/somedata")
    one_line_error(excinfo, "someorg/somedata: cannot load as a Hugging Face dataset", "ConnectionError")
    with pytest.raises(DataError) as excinfo:
        load_rows(str(data_dir / "absent.parquet"))
    one_line_error(excinfo, "absent.parquet: cannot read")
    llava_dataset().save_to_disk(str(data_dir / "ds"))

    def config(data):
        return parse_args(train_flags(tiny_bundle, data_dir / "out", "--train-data", data))

    check_flags(config(str(data_dir / "ds")))  # a folder
    check_flags(config("someorg/somedata"))  # a hub name: checked when loaded
    check_flags(config("somedata"))
    for missing in ("/nonexistent/ds", "./nonexistent", "a/b/c", "train.json"):
        with pytest.raises(ConfigError, match=f"--train-data {missing}: file not found"):
            check_flags(config(missing))


def test_eval_ratio_split_rule():
    rows = [Row([], number=i) for i in range(1, 101)]
    train, held = hold_out(rows, 0.25, seed=3)
    assert len(held) == 25 and len(train) == 75
    assert sorted(r.number for r in train + held) == list(range(1, 101))
    assert train == sorted(train, key=lambda r: r.number) and held == sorted(held, key=lambda r: r.number)
    assert hold_out(rows, 0.25, seed=3) == (train, held)  # every rank, every run
    assert hold_out(rows, 0.25, seed=4)[1] != held
    assert len(hold_out(rows, 0.001, seed=3)[1]) == 1  # at least one row
    assert len(hold_out(rows, 0.005, seed=3)[1]) == 1 and len(hold_out(rows, 0.015, seed=3)[1]) == 2
    assert hold_out(rows[:1], 0.5, seed=3) == ([], rows[:1])


def test_eval_ratio_reads_and_validates(tiny_bundle, tmp_path):
    def config(*flags):
        return parse_args(train_flags(tiny_bundle, tmp_path / "out", *flags))

    cfg = config("--eval-ratio", "0.25", "--seed", "7")
    cfg.check()
    (train, train_errors), (held, held_errors) = read_sources(cfg)
    _, (again, _) = read_sources(cfg)  # read afresh: the same rows
    assert (len(train), len(held)) == (12, 4) and train_errors == held_errors == []
    assert [r.number for r in held] == [r.number for r in again]
    assert sorted(r.number for r in train + held) == list(range(1, 17))
    for flags, message in ((("--eval-ratio", "1"), "--eval-ratio must be in"),
                           (("--eval-ratio", "-0.1"), "--eval-ratio must be in"),
                           (("--eval-ratio", "0.1", "--eval-data", tiny_bundle["eval_json"]), "give one of the two")):
        with pytest.raises(ConfigError, match=message):
            config(*flags).check()


def bundle_dataset(bundle) -> Dataset:
    """The tiny bundle's training rows with their images stored in the dataset (bytes)."""
    rows = json.load(open(bundle["train_json"]))
    images = [[PILImage.open(os.path.join(bundle["image_folder"], r["image"])).convert("RGB")]
              if r.get("image") else [] for r in rows]
    return Dataset.from_dict({"conversations": [r["conversations"] for r in rows], "image": images}) \
        .cast_column("image", List(Image()))


def test_check_cli_on_a_parquet_dataset(tiny_bundle, tmp_path):
    ds = bundle_dataset(tiny_bundle)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    flags = ["--train-data", str(tmp_path / "train.parquet"), "--model-name-or-path", tiny_bundle["model_dir"],
             "--workers", "2", "--data-format", "llava"]
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1"}
    result = python_m("ftloop.data.check", flags, extra_env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tmp_path / 'train.parquet'}: 16 rows, 14 images" in result.stdout and "total: 0 errors" in result.stdout
    result = python_m("ftloop.data.check", flags[:-3] + ["1", "--data-format", "messages"], extra_env=env)
    assert result.returncode == 2 and result.stdout.count("missing or empty `messages`") == 16


def test_train_from_a_saved_dataset_with_eval_ratio(tiny_bundle, tmp_path):
    bundle_dataset(tiny_bundle).save_to_disk(str(tmp_path / "ds"))
    flags = train_flags(tiny_bundle, tmp_path / "out", "--train-data", str(tmp_path / "ds"), "--eval-ratio",
                        "0.25", "--max-steps", "2", "--eval-steps", "1", "--logging-steps", "1", "--no-bf16")
    result = check(python_m("ftloop.train", flags, extra_env={"HF_HUB_OFFLINE": "1"}))
    assert "4 of 16 rows held out for evaluation" in result.stdout
    assert "12 train rows" in result.stdout
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2]
