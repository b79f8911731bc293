"""Rows of Hugging Face datasets: a `save_to_disk` folder (Dataset or DatasetDict), another local folder
`datasets.load_dataset` reads (a downloaded hub repository of parquet/json files), a .parquet or .arrow file,
or a hub name (`org/name`; needs the network or the Hugging Face cache).

Rows are in LLaVA (`conversations` + `image`) or messages (`messages` + `images`) layout and are
normalised like json rows (ftloop.data.formats). Only the columns those layouts use are read. Images in a
`datasets.Image` column are never decoded or copied here: an image stored as bytes becomes an `ImageRef`
(dataset, row, column, position) that `ftloop.data.images.open_rgb` reads when the dataloader needs it; an
image stored as a path only, or a string column, is a path resolved against --image-folder like a json
file's. Videos are frame-path strings (`video` / `videos` columns, or video parts).

Splits of a DatasetDict: --train-data reads `train` (or the only split); --eval-data reads `validation`,
else `test`, so the same folder can be given to both. Pick other splits by saving them on their own.
"""

from __future__ import annotations

import os

from ftloop.data.image_ref import ImageRef, ImageSource
from ftloop.data.sources import DATASET_SUFFIXES, looks_like_hub_id
from ftloop.errors import DataError, one_line

COLUMNS = ("conversations", "messages", "image", "images", "video", "videos", "video_fps")  # what the layouts read
EVAL_SPLITS = ("validation", "test")
BATCH = 1024  # rows per Arrow batch while reading


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
