"""`python -m ftloop.data.check`: the data check reports numbers and every bad row, never a traceback, and finds
what the check before training finds."""

import json
import os

import pytest

from transformers import AutoImageProcessor, AutoTokenizer

from datautil import save_rgb, write_json
from ftloop.config import VideoArgs
from ftloop.data.batches import SFTDataset
from ftloop.data.check import Measuring, checked_rows, main, make_pool, report
from ftloop.data.encode import ChatFormat
from ftloop.data.layouts import load_rows
from ftloop.distributed import World
from ftloop.errors import ConfigError, DataError, DataErrors
from launch import forked_python_m
from test_cli import one_error_line

SYSTEM = ChatFormat("You are a helpful assistant.")


def bundle_rows(bundle):
    with open(bundle["train_json"]) as f:
        return json.load(f)


def test_numbers_match_the_dataset(tiny_bundle):
    b = tiny_bundle
    tokenizer = AutoTokenizer.from_pretrained(b["model_dir"])
    image_processor = AutoImageProcessor.from_pretrained(b["model_dir"])
    found = report(b["train_json"], Measuring(tokenizer, image_processor, SYSTEM, 2048), World.single(),
                   b["image_folder"])
    raw = bundle_rows(b)
    assert found.rows == len(raw) and not found.errors
    assert found.images == sum(1 for r in raw if r.get("image"))
    assert found.text_only == sum(1 for r in raw if not r.get("image"))
    rows = load_rows(b["train_json"], b["image_folder"])
    dataset = SFTDataset(rows, tokenizer, image_processor, 2048, SYSTEM)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert found.lengths == lengths  # in row order
    assert [Measuring(tokenizer, image_processor, SYSTEM)(r, "x") for r in rows] == lengths
    assert found.percentile(1.0) == max(lengths) and found.too_long == 0
    short = report(b["train_json"], Measuring(tokenizer, image_processor, SYSTEM, max(lengths) - 1), World.single(),
                   b["image_folder"])
    assert short.too_long == sum(n > max(lengths) - 1 for n in lengths) > 0


@pytest.mark.parametrize("truncation", ["drop", "right"])
def test_the_check_finds_what_the_check_before_training_finds(tiny_bundle, tmp_path, truncation):
    """One measuring rule in both places: rows whose image ends past --max-seq-length are errors under
    --truncation right (their text may be cut, the image may not) and only too long under drop, in
    `python -m ftloop.data.check` (spread over a process pool) as in the check before training (over the ranks)."""
    b = tiny_bundle
    tokenizer = AutoTokenizer.from_pretrained(b["model_dir"])
    image_processor = AutoImageProcessor.from_pretrained(b["model_dir"])
    raw = bundle_rows(b)
    raw[1] = dict(raw[1], image=str(save_rgb(tmp_path / "gone.png")))  # a bad row too, as read
    os.remove(tmp_path / "gone.png")
    data = write_json(tmp_path / "train.json", raw)
    read_errors = []
    rows = load_rows(data, b["image_folder"], read_errors)
    measuring = Measuring(tokenizer, image_processor, SYSTEM, 5, truncation)  # every image ends past token 5
    pool = make_pool(2, measuring)
    try:
        by_the_command = report(data, measuring, pool, b["image_folder"])
    finally:
        pool.close()
        pool.join()
    try:
        checked_rows(data, rows, read_errors, measuring, False, World.single())
        errors = []
    except DataErrors as err:
        errors = err.lines[:-1]
    assert by_the_command.errors == errors
    assert [e for e in errors if e.startswith(f"{data}: row 2: ")] == [f"{data}: row 2: image not found: {tmp_path}/gone.png"]
    image_rows = sum(1 for r in rows if r.images)
    assert len(errors) == 1 + (image_rows if truncation == "right" else 0)
    kept = checked_rows(data, rows, read_errors, measuring, True, World.single())  # --skip-bad-rows
    assert kept.skipped_bad == len(errors)
    if truncation == "drop":  # every row is longer than 5: dropped, and counted by the command
        assert kept.rows == [] and kept.dropped_long == by_the_command.too_long == len(rows)
    else:  # the text-only rows are cut to 5
        assert kept.dropped_long == 0 and kept.lengths == [5] * (len(rows) - image_rows)


