"""The cache of the check before training (ftloop.data.check_cache): a second check with the same data,
tokenizer and flags reads what the first found instead of measuring again; anything that can change a
length or an error measures again; a corrupt file is a miss, and a file is never left half-written."""

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from ftloop.data import check_cache
from ftloop.data.check import Measuring, checked_rows
from ftloop.data.encode import ChatFormat
from ftloop.data.layouts import load_rows
from ftloop.data.check_cache import CacheEntry, Measured, cache_folder, source_fingerprint
from ftloop.data.loaders import hold_out
from ftloop.data.media import load_image_processor
from ftloop.distributed import World
from ftloop.errors import DataErrors
from datautil import SYSTEM, save_rgb

HIT = "row check cached in"


@pytest.fixture
def data(tiny_bundle, tmp_path):
    """A copy of the bundle's training rows and their images, free to edit."""
    shutil.copytree(os.path.join(tiny_bundle["image_folder"], "train"), tmp_path / "images" / "train")
    shutil.copy(tiny_bundle["train_json"], tmp_path / "train.json")
    return {"path": str(tmp_path / "train.json"), "images": str(tmp_path / "images"), "out": str(tmp_path / "out")}


@pytest.fixture
def measured(monkeypatch):
    """The row numbers a row was measured for (Measuring is called once per row), in order."""
    calls, measure = [], Measuring.__call__

    def counting(self, row, source):
        calls.append(row.number)
        return measure(self, row, source)

    monkeypatch.setattr(Measuring, "__call__", counting)
    return calls


def check(data, tokenizer, image_processor, /, **changes):
    """checked_rows on `data` with the run's cache, the defaults of ftloop.train unless `changes` says; `loaded`:
    (rows, their reading errors) instead of the rows of `path` under `image_folder`."""
    a = dict(path=data["path"], image_folder=data["images"], tokenizer=tokenizer, image_processor=image_processor,
             chat=SYSTEM, max_seq_length=2048, truncation="drop", max_images=0, skip_bad_rows=False,
             output_dir=data["out"], world=World.single(), loaded=None)
    a.update(changes)
    errors: list[str] = []
    rows, errors = a["loaded"] or (load_rows(a["path"], a["image_folder"], errors), errors)
    measuring = Measuring(a["tokenizer"], a["image_processor"], a["chat"], a["max_seq_length"], a["truncation"],
                          a["max_images"])
    return checked_rows(a["path"], rows, errors, measuring, a["skip_bad_rows"], a["world"], a["output_dir"])


def cache_files(data) -> list[str]:
    folder = cache_folder(data["out"])
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_second_check_with_the_same_inputs_reads_the_cache(data, tokenizer, image_processor, monkeypatch,
                                                             capsys):
    first = check(data, tokenizer, image_processor)
    assert HIT not in capsys.readouterr().out  # a miss says nothing new
    [name] = cache_files(data)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured on a cache hit")

    monkeypatch.setattr(Measuring, "__call__", no_measuring)
    assert check(data, tokenizer, image_processor) == first
    file = os.path.join(cache_folder(data["out"]), name)
    assert capsys.readouterr().out.splitlines() == [
        f"{data['path']}: row check cached in {file} (same data, tokenizer and flags); skipping it"]


