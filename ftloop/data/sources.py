"""Reading a data source: what kind of source a path is, and its rows as they are stored (json values), before a
layout (ftloop.data.layouts) turns them into Rows.

A source is a .json (array) or .jsonl file, or something `datasets` reads: a `save_to_disk` folder (Dataset or
DatasetDict), another local folder `datasets.load_dataset` reads (a downloaded hub repository of parquet/json
files), a .parquet or .arrow file, or a hub name (`org/name`; needs the network or the Hugging Face cache).
`check_sources` is the check of --train-data and --eval-data that runs before any process group exists.

Hugging Face datasets: only the columns the layouts use are read. Images in a `datasets.Image` column are never
decoded or copied here: an image stored as bytes becomes an `ImageRef` (dataset, row, column, position) that
`ftloop.data.media.open_rgb` reads when the dataloader needs it; an image stored as a path only, or a string
column, is a path resolved against --image-folder like a json file's. The dataset is Arrow-backed and
memory-mapped (`load_from_disk`, `Dataset.from_file`, `Dataset.from_parquet` and `load_dataset` all give that), so
it pickles as its file names, and so does a reference: dataloader and check workers get them cheaply. `datasets`
is imported only when a dataset is read: plain-file runs do not pay for it. Splits of a DatasetDict: --train-data
reads `train` (or the only split); --eval-data reads `validation`, else `test`, so the same folder can be given to
both.

Every problem is one line that begins `<source>: row <N>:` (`where`), so that problems from every stage can be
sorted back into file order (`row_number`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import pickle
import re
import uuid
from dataclasses import dataclass

import yaml

from ftloop.config import DataArgs
from ftloop.errors import ConfigError, DataError, one_line

JSON_SUFFIXES, DATASET_SUFFIXES = (".json", ".jsonl"), (".parquet", ".arrow")
# A hub dataset id: "name" or "org/name" (a local path that does not exist is not one: see looks_like_hub_id).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
COLUMNS = ("conversations", "messages", "image", "images", "video", "videos", "video_fps")  # what the layouts read
EVAL_SPLITS = ("validation", "test")
BATCH = 1024  # rows per Arrow batch while reading


def where(source: str, number) -> str:
    """The prefix of every message about row `number` of `source`."""
    return f"{source}: row {number}"


def row_number(message: str) -> int:
    """The N of a "<source>: row N: ..." message (0 for a message about the whole source)."""
    _, _, rest = message.partition(": row ")
    number = rest.split(":", 1)[0]
    return int(number) if number.isdigit() else 0


def looks_like_hub_id(path: str) -> bool:
    """`name` or `org/name` that is not a local path and not a data file name (`x.json` is a missing file)."""
    return (not os.path.exists(path) and HUB_ID.fullmatch(path) is not None
            and not path.lower().endswith(JSON_SUFFIXES + DATASET_SUFFIXES))


def read_table(path: str, parse):
    """`parse(file)` (json.load, yaml.safe_load) of the small file at `path` that says where the data is; a file
    that cannot be read or parsed is one DataError line naming it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return parse(f)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({one_line(err)})") from None


MIXTURE_SUFFIXES = (".yaml", ".yml")  # several sources in one --train-data / --eval-data


@dataclass(frozen=True)
class MixedSource:
    """One source of a mixture file: its path, its own media folder ("" for the source's default) and how many
    times its rows go into the run (`weight`)."""
    path: str
    image_folder: str = ""
    weight: int = 1


def read_mixture(path: str) -> list[MixedSource] | None:
    """The sources of a mixture file (`.yaml`: a list of `{path, image_folder, weight}`, paths relative to the
    file's folder); None for any other source. DataError naming the file and the entry when it cannot be one."""
    if not path.lower().endswith(MIXTURE_SUFFIXES):
        return None
    entries = read_table(path, yaml.safe_load)
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: a mixture file is a list of sources (`- path: ...`, with optional `image_folder` "
                        "and `weight`)")
    folder, sources = os.path.dirname(os.path.abspath(path)), []
    for number, entry in enumerate(entries, start=1):
        unknown = sorted(set(entry) - {"path", "image_folder", "weight"}) if isinstance(entry, dict) else None
        if unknown is None or not isinstance(entry.get("path"), str) or unknown:
            raise DataError(f"{path}: source {number} must be `path` (text) with optional `image_folder` and "
                            f"`weight`" + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else ""))
        weight = entry.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise DataError(f"{path}: source {number}'s weight {weight!r}: the times its rows go into the run, a "
                            "whole number of at least 1")
        media = entry.get("image_folder") or ""
        sources.append(MixedSource(os.path.join(folder, entry["path"]), media and os.path.join(folder, media),
                                   weight))
    return sources


