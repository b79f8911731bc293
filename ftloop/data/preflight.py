"""Measuring every row of a source, in worker processes: the library behind `python -m ftloop.data.check`.

Each row is read, its images and video frames opened and run through the model's image processor, and it
is tokenised exactly as training does (ftloop.data.encode). `check_file` returns a `Report` per source:
rows, images, videos, text-only rows, token-length percentiles, rows over --max-seq-length, and every
problem as one `FILE: row N: problem` line in file order.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass, field

from ftloop.config import DataArgs
from ftloop.data.chat import ChatFormat, vision_past_limit
from ftloop.data.encode import load_tokenizer_and_processor, measure
from ftloop.data.formats import load_rows
from ftloop.data.rows import row_number, where
from ftloop.errors import DataError

CHUNK = 64  # rows per task handed to a worker


@dataclass
class Report:
    path: str
    rows: int = 0
    images: int = 0
    videos: int = 0
    text_only: int = 0
    too_long: int = 0
    max_seq_length: int = DataArgs.max_seq_length
    lengths: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> int | None:
        """Nearest-rank percentile of the token lengths (q in (0, 1])."""
        if not self.lengths:
            return None
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def summary(self) -> str:
        lines = [f"{self.path}: {self.rows} rows, {self.images} images, {self.videos} videos, "
                 f"{self.text_only} text-only rows"]
        if self.lengths:
            p50, p90, p99 = (self.percentile(q) for q in (0.5, 0.9, 0.99))
            lines.append(f"  tokens: p50 {p50}  p90 {p90}  p99 {p99}  max {max(self.lengths)}")
        lines.append(f"  {self.too_long} rows longer than --max-seq-length {self.max_seq_length}")
        lines.append(f"  {len(self.errors)} errors")
        return "\n".join(lines)


@dataclass(frozen=True)
class Measuring:
    """What measuring a row needs besides the row: sent to each worker once."""
    model: str
    chat: ChatFormat = ChatFormat()  # the family's (chat_format)
    max_seq_length: int = DataArgs.max_seq_length
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_images: int = 0


# Per-process tools, loaded once by _init_worker (or by check_file for an in-process pass).
_TOOLS: dict = {}


def _init_worker(settings: Measuring, in_pool: bool = True) -> None:
    if in_pool:  # one thread per worker: the workers already use every core
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        import torch
        torch.set_num_threads(1)
    tokenizer, image_processor = load_tokenizer_and_processor(settings.model, settings.min_pixels,
                                                              settings.max_pixels)
    _TOOLS.update(tokenizer=tokenizer, image_processor=image_processor, settings=settings)


def _measure_chunk(chunk: list[tuple[str, dict]]) -> list[tuple[int | None, str | None]]:
    """(token length or None, error line or None) per (file, row)."""
    settings: Measuring = _TOOLS["settings"]
    out = []
    for path, row in chunk:
        row_at = where(path, row["row"])
        try:
            length, vision_end = measure(row, _TOOLS["tokenizer"], _TOOLS["image_processor"],
                                         settings.chat, row_at, settings.max_images)
        except DataError as err:
            out.append((None, str(err)))
            continue
        error = None
        if vision_end >= settings.max_seq_length:
            error = vision_past_limit(row_at, length, vision_end, settings.max_seq_length)
        out.append((length, error))
    return out


def make_pool(workers: int, settings: Measuring):
    return multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(settings, True))


def check_file(path: str, settings: Measuring, image_folder: str = "", pool=None, data_format: str = "auto",
               split: str = "train") -> Report:
    """Measure every row of one file or dataset (`split`: "train" or "eval", the split a DatasetDict gives).
    With `pool` (made by `make_pool` with the same settings) the rows go to its workers; otherwise they are
    measured in this process."""
    report = Report(path, max_seq_length=settings.max_seq_length)
    load_errors: list[str] = []
    try:
        rows = load_rows(path, image_folder, load_errors, data_format, split)
    except DataError as err:  # unreadable source, malformed .json array, unknown layout: no row can be read
        report.errors.append(str(err))
        return report
    report.rows = len(rows) + len(load_errors)
    report.images = sum(len(r["images"]) for r in rows)
    report.videos = sum(len(r["videos"]) for r in rows)
    report.text_only = sum(1 for r in rows if not r["images"] and not r["videos"])
    chunks = [[(path, r) for r in rows[i:i + CHUNK]] for i in range(0, len(rows), CHUNK)]
    if pool is None:
        if _TOOLS.get("settings") != settings:
            _init_worker(settings, in_pool=False)
        results = map(_measure_chunk, chunks)
    else:
        results = pool.imap(_measure_chunk, chunks)
    errors = list(load_errors)
    for length, error in (r for chunk in results for r in chunk):
        if length is not None:
            report.lengths.append(length)
            report.too_long += length > settings.max_seq_length
        if error is not None:
            errors.append(error)
    report.errors = sorted(errors, key=row_number)  # stable: one row's problems stay in order
    return report