def test_load_rows_collects_errors_instead_of_raising(tiny_bundle, tmp_path):
    good = bundle_rows(tiny_bundle)[0]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps([1]), json.dumps(dict(good, image="x.png"))]))
    errors = []
    rows = load_rows(str(path), tiny_bundle["image_folder"], errors=errors)
    assert [r.number for r in rows] == [1]
    assert [e.split(": ")[1] for e in errors] == ["row 2", "row 3", "row 4"]
    try:
        load_rows(str(path), tiny_bundle["image_folder"])
    except DataError as err:
        assert "row 2: not valid json" in str(err)
    else:
        raise AssertionError("load_rows without errors= must still raise")


def test_cli_lists_every_bad_row_and_exits_2(tiny_bundle, tmp_path):
    b = tiny_bundle
    raw = bundle_rows(b)
    image_row = next(r for r in raw if r.get("image"))
    text_row = next(r for r in raw if not r.get("image"))
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    bad_role = dict(text_row, conversations=[{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}])
    two_placeholders = dict(image_row, conversations=[{"from": "human", "value": "<image><image> what?"},
                                                      {"from": "gpt", "value": "red"}])
    lines = [image_row, dict(image_row, image="no/such/picture.png"), text_row,
             dict(image_row, image=str(tmp_path / "corrupt.png")), bad_role, two_placeholders]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines[:3]) + "\n{\"conversations\": [\n"
                    + "\n".join(json.dumps(r) for r in lines[3:]) + "\n")
    result = forked_python_m("ftloop.data.check", ["--train-data", str(data), "--image-folder", b["image_folder"],
                                                   "--model-name-or-path", b["model_dir"], "--workers", "2"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    out = result.stdout
    expected = [(2, "no/such/picture.png"), (4, "not valid json"), (5, "cannot read image"),
                (6, "unknown role 'robot'"), (7, "2 `<image>` placeholders but 1 images")]
    error_lines = [line for line in out.splitlines() if line.startswith(f"{data}: row ")]
    assert len(error_lines) == len(expected), out
    for line, (row, needle) in zip(error_lines, expected):
        assert line.startswith(f"{data}: row {row}: ") and needle in line, (line, out)
    assert f"{data}: 7 rows" in out and "total: 5 errors" in out


def test_cli_clean_data_exits_0_and_counts_long_rows(tiny_bundle, tmp_path):
    b = tiny_bundle
    flags = ["--train-data", b["train_json"], "--eval-data", b["eval_json"], "--image-folder", b["image_folder"],
             "--model-name-or-path", b["model_dir"], "--workers", "1"]
    result = forked_python_m("ftloop.data.check", flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "total: 0 errors in 2 files" in result.stdout and "p99" in result.stdout
    assert "checking train.json:   0%|" in result.stderr and "| 0/16 " in result.stderr  # the check's bar, 16 rows
    # rows over a small limit are counted (under --truncation right, image rows whose images end past it are
    # errors: test_the_check_finds_what_the_check_before_training_finds)
    text = [r for r in bundle_rows(b) if not r.get("image")]
    data = write_json(tmp_path / "text.json", text)
    result = forked_python_m("ftloop.data.check", ["--train-data", data, "--model-name-or-path", b["model_dir"],
                                                   "--max-seq-length", "5", "--workers", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(text)} rows longer than --max-seq-length 5" in result.stdout


def test_user_errors_are_one_line(tiny_bundle, tmp_path):
    b = tiny_bundle
    missing = forked_python_m("ftloop.data.check", ["--train-data", str(tmp_path / "none.json"),
                                                    "--model-name-or-path", b["model_dir"]])
    assert "--train-data" in one_error_line(missing) and "file not found" in one_error_line(missing)
    no_model = forked_python_m("ftloop.data.check", ["--train-data", b["train_json"],
                                                     "--model-name-or-path", str(tmp_path / "nomodel")])
    assert "no config.json" in one_error_line(no_model)


def test_unreadable_json_array_is_one_error_for_the_file(tiny_bundle, tmp_path, capsys):
    data = tmp_path / "broken.json"
    data.write_text("[{\"conversations\": ")
    assert main(["--train-data", str(data), "--model-name-or-path", tiny_bundle["model_dir"],
                 "--workers", "1"]) == 2
    out = capsys.readouterr().out
    assert f"{data}: not valid json" in out and "total: 1 errors" in out
    assert os.path.isfile(tiny_bundle["train_json"])  # the shared bundle is untouched


@pytest.mark.parametrize("flags, message", [
    (["--max-seq-length", "0"], "--max-seq-length must be positive"),
    (["--min-pixels", "9000", "--max-pixels", "4000"], "--min-pixels 9000 is above --max-pixels 4000"),
    (["--max-images-per-sample", "-1"], "--max-images-per-sample must be 0"),
    (["--workers", "0"], "--workers must be positive"),
])
def test_cli_checks_the_data_flags_as_train_does(tiny_bundle, flags, message):
    with pytest.raises(ConfigError) as refused:  # one line, exit 2 (ftloop.cli)
        main(["--train-data", tiny_bundle["train_json"], "--model-name-or-path", tiny_bundle["model_dir"], *flags])
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value), refused.value


def test_show_prints_rows_as_the_model_sees_them(tiny_bundle, tmp_path, capsys):
    """`--show N`: the rendered chat with its special tokens, an image as its merged patch grid (as many tokens as
    the row carries), what is learnt between [[ and ]] (a reply marked "loss": false is not)."""
    import re

    from ftloop.data.encode import IMAGE_PAD

    save_rgb(tmp_path / "wide.png", size=(112, 56))
    rows = [{"messages": [{"role": "user", "content": "<image>Which shape?"},
                          {"role": "assistant", "content": "A circle.", "loss": False},
                          {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
             "images": ["wide.png"]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    data = write_json(tmp_path / "d.json", rows)
    assert main(["--train-data", data, "--model-name-or-path", tiny_bundle["model_dir"], "--workers", "1",
                 "--show", "1"]) == 0
    out = capsys.readouterr().out
    shown = out[out.index(f"--- {data}: row 1"):out.index("\ntotal:")].strip()
    assert f"{data}: row 2" not in out  # one row only
    width, height = map(int, re.search(r"<image (\d+)x(\d+) patches>", shown).groups())
    tokenizer = AutoTokenizer.from_pretrained(tiny_bundle["model_dir"])
    processor = AutoImageProcessor.from_pretrained(tiny_bundle["model_dir"])
    [row] = load_rows(data)[:1]
    from ftloop.data.encode import encode_row
    _, ids, labels = encode_row(row, tokenizer, processor, VideoArgs(), ChatFormat(), "w")
    assert width * height == ids.count(tokenizer.convert_tokens_to_ids(IMAGE_PAD)) and width == 2 * height
    learnt = sum(label != -100 for label in labels)
    assert shown.splitlines() == [
        f"--- {data}: row 1 ({len(ids)} tokens, {learnt} learnt)",
        "<|im_start|>system", "You are a helpful assistant.<|im_end|>", "<|im_start|>user",
        f"<|vision_start|><image {width}x{height} patches><|vision_end|>Which shape?<|im_end|>",
        "<|im_start|>assistant", "A circle.<|im_end|>", "<|im_start|>user", "Sure?<|im_end|>",
        "<|im_start|>assistant", "[[Yes.<|im_end|>]]"]


def test_a_mixture_is_reported_source_by_source(tiny_bundle, tmp_path, capsys):
    """Each source of a mixture file gets its own report, read with its own media folder (weights shape training
    only)."""
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"- path: {tiny_bundle['train_json']}\n  image_folder: {tiny_bundle['image_folder']}\n  weight: 3\n"
                   f"- path: {tiny_bundle['eval_json']}\n  image_folder: {tmp_path}\n")
    assert main(["--train-data", str(mix), "--model-name-or-path", tiny_bundle["model_dir"], "--workers", "1"]) == 2
    out = capsys.readouterr().out
    assert f"{tiny_bundle['train_json']}: 16 rows, 14 images" in out and "0 errors\n" in out
    assert f"{tiny_bundle['eval_json']}: 8 rows" in out and "image not found" in out  # its own (wrong) folder
    assert "errors in 2 files" in out