DATASET_INFO = "dataset_info.json"  # LLaMA-Factory's table of data sets: name -> file, layout, column names


def dataset_info_entry(path: str) -> tuple[str, dict] | None:
    """For `DIR/dataset_info.json:NAME`, (the data file, NAME's entry in LLaMA-Factory's table); None for any other
    source. DataError naming the table when it cannot be read, NAME is not in it, or it names no local file."""
    table, colon, name = path.rpartition(":")
    if not colon or os.path.basename(table) != DATASET_INFO:
        return None
    entries = read_table(table, json.load)
    entry = entries.get(name) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        known = ", ".join(sorted(entries)[:10]) if isinstance(entries, dict) else "none"
        raise DataError(f"{table}: no data set named {name!r} (it names: {known})")
    if not isinstance(entry.get("file_name"), str):
        kind = next((key for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if key in entry), None)
        raise DataError(f"{table}: data set {name!r} has no `file_name`" + (
            f" (its `{kind}` is a download; ftloop reads local files: download it and give its file)" if kind else ""))
    return os.path.join(os.path.dirname(table), entry["file_name"]), entry


def source_problem(path: str) -> str | None:
    """None when `path` can be tried as data (an existing file or folder, or a hub dataset name, which may
    still fail to load later), else what is wrong with it."""
    try:
        mixed, entry = read_mixture(path), dataset_info_entry(path)
    except DataError as err:
        return str(err).split(": ", 1)[1]
    if mixed is not None:
        problems = ((source.path, source_problem(source.path)) for source in mixed)
        return next((f"its source {where_}: {problem}" for where_, problem in problems if problem), None)
    if entry is not None:
        return None if os.path.isfile(entry[0]) else f"its data file {entry[0]} is not found"
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
    itself, the folder of LLaMA-Factory's dataset_info.json (its media_dir), or the working directory for a hub
    dataset."""
    table, colon, _ = path.rpartition(":")
    if colon and os.path.basename(table) == DATASET_INFO:
        return os.path.dirname(os.path.abspath(table))
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


# ---- Hugging Face datasets --------------------------------------------------------------------------------


_REOPENED: dict = {}  # ImageSources unpickled in this process, by key


def _reopen(key: str, name: str, pickled_dataset: bytes) -> ImageSource:
    """Unpickling an ImageSource: the first time in a process, the dataset reopens its files; after that
    (the data check sends rows in many chunks) the same source is reused."""
    source = _REOPENED.get(key)
    if source is None:
        source = _REOPENED[key] = ImageSource(pickle.loads(pickled_dataset), name, key)
    return source


class ImageSource:
    """One `datasets.Dataset` that references point into; its per-column Arrow views are built lazily
    in each process (they are not pickled)."""

    def __init__(self, dataset, name: str, key: str | None = None):
        self.dataset, self.name, self.key = dataset, name, key or uuid.uuid4().hex
        self._views: dict = {}
        self._pickled: bytes | None = None

    def __reduce__(self):
        if self._pickled is None:  # a memory-mapped dataset pickles as its file names: small
            self._pickled = pickle.dumps(self.dataset)
        return _reopen, (self.key, self.name, self._pickled)

    def cell(self, index: int, column: str):
        """The raw Arrow value of one cell: `{"bytes", "path"}`, or a list of them; never a decoded image."""
        view = self._views.get(column)
        if view is None:
            view = self._views[column] = self.dataset.select_columns([column]).with_format("arrow")
        return view[index].column(0)[0].as_py()


class ImageRef:
    """Image number `position` (None: the column holds one image per row) of `column` in row `index`."""

    __slots__ = ("source", "index", "column", "position")

    def __init__(self, source: ImageSource, index: int, column: str, position: int | None):
        self.source, self.index, self.column, self.position = source, index, column, position

    def __getstate__(self):
        return self.source, self.index, self.column, self.position

    def __setstate__(self, state) -> None:
        self.source, self.index, self.column, self.position = state

    def read(self) -> tuple[bytes | None, str | None]:
        """(encoded bytes, path) as stored; bytes win when both are there (as `datasets` decodes)."""
        value = self.source.cell(self.index, self.column)
        if self.position is not None:
            value = value[self.position]
        return value.get("bytes"), value.get("path")

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageRef) and (self.source, self.index, self.column, self.position) == \
            (other.source, other.index, other.column, other.position)

    def __hash__(self) -> int:
        return hash((id(self.source), self.index, self.column, self.position))

    def __str__(self) -> str:
        image = f"`{self.column}`" + ("" if self.position is None else f" image {self.position + 1}")
        return f"{image} of row {self.index + 1} in {self.source.name}"

    __repr__ = __str__


def pick_split(path: str, splits: dict, split: str):
    """The split --train-data ("train") or --eval-data ("eval") reads from a DatasetDict."""
    names = list(splits)
    wanted = ("train",) if split == "train" else EVAL_SPLITS
    for name in wanted:
        if name in splits:
            return splits[name]
    if split == "train" and len(names) == 1:
        return splits[names[0]]
    hint = "" if split == "train" else "; or leave --eval-data out and hold rows out with --eval-ratio"
    raise DataError(f"{path}: no {' or '.join(f'`{n}`' for n in wanted)} split (it has "
                    f"{', '.join(names) or 'none'}){hint}")


def load_dataset_split(path: str, split: str = "train"):
    """The Arrow-backed `datasets.Dataset` at `path` (see the module docstring for the kinds of path)."""
    import datasets

    if path.lower().endswith(DATASET_SUFFIXES) and not os.path.isfile(path):
        raise DataError(f"{path}: cannot read (No such file or directory)")
    try:
        if os.path.isdir(path):
            saved = any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))
            loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
        elif path.lower().endswith(".parquet"):
            loaded = datasets.Dataset.from_parquet(path)
        elif path.lower().endswith(".arrow"):
            loaded = datasets.Dataset.from_file(path)
        elif looks_like_hub_id(path):
            loaded = datasets.load_dataset(path)
        else:
            raise DataError(f"{path}: not a .json/.jsonl file, a dataset folder, a .parquet/.arrow file or a "
                            "hub dataset name")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - offline hub name, foreign folder, corrupt file, ...
        raise DataError(f"{path}: cannot load as a Hugging Face dataset ({one_line(err, with_type=True)})") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        loaded = pick_split(path, loaded, split)
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{path}: a streaming dataset cannot be read; load it without streaming")
    return loaded


def _image_column(feature) -> str | None:
    """"single" for an Image column, "list" for a list of Images, None for anything else."""
    from datasets import Image

    if isinstance(feature, Image):
        return "single"
    inner = feature[0] if isinstance(feature, list) and len(feature) == 1 else getattr(feature, "feature", None)
    return "list" if isinstance(inner, Image) else None


def _holds_image(feature) -> bool:
    """Whether an Image feature is nested anywhere in `feature` (python formatting would decode it)."""
    from datasets import Image

    if isinstance(feature, Image):
        return True
    if isinstance(feature, dict):
        return any(_holds_image(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_holds_image(f) for f in feature)
    return _holds_image(feature.feature) if hasattr(feature, "feature") else False


def _stored(array, source: ImageSource, column: str, rows: list[int], positions: list) -> list:
    """Each struct {bytes, path} of `array` as an ImageRef (bytes stored), its path (path only) or None;
    element i is in dataset row rows[i], at positions[i] of its list (None: one image per row)."""
    import pyarrow.compute as pc

    valid = pc.is_valid(array).to_pylist()
    has_bytes = pc.is_valid(pc.struct_field(array, "bytes")).to_pylist()
    paths = pc.struct_field(array, "path").to_pylist()
    out = []
    for ok, stored, path, row, position in zip(valid, has_bytes, paths, rows, positions):
        if not ok or (not stored and not path):
            out.append(None)
        else:
            out.append(ImageRef(source, row, column, position) if stored else path)
    return out


def _image_cells(batch, column: str, kind: str, source: ImageSource, offset: int) -> list:
    """One cell per row of an Arrow batch: an image (ImageRef or path) or, for a list column, a list.
    Chunk by chunk: concatenating chunks would copy (and read from disk) every image's bytes."""
    cells = []
    for array in batch.column(column).chunks:
        cells += _chunk_cells(array, column, kind, source, offset + len(cells))
    return cells


