"""A reference to one image stored inside a Hugging Face dataset, resolved only when the image is opened.

A dataset with a `datasets.Image` column may hold gigabytes of encoded images. Reading its rows into the
normal form must not copy them into memory, so each image becomes an `ImageRef`: the dataset, a row index,
a column and a position in that column's list. The dataset is Arrow-backed and memory-mapped
(`load_from_disk`, `Dataset.from_file`, `Dataset.from_parquet` and `load_dataset` all give that), so it
pickles as its file names, and so does a reference: dataloader and check workers get them cheaply.

No `datasets` import here: `ftloop.data.images` imports this module, and plain-file runs should not pay
for it.
"""

from __future__ import annotations

import pickle
import uuid

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
