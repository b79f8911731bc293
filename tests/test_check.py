"""`python -m ftloop.data.check`: the data preflight reports numbers and every bad row, never a traceback."""

import json
import os

import pytest

from transformers import AutoImageProcessor, AutoTokenizer

from datautil import write_json
from ftloop.data.chat import ChatFormat
from ftloop.data.check import main
from ftloop.data.encode import measure_row
from ftloop.data.preflight import Measuring, check_file
from ftloop.data.dataset import SFTDataset
from ftloop.data.formats import load_rows
from ftloop.errors import ConfigError, DataError
from launch import python_m
from test_cli import one_error_line

SYSTEM = ChatFormat("You are a helpful assistant.")


def bundle_rows(bundle):
    with open(bundle["train_json"]) as f:
        return json.load(f)


def test_numbers_match_the_dataset(tiny_bundle):
    b = tiny_bundle
    report = check_file(b["train_json"], Measuring(b["model_dir"], max_seq_length=2048), b["image_folder"])
    raw = bundle_rows(b)
    assert report.rows == len(raw) and not report.errors
    assert report.images == sum(1 for r in raw if r.get("image"))
    assert report.text_only == sum(1 for r in raw if not r.get("image"))
    tokenizer = AutoTokenizer.from_pretrained(b["model_dir"])
    image_processor = AutoImageProcessor.from_pretrained(b["model_dir"])
    rows = load_rows(b["train_json"], b["image_folder"])
    dataset = SFTDataset(rows, tokenizer, image_processor, 2048, SYSTEM)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert sorted(report.lengths) == sorted(lengths) and max(report.lengths) == max(lengths)
    assert [measure_row(r, tokenizer, image_processor, SYSTEM) for r in rows] == lengths
    assert report.percentile(1.0) == max(lengths) and report.too_long == 0
    short = check_file(b["train_json"], Measuring(b["model_dir"], max_seq_length=max(lengths) - 1), b["image_folder"])
    assert short.too_long == sum(n > max(lengths) - 1 for n in lengths) > 0


def test_load_rows_collects_errors_instead_of_raising(tiny_bundle, tmp_path):
    good = bundle_rows(tiny_bundle)[0]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps([1]), json.dumps(dict(good, image="x.png"))]))
    errors = []
    rows = load_rows(str(path), tiny_bundle["image_folder"], errors=errors)
    assert [r["row"] for r in rows] == [1]
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
    result = python_m("ftloop.data.check", ["--train-data", str(data), "--image-folder", b["image_folder"],
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
    result = python_m("ftloop.data.check", flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "total: 0 errors in 2 files" in result.stdout and "p99" in result.stdout
    # text-only rows over a small limit are counted (image rows whose images end past it are errors)
    text = [r for r in bundle_rows(b) if not r.get("image")]
    data = write_json(tmp_path / "text.json", text)
    result = python_m("ftloop.data.check", ["--train-data", data, "--model-name-or-path", b["model_dir"],
                                            "--max-seq-length", "5", "--workers", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(text)} rows longer than --max-seq-length 5" in result.stdout


def test_user_errors_are_one_line(tiny_bundle, tmp_path):
    b = tiny_bundle
    missing = python_m("ftloop.data.check", ["--train-data", str(tmp_path / "none.json"),
                                             "--model-name-or-path", b["model_dir"]])
    assert "--train-data" in one_error_line(missing) and "file not found" in one_error_line(missing)
    no_model = python_m("ftloop.data.check", ["--train-data", b["train_json"],
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