def _touch(data, tokenizer, image_processor):
    stat = os.stat(data["path"])
    os.utime(data["path"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return {}


def _same_size_edit(data, tokenizer, image_processor):
    stat, text = os.stat(data["path"]), open(data["path"]).read()
    open(data["path"], "w").write(text.replace('"red"', '"rex"', 1))
    assert os.path.getsize(data["path"]) == stat.st_size
    os.utime(data["path"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return {}


def _image_replaced(data, tokenizer, image_processor):
    save_rgb(os.path.join(data["images"], "train", "00000.png"), size=(112, 112))
    return {}


def _other_image_folder(data, tokenizer, image_processor):
    shutil.copytree(data["images"], data["images"] + "2")
    return {"image_folder": data["images"] + "2"}


def _fewer_rows(data, tokenizer, image_processor):
    rows = load_rows(data["path"], data["images"])
    return {"loaded": (rows[1:], [])}


def _other_tokenizer(data, tokenizer, image_processor):
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<|new_token|>"])
    return {"tokenizer": other}


CHANGES = {
    "data file touched": _touch,
    "data file edited, same size and mtime": _same_size_edit,
    "image replaced": _image_replaced,
    "other image folder": _other_image_folder,
    "fewer rows": _fewer_rows,
    "tokenizer": _other_tokenizer,
    "min and max pixels": lambda d, t, p: {"image_processor": load_image_processor(t.name_or_path, 28 * 28, 28 * 28)},
    "system prompt": lambda d, t, p: {"chat": ChatFormat("Answer in one word.")},
    "timestamped videos": lambda d, t, p: {"chat": ChatFormat(SYSTEM.system_prompt, timestamped_videos=True)},
    "empty think block": lambda d, t, p: {"chat": ChatFormat(SYSTEM.system_prompt, think_block="<think>\n\n</think>\n\n")},
    "empty think block trained": lambda d, t, p: {"chat": ChatFormat(SYSTEM.system_prompt, think_block="<think>\n\n</think>\n\n",
                                                                     think_block_trained=True)},
    "max images": lambda d, t, p: {"max_images": 1},
    "truncation": lambda d, t, p: {"truncation": "right"},
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_that_can_change_lengths_or_errors_measures_again(data, tokenizer, image_processor, measured,
                                                                    change):
    check(data, tokenizer, image_processor)
    count = len(measured)
    assert count > 0
    check(data, tokenizer, image_processor, **CHANGES[change](data, tokenizer, image_processor))
    assert len(measured) > count, f"{change}: read from the cache"


def test_max_seq_length_measures_again_under_truncation_right_only(data, tokenizer, image_processor, measured):
    """With --truncation right the limit is part of the measurement (an image must end inside it); with drop
    the lengths are measured uncut and the limit applies after, so the cache holds for any limit."""
    check(data, tokenizer, image_processor, truncation="right")
    count = len(measured)
    check(data, tokenizer, image_processor, truncation="right", max_seq_length=35)
    assert len(measured) == 2 * count
    check(data, tokenizer, image_processor)
    assert len(measured) == 3 * count
    cached = check(data, tokenizer, image_processor, max_seq_length=35)
    assert len(measured) == 3 * count
    assert cached == check(data, tokenizer, image_processor, max_seq_length=35, output_dir=None)
    assert cached.dropped_long > 0


def test_the_fingerprint_sees_a_same_size_edit_with_the_mtime_kept(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    for name, size in (("a.arrow", 3 << 20), ("b.json", 100)):
        (folder / name).write_bytes(b"x" * size)
    before = source_fingerprint(str(folder)), source_fingerprint(str(folder / "a.arrow"))
    stat = os.stat(folder / "a.arrow")
    with open(folder / "a.arrow", "r+b") as f:  # the last MiB of a file of three
        f.seek((3 << 20) - 5)
        f.write(b"yyyyy")
    os.utime(folder / "a.arrow", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = source_fingerprint(str(folder)), source_fingerprint(str(folder / "a.arrow"))
    assert after[0] != before[0] and after[1] != before[1]
    assert source_fingerprint("org/name") is None  # a hub name: not cached


def test_a_hub_dataset_name_is_never_cached(data, tokenizer, image_processor, measured):
    rows = load_rows(data["path"], data["images"])
    for _ in range(2):
        check(data, tokenizer, image_processor, path="org/name", loaded=(rows, []))
    assert len(measured) == 2 * len(rows) and cache_files(data) == []


def test_held_out_rows_and_the_rows_kept_have_a_file_each(data, tokenizer, image_processor, measured):
    """--eval-ratio checks two sets of rows of one source: each keeps its own cache, so both hit on a resume."""
    kept, held = hold_out(load_rows(data["path"], data["images"]), 0.25, seed=42)
    for _ in range(2):
        check(data, tokenizer, image_processor, loaded=(kept, []))
        check(data, tokenizer, image_processor, loaded=(held, []))
    assert len(measured) == len(kept) + len(held) and len(cache_files(data)) == 2


def test_bad_rows_are_cached_so_a_rerun_with_skip_bad_rows_reuses_the_check(data, tokenizer, image_processor,
                                                                             measured):
    # An image that cannot be opened is found only by measuring: the row is read, and its error is cached.
    image = next(row["image"] for row in json.load(open(data["path"])) if "image" in row)
    open(os.path.join(data["images"], image), "wb").write(b"not a png")
    with pytest.raises(DataErrors) as excinfo:
        check(data, tokenizer, image_processor)
    count = len(measured)
    assert "cannot read image" in excinfo.value.lines[0]
    assert check(data, tokenizer, image_processor, skip_bad_rows=True).skipped_bad == 1
    assert len(measured) == count


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'{"key": {}, "lengths": []}'])
def test_a_corrupt_cache_file_is_a_miss_and_is_written_again(data, tokenizer, image_processor, measured, content):
    first = check(data, tokenizer, image_processor)
    [name] = cache_files(data)
    file = os.path.join(cache_folder(data["out"]), name)
    good = open(file, "rb").read()
    open(file, "wb").write(content)
    assert check(data, tokenizer, image_processor) == first
    assert len(measured) == 2 * len(first.rows)
    assert open(file, "rb").read() == good


def test_a_stored_file_of_the_wrong_shape_is_a_miss(data, tokenizer, image_processor):
    check(data, tokenizer, image_processor)
    [name] = cache_files(data)
    file = os.path.join(cache_folder(data["out"]), name)
    saved = json.load(open(file))
    entry = CacheEntry(file, saved["key"], len(saved["lengths"]))
    assert entry.load() == Measured(dict(enumerate(saved["lengths"])))
    for lengths in (saved["lengths"][1:], [True] * len(saved["lengths"]), [1.5] * len(saved["lengths"])):
        json.dump(dict(saved, lengths=lengths), open(file, "w"))
        assert entry.load() is None


def test_a_failed_write_leaves_no_file_and_does_not_stop_the_run(data, tokenizer, image_processor, measured,
                                                                  monkeypatch, capsys):
    def half_then_disk_full(value, f):
        f.write(json.dumps(value)[:20])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(check_cache.json, "dump", half_then_disk_full)
    first = check(data, tokenizer, image_processor)
    assert cache_files(data) == []  # neither the temporary file nor a half-written cache
    assert "could not write the row check cache (No space left on device)" in capsys.readouterr().out
    monkeypatch.undo()
    assert check(data, tokenizer, image_processor) == first
    assert [name.endswith(".json") and not name.startswith(".") for name in cache_files(data)] == [True]


def test_only_rank_0_reads_the_cache_and_the_others_follow_its_broadcast(data, tokenizer, image_processor,
                                                                        measured, monkeypatch, capsys):
    """Rank 1 of 2 (the collectives stubbed): it never reads the file, skips when rank 0 sends a hit, measures
    its share when rank 0 sends a miss, and writes nothing."""
    cached = check(data, tokenizer, image_processor)
    [name] = cache_files(data)
    found = dict(enumerate(json.load(open(os.path.join(cache_folder(data["out"]), name)))["lengths"]))
    shutil.rmtree(data["out"])
    capsys.readouterr()

    def rank_0_sends(hit: bool):
        def all_gather_object(out, mine):
            if isinstance(mine, tuple):  # ftloop.distributed.agree: rank 0's outcome of reading the cache
                out[:] = [(None, Measured(found) if hit else None), mine]
            else:  # the measuring, shared: rank 0's half (here all of it; rank 1's own half agrees with it)
                out[:] = [found, mine]
        return all_gather_object

    rank_1 = World(1, 1, 2, torch.device("cpu"), "gloo", 2)
    monkeypatch.setattr(check_cache, "cache_entry", lambda *a: pytest.fail("rank 1 looked at the cache"))
    monkeypatch.setattr(dist, "all_gather_object", rank_0_sends(hit=True))
    count = len(measured)
    assert check(data, tokenizer, image_processor, world=rank_1) == cached
    assert len(measured) == count and capsys.readouterr().out == ""
    monkeypatch.setattr(dist, "all_gather_object", rank_0_sends(hit=False))
    check(data, tokenizer, image_processor, world=rank_1)
    assert measured[count:] == [row.number for row in load_rows(data["path"], data["images"])][1::2]
    assert not os.path.exists(data["out"])


def test_the_splits_of_one_dataset_folder_are_told_apart(tmp_path, tiny_bundle, tokenizer, measured):
    """A DatasetDict folder given to --train-data and --eval-data: same row numbers and text in both splits,
    only their stored images differ, so only the images' dataset files tell the splits apart."""
    from datasets import Dataset, DatasetDict, Image, List
    from PIL import Image as PILImage

    def split(size):
        return Dataset.from_dict({"conversations": [[{"from": "human", "value": "<image> What?"},
                                                     {"from": "gpt", "value": "red"}]],
                                  "image": [[PILImage.new("RGB", (size, size), (200, 30, 30))]]}) \
            .cast_column("image", List(Image()))

    folder = str(tmp_path / "dataset")
    DatasetDict(train=split(56), validation=split(112)).save_to_disk(folder)
    processor = load_image_processor(tiny_bundle["model_dir"], 28 * 28, 112 * 112)
    data = {"path": folder, "images": "", "out": str(tmp_path / "out")}
    lengths = {}
    for name in ("train", "eval", "train", "eval"):
        rows = load_rows(folder, split=name)
        lengths.setdefault(name, []).append(check(data, tokenizer, processor, loaded=(rows, [])).lengths)
    assert lengths["train"][0] == lengths["train"][1] != lengths["eval"][0] == lengths["eval"][1]


def test_an_error_while_making_the_key_is_a_miss_said_in_one_line(tmp_path, monkeypatch, capsys):
    """Rank 0 must reach the broadcast whatever happens while it reads the cache, or the others wait in it."""

    def broken(*args, **kwargs):
        raise RuntimeError("no vocabulary")

    monkeypatch.setattr(check_cache, "tokenizer_fingerprint", broken)
    found, entry = check_cache.cached_measurement(str(tmp_path), __file__, [], None, None, {}, World.single())
    assert found is None and entry is None
    assert "the row check's cache is unusable (RuntimeError: no vocabulary); checking the rows" in capsys.readouterr().out
