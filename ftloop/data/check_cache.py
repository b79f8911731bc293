"""The cache of the check before training (ftloop.data.check): what it found for each row (a token length with the
frames and tokens of each of its videos, or the row's one-line error), kept in the run's --output-dir so that a
resumed run does not open every image and tokenise every row again.

A cache file holds the key it was made under and is used only when the key is the same again. The key is
everything the measurement depends on:

- the data source's fingerprint: size, mtime and a hash of the first and last MiB of the file, or of every
  file of a dataset folder (a hub dataset name is not fingerprinted, so never cached);
- the rows as read, hashed: their text, row numbers and order (so --eval-ratio's held-out rows and the rows
  it keeps are told apart), resolved image, frame and video file paths with each file's size and mtime (so an
  image or video replaced in place counts), and for an image stored in a dataset, that dataset's files (so the splits of
  one folder are told apart). --image-folder and --data-format act through these rows;
- the tokenizer (its class, name, size and serialised vocabulary) and the image processor's settings
  (`to_dict`, which holds the pixel limits);
- the rest of what measuring depends on (ftloop.data.check.Measuring): --system-prompt, the length limit it
  enforces (--max-seq-length, only under --truncation right: with `drop` the lengths are measured uncut and the
  limit applied after, so a changed --max-seq-length reuses them), --max-images-per-sample and the video flags
  (--video-fps, ...);
- the code that measures (ftloop's data package and the transformers version): a fix there must not be
  hidden by lengths measured before it.

--skip-bad-rows is not in the key: the cache holds what was found, before anything is skipped, so a run
refused for bad rows and started again with --skip-bad-rows reuses the check.

The decision is collective: rank 0 reads the cache and shares what it found, so every rank either measures (a miss)
or skips (a hit) together; after a miss, rank 0 writes the gathered result.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field

import transformers

from ftloop.data.rows import Row
from ftloop.data.sources import ImageRef, InlineImage, dataset_info_entry, read_mixture
from ftloop.distributed import World, agree, print0

FORMAT = 2  # bump when the file's layout or the key's meaning changes
EDGE_BYTES = 1 << 20  # hashed at each end of a data file: catches an edit that keeps the size and mtime
_CODE = os.path.dirname(os.path.abspath(__file__))  # ftloop/data: the code that reads and measures rows


@dataclass
class Measured:
    """What measuring found, by index in the rows measured: a token length, or one problem line."""
    lengths: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    videos: dict[int, list[list[int]]] = field(default_factory=dict)
    """[frames, tokens] of each video of the rows that have videos."""

    def add(self, index: int, found: int | str | list) -> None:
        """`found`: a length, a problem line, or [length, [[frames, tokens] of each video]]."""
        if isinstance(found, list):
            found, self.videos[index] = found
        if isinstance(found, str):
            self.errors[index] = found
        else:
            self.lengths[index] = found


def cache_folder(output_dir: str) -> str:
    """Where a run keeps its row-check caches, one file per data source."""
    return os.path.join(output_dir, ".ftloop", "row_lengths")


def _file_digest(path: str) -> list:
    """[size, mtime_ns, sha256 of the first and last MiB]: cheap at any size, and unlike the size and mtime
    alone it sees a same-size edit whose mtime was kept (a copy with `cp -p`, a restored backup)."""
    stat = os.stat(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        sha.update(f.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            sha.update(f.read(EDGE_BYTES))
    return [stat.st_size, stat.st_mtime_ns, sha.hexdigest()]


def source_fingerprint(path: str) -> str | None:
    """A digest of a data file, or of a dataset folder's files (sorted); None for a hub dataset name, whose
    rows may change with each download: it is always checked. OSError when the source cannot be read."""
    mixed = read_mixture(path)
    if mixed is not None:  # the file (weights, folders) and every source's own fingerprint
        parts = [source_fingerprint(source.path) for source in mixed]
        return None if None in parts else hashlib.sha256(json.dumps([_file_digest(path), parts]).encode()).hexdigest()
    listed = dataset_info_entry(path)
    if listed is not None:  # LLaMA-Factory's entry (its column names) and its data file
        return hashlib.sha256(json.dumps([listed[1], _file_digest(listed[0])]).encode()).hexdigest()
    if os.path.isfile(path):
        return hashlib.sha256(json.dumps(_file_digest(path)).encode()).hexdigest()
    if not os.path.isdir(path):
        return None
    listing = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            listing.append([os.path.relpath(full, path), *_file_digest(full)])
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _image_identity(image, dataset_files: dict) -> list:
    """What an image's token count depends on, besides the processor: for a file, its path, size and mtime
    (None when missing: the check reports it); for an image inside a dataset, the dataset's files and the
    cell (the bytes themselves are covered by the source's fingerprint)."""
    if isinstance(image, InlineImage):
        return ["data:", image.digest]
    if isinstance(image, ImageRef):
        key = id(image.source)
        if key not in dataset_files:
            dataset_files[key] = [f["filename"] for f in getattr(image.source.dataset, "cache_files", [])]
        return [dataset_files[key], image.index, image.column, image.position]
    try:
        stat = os.stat(image)
        return [image, stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [image, None]


def rows_digest(rows: list[Row]) -> str:
    """A digest of the rows as read (see the module docstring): one stat per image, as reading them did."""
    sha, dataset_files = hashlib.sha256(), {}
    for row in rows:
        row = dict(dataclasses.asdict(row), images=[_image_identity(i, dataset_files) for i in row.images],
                   videos=[[_image_identity(f, dataset_files) for f in video] if isinstance(video, list)
                           else _image_identity(video, dataset_files) for video in row.videos])
        sha.update(json.dumps(row, sort_keys=True, default=str).encode())
        sha.update(b"\n")
    return sha.hexdigest()


TOKENIZER_STATE = ("truncation", "padding")  # settings of the serialised tokenizer that its use changes


def tokenizer_fingerprint(tokenizer) -> dict:
    """The tokenizer's identity: a fast tokenizer serialises its whole vocabulary, merges and added tokens
    in milliseconds; a slow one gives its vocabulary. Without the truncation and padding settings: a call without
    them clears them (a tokenizer.json saved with padding on reads so until its first call), so the same tokenizer
    is the same before and after use. ftloop.data.model_folder compares the same identity when a run resumes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = json.loads(backend.to_str())
        for key in TOKENIZER_STATE:
            serialised.pop(key, None)
        text = json.dumps(serialised, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"class": type(tokenizer).__name__, "name_or_path": getattr(tokenizer, "name_or_path", ""),
            "size": len(tokenizer), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _code_digest() -> str:
    sha = hashlib.sha256(transformers.__version__.encode())
    for name in sorted(glob.glob(os.path.join(_CODE, "*.py"))):
        with open(name, "rb") as f:
            sha.update(f.read())
    return sha.hexdigest()


def _canonical(value) -> dict:
    """As it reads back from json (tuples become lists), so a key compares equal to its stored copy."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _file_name(path: str, rows: list[Row]) -> str:
    """One file per source and set of rows: the name of the source and a digest of its row numbers, so the
    rows --eval-ratio keeps and those it holds out (same source) have a file each, and a changed key
    overwrites its file rather than adding one."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(os.path.normpath(path)))[:60] or "data"
    numbers = json.dumps([path, [row.number for row in rows]], default=str).encode()
    return f"{stem}-{hashlib.sha256(numbers).hexdigest()[:16]}.json"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _found_value(value) -> bool:
    """A length, a problem line, or [length, [[frames, tokens], ...]] (Measured.add)."""
    if isinstance(value, list):
        return len(value) == 2 and _is_count(value[0]) and isinstance(value[1], list) and all(
            isinstance(v, list) and len(v) == 2 and all(map(_is_count, v)) for v in value[1])
    return isinstance(value, str) or _is_count(value)


@dataclass
class CacheEntry:
    """The cache file of one source's rows on rank 0, and the key it must hold."""
    file: str
    key: dict
    rows: int

    def load(self) -> Measured | None:
        """What the file holds when it was made under the same key; None for a missing, unreadable, corrupt
        or other-key file (a miss, never an error: the check runs and the file is written again)."""
        try:
            with open(self.file, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None
        lengths = saved.get("lengths")
        if not isinstance(lengths, list) or len(lengths) != self.rows or not all(map(_found_value, lengths)):
            return None
        measured = Measured()
        for index, found in enumerate(lengths):
            measured.add(index, found)
        return measured

    def save(self, measured: Measured) -> None:
        """Write `measured` (each row's length, or its error line) atomically (a temporary file in the same folder,
        then os.replace): a run killed while writing leaves the previous file or none, never half of one. A failed
        write is said and otherwise ignored: the cache only saves time, and the next run checks again."""
        folder, tmp = os.path.dirname(self.file), None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
            found = [measured.errors.get(i, measured.lengths.get(i)) for i in range(self.rows)]
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": self.key, "lengths": [[length, measured.videos[i]] if i in measured.videos
                                                        else length for i, length in enumerate(found)]}, f)
            os.replace(tmp, self.file)
        except OSError as err:
            print0(f"{self.file}: could not write the row check cache ({err.strerror or err}); the next run checks "
                   "the rows again")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def cache_entry(cache_dir: str, path: str, rows: list[Row], tokenizer, image_processor,
                flags: dict) -> CacheEntry | None:
    """The entry of `rows` read from `path`, or None when the source is not cached (a hub name) or cannot be
    fingerprinted. `flags`: what else changes what measuring finds."""
    try:
        fingerprint = source_fingerprint(path)
    except OSError:
        return None
    if fingerprint is None:
        return None
    key = {"format": FORMAT, "code": _code_digest(), "source": path, "fingerprint": fingerprint,
           "rows": rows_digest(rows), "tokenizer": tokenizer_fingerprint(tokenizer),
           "image_processor": image_processor.to_dict(), **flags}
    return CacheEntry(os.path.join(cache_dir, _file_name(path, rows)), _canonical(key), len(rows))


def cached_measurement(cache_dir: str, path: str, rows: list[Row], tokenizer, image_processor, flags: dict,
                       world: World) -> tuple[Measured | None, CacheEntry | None]:
    """(what the cache holds for these rows or None, the entry to write after a miss: rank 0 only).

    Collective: rank 0 alone reads the cache (and pays for the key) and shares what it found
    (ftloop.distributed.agree), so the ranks all skip the check or all run it, even if their views of
    --output-dir differ."""
    entry = None

    def read() -> Measured | None:
        nonlocal entry
        try:
            entry = cache_entry(cache_dir, path, rows, tokenizer, image_processor, flags)
            return entry.load() if entry is not None else None
        except Exception as err:  # noqa: BLE001 - a cache that cannot be used is a miss, never an error
            print0(f"{path}: the row check's cache is unusable ({type(err).__name__}: {err}); checking the rows")
            entry = None
            return None

    found = agree(world, read, "rank 0", share=True)
    if found is not None and entry is not None:  # rank 0, which holds the entry, speaks
        print0(f"{path}: row check cached in {entry.file} (same data, tokenizer and flags); skipping it")
    return found, entry