def _chunk_cells(array, column: str, kind: str, source: ImageSource, offset: int) -> list:
    import pyarrow.compute as pc

    if kind == "single":
        return _stored(array, source, column, list(range(offset, offset + len(array))), [None] * len(array))
    lengths = pc.list_value_length(array).to_pylist()  # None for a null list
    rows = [offset + i for i, n in enumerate(lengths) for _ in range(n or 0)]
    positions = [p for n in lengths for p in range(n or 0)]
    flat = _stored(pc.list_flatten(array), source, column, rows, positions)
    cells, start = [], 0
    for n in lengths:
        cells.append(None if n is None else flat[start:start + n])
        start += n or 0
    return cells


def read_dataset_rows(path: str, split: str = "train") -> list[tuple[int, dict]]:
    """(row number, row) pairs of a dataset: the layouts' columns as python values, images as ImageRefs or
    paths (a missing image in a list is None, which the layouts report)."""
    dataset = load_dataset_split(path, split)
    used = [c for c in dataset.column_names if c in COLUMNS]
    if "conversations" not in used and "messages" not in used:
        raise DataError(f"{path}: neither a `conversations` (LLaVA layout) nor a `messages` column (messages "
                        f"layout); its columns: {', '.join(dataset.column_names) or 'none'}")
    kinds = {c: _image_column(dataset.features[c]) for c in used}
    images = [c for c in used if kinds[c]]
    plain = [c for c in used if not kinds[c]]
    for column in plain:
        if _holds_image(dataset.features[column]):
            raise DataError(f"{path}: column `{column}` holds images inside it; ftloop reads images from an "
                            "`image`/`images` column (list of Image) with bare image parts in the messages")
    rows: list[dict] = [{} for _ in range(len(dataset))]
    if plain:  # text columns (and string paths) as python values, a batch at a time
        for start, batch in _batches(dataset.select_columns(plain).with_format(None)):
            for column in plain:
                for i, value in enumerate(batch[column]):
                    rows[start + i][column] = value
    source = ImageSource(dataset, path)
    for column in images:  # Image columns in Arrow form: no decoding, no bytes copied
        for start, batch in _batches(dataset.select_columns([column]).with_format("arrow")):
            for i, cell in enumerate(_image_cells(batch, column, kinds[column], source, start)):
                rows[start + i][column] = cell
    return list(enumerate(rows, start=1))


