"""Reading rows: json and jsonl, image paths, and one-line errors naming file and row."""

import json
import os

import pytest

from datautil import one_line_error, save_rgb, turns, write_json, write_jsonl
from ftloop.data.layouts import load_rows
from ftloop.data.rows import Row
from ftloop.errors import DataError

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
    assert a[0] == Row([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "red"}],
                       [os.path.join(str(data_dir), "a.png")], [], number=1)
    assert a[1] == Row([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], number=2)


def test_load_rows_jsonl_skips_blank_lines(data_dir):
    path = data_dir / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD) + "\n")
    assert len(load_rows(str(path))) == 2


def test_load_rows_image_list_and_roles(data_dir):
    row = {"image": ["x/1.png", "2.png"], "conversations": turns(
        ("system", "Be brief."), ("human", "<image> and <image>"), ("gpt", "two"), ("user", "more?"),
        ("assistant", "no"))}
    (got,) = load_rows(write_json(data_dir / "d.json", [row]))
    assert [m["role"] for m in got.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in got.messages] == ["Be brief.", "<image> and <image>", "two", "more?", "no"]
    assert got.images == [os.path.join(str(data_dir), "x/1.png"), os.path.join(str(data_dir), "2.png")]


def test_load_rows_image_folder_and_absolute_paths(tmp_path, data_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_rgb(folder / "a.png")
    absolute = str(data_dir / "2.png")
    rows = [GOOD, {"image": absolute, "conversations": GOOD["conversations"]}]
    got = load_rows(write_json(tmp_path / "d.json", rows), str(folder))
    assert got[0].images == [os.path.join(str(folder), "a.png")]
    assert got[1].images == [absolute]


def test_load_rows_relative_data_path_gives_absolute_images(data_dir, monkeypatch):
    write_json(data_dir / "d.json", [GOOD])
    monkeypatch.chdir(data_dir)
    (got,) = load_rows("d.json")
    assert got.images == [os.path.join(str(data_dir), "a.png")]
    assert os.path.isabs(got.images[0])


@pytest.mark.parametrize("image,needle", [("gone.png", "not found"), ("x", "folder")])
def test_load_rows_checks_image_paths(data_dir, image, needle):
    path = write_json(data_dir / "d.json", [GOOD, GOOD, {"image": image, "conversations": GOOD["conversations"]}])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    one_line_error(excinfo, path, "row 3", needle, os.path.join(str(data_dir), image))


def test_load_rows_bundle(tiny_bundle):
    rows = load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"])
    assert len(rows) == 16
    assert rows[3].images == [] and rows[15].images == []  # the bundle's text-only rows
    assert all(os.path.isfile(p) for r in rows for p in r.images)
    assert sum(len(r.images) for r in rows) == 14


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
    # Rows that would otherwise train silently but wrongly:
    "starts with the reply": ({"conversations": turns(("system", "be brief"), ("gpt", "x"), ("human", "hi"),
                                                      ("gpt", "y"))}, "starts with a gpt turn: a reply to no prompt"),
    "empty reply": ({"conversations": turns(("human", "hi"), ("gpt", "  "))}, "a gpt turn is empty"),
    "image URL": ({"conversations": turns(("human", "<image>"), ("gpt", "x")), "image": "https://example.com/a.png"},
                  "image URL https://example.com/a.png: ftloop reads local files only; download it first"),
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


def test_a_json_file_that_is_one_object_is_said_once(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": 2, "rows": [GOOD]}, indent=2))
    with pytest.raises(DataError) as excinfo:
        load_rows(str(path))
    one_line_error(excinfo, f"{path}: the file is one json object (keys `version`, `rows`), not rows",
                   "give a json array of rows")
    one_row = tmp_path / "one.jsonl"  # one object on one line is a .jsonl file of one row
    one_row.write_text(json.dumps({"conversations": turns(("human", "hi"), ("gpt", "hello"))}) + "\n")
    assert len(load_rows(str(one_row))) == 1
