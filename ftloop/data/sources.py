"""What kind of data source a path is, and reading the rows of a .json/.jsonl file.

A source is a .json (array) or .jsonl file, or something `datasets` reads (ftloop.data.hf_datasets): a
folder, a .parquet or .arrow file, a hub dataset name. `check_sources` is the check of --train-data and
--eval-data that runs before any process group exists.
"""

from __future__ import annotations

import json
import os
import re

from ftloop.config import DataArgs
from ftloop.data.rows import where
from ftloop.errors import ConfigError, DataError

JSON_SUFFIXES, DATASET_SUFFIXES = (".json", ".jsonl"), (".parquet", ".arrow")
# A hub dataset id: "name" or "org/name" (a local path that does not exist is not one: see looks_like_hub_id).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_hub_id(path: str) -> bool:
    """`name` or `org/name` that is not a local path and not a data file name (`x.json` is a missing file)."""
    return (not os.path.exists(path) and HUB_ID.fullmatch(path) is not None
            and not path.lower().endswith(JSON_SUFFIXES + DATASET_SUFFIXES))


def source_problem(path: str) -> str | None:
    """None when `path` can be tried as data (an existing file or folder, or a hub dataset name, which may
    still fail to load later), else what is wrong with it."""
    if os.path.exists(path) or looks_like_hub_id(path):
        return None
    if path.lower().endswith(JSON_SUFFIXES + DATASET_SUFFIXES):
        return "file not found"
    return "file not found (nor a folder, nor a hub dataset name such as org/name)"


def check_sources(data: DataArgs) -> None:
    """ConfigError naming the flag when --train-data or --eval-data cannot be data."""
    for flag, path in (("--train-data", data.train_data), ("--eval-data", data.eval_data)):
        problem = source_problem(path) if path else None
        if problem:
            raise ConfigError(f"{flag} {path}: {problem}")


def is_dataset_source(path: str) -> bool:
    """Read with `datasets` (a folder, a .parquet/.arrow file, a hub name) rather than as json/jsonl."""
    return os.path.isdir(path) or path.lower().endswith(DATASET_SUFFIXES) or looks_like_hub_id(path)


def default_image_folder(path: str) -> str:
    """Where relative image paths point without --image-folder: the data file's folder, a dataset folder
    itself, or the working directory for a hub dataset."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    return os.path.dirname(os.path.abspath(path)) if os.path.exists(path) else os.getcwd()


def read_json_rows(path: str, errors: list[str] | None = None) -> list[tuple[int, dict]]:
    """(row number, row) pairs of a .json array or a .jsonl file (told apart by the first character).

    In a .jsonl file the row number is the line number, blank lines included, so that every message about
    a row points at the line an editor shows. With an `errors` list, a row that is not valid json (.jsonl)
    or not an object is appended there as its one-line message and skipped instead of raising.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            text = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if text.lstrip().startswith("{") and len([line for line in text.splitlines() if line.strip()]) > 1:
        try:  # one json object over several lines: not rows (a one-line object is a .jsonl file of one row)
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            keys = ", ".join(f"`{k}`" for k in list(whole)[:5])
            raise DataError(f"{path}: the file is one json object (keys {keys}), not rows; give a json array of "
                            "rows ([{...}, {...}]) or one row per line (.jsonl)")
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid json at line {err.lineno} column {err.colno}: {err.msg}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                problem = f"{where(path, number)}: not valid json ({err.msg})"
                if errors is None:
                    raise DataError(problem) from None
                errors.append(problem)
    good = []
    for number, row in rows:
        if not isinstance(row, dict):
            problem = f"{where(path, number)}: expected a json object, got {type(row).__name__}"
            if errors is None:
                raise DataError(problem)
            errors.append(problem)
        else:
            good.append((number, row))
    return good