def _batches(dataset):
    start = 0
    for batch in dataset.iter(batch_size=BATCH):
        yield start, batch
        start += len(batch) if hasattr(batch, "num_rows") else len(next(iter(batch.values())))


class InlineImage(ImageRef):
    """An image carried in the row itself, as a `data:` URI (OpenAI's and ms-swift's rows): decoded from base64
    when the row is read, opened from memory like an image stored in a dataset."""

    __slots__ = ("data", "digest")

    def __init__(self, data: bytes):  # not ImageRef.__init__: it lies in no dataset
        self.data, self.digest = data, hashlib.sha256(data).hexdigest()

    def __getstate__(self):
        return self.data

    def __setstate__(self, state) -> None:
        self.__init__(state)

    def read(self) -> tuple[bytes | None, str | None]:
        return self.data, None

    def __eq__(self, other) -> bool:
        return isinstance(other, InlineImage) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __str__(self) -> str:
        return f"the data: URI of {len(self.data)} bytes (sha256 {self.digest[:12]})"


def decode_data_uri(uri: str, where: str) -> InlineImage:
    """`data:[<media type>];base64,<data>` as an InlineImage; anything else is the row's error."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise DataError(f"{where}: a data: URI must be `data:<type>;base64,<data>`; got {uri[:40]!r}")
    try:
        return InlineImage(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: the data: URI {uri[:40]!r}... is not valid base64") from None
