"""Data preflight: `python -m ftloop.data.check --train-data FILE [--eval-data FILE] --model-name-or-path DIR`.

Reads every row, opens every image and video frame, runs the model's image processor and tokeniser exactly
as training does, and prints per file: rows, images, videos, text-only rows, token-length percentiles, rows over
--max-seq-length and every problem as one `FILE: row N: problem` line. Exit 0 when there is none, 2 otherwise.
Rows are measured in worker processes (--workers, default: the CPU count).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass, field

from ftloop.config import ConfigError
from ftloop.data.chat import VISION_END, encode_chat, vision_past_limit
from ftloop.data.formats import DATA_FORMATS, DataError, load_rows, source_problem
from ftloop.data.vision import load_image_processor, row_vision_inputs

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # ftloop.config.DataArgs.system_prompt
CHUNK = 64  # rows per task handed to a worker


def _measure(row: dict, tokenizer, image_processor, system_prompt: str, where: str,
             max_images: int = 0) -> tuple[int, int]:
    """(token length, index of the last `<|vision_end|>` or -1), as SFTDataset would tokenise the row (its
    videos included). A row with more than `max_images` images (0: no limit; videos do not count) is a
    DataError."""
    if max_images and len(row["images"]) > max_images:
        raise DataError(f"{where}: {len(row['images'])} images, more than --max-images-per-sample {max_images}")
    _, image_counts, video_counts = row_vision_inputs(row, image_processor, where)
    input_ids, _ = encode_chat(row["messages"], image_counts, tokenizer, system_prompt, video_counts)
    vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)
    last_image_end = max((i for i, t in enumerate(input_ids) if t == vision_end_id), default=-1)
    return len(input_ids), last_image_end


def measure_row(row: dict, tokenizer, image_processor, system_prompt: str, max_seq_length: int | None = None,
                source: str = "data", max_images: int = 0) -> int:
    """Token length of one normalised row (images and videos included); DataError (naming `source` and the
    row) for an unreadable image or frame, more than `max_images` images (0: no limit), or when
    max_seq_length is given and the row's images or videos end past it (training could not truncate it)."""
    where = f"{source}: row {row.get('row', '?')}"
    length, last_image_end = _measure(row, tokenizer, image_processor, system_prompt, where, max_images)
    if max_seq_length is not None and last_image_end >= max_seq_length:
        raise DataError(vision_past_limit(where, length, last_image_end, max_seq_length))
    return length


@dataclass
class Report:
    path: str
    rows: int = 0
    images: int = 0
    videos: int = 0
    text_only: int = 0
    too_long: int = 0
    max_seq_length: int = 2048
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


# Per-worker state, set once by _init_worker (or by check_file for an in-process pass).
_STATE: dict = {}


def _load_tools(model: str, min_pixels: int | None = None, max_pixels: int | None = None):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model), load_image_processor(model, min_pixels, max_pixels)


def _init_worker(model: str, system_prompt: str, max_seq_length: int, in_pool: bool = True,
                 min_pixels: int | None = None, max_pixels: int | None = None, max_images: int = 0) -> None:
    if in_pool:  # one thread per worker: the workers already use every core
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        import torch
        torch.set_num_threads(1)
    tokenizer, image_processor = _load_tools(model, min_pixels, max_pixels)
    _STATE.update(tokenizer=tokenizer, image_processor=image_processor, system_prompt=system_prompt,
                  max_seq_length=max_seq_length, max_images=max_images)


def _measure_chunk(chunk: list[tuple[str, dict]]) -> list[tuple[int | None, int, str | None]]:
    """(token length or None, n_images, error line or None) per (file, row)."""
    out = []
    for path, row in chunk:
        try:
            length, last_image_end = _measure(row, _STATE["tokenizer"], _STATE["image_processor"],
                                              _STATE["system_prompt"], f"{path}: row {row['row']}",
                                              _STATE["max_images"])
        except DataError as err:
            out.append((None, len(row["images"]), str(err)))
            continue
        error = None
        if last_image_end >= _STATE["max_seq_length"]:
            error = vision_past_limit(f"{path}: row {row['row']}", length, last_image_end, _STATE["max_seq_length"])
        out.append((length, len(row["images"]), error))
    return out


def _row_number(message: str, path: str) -> int:
    match = re.match(re.escape(path) + r": row (\d+):", message)
    return int(match.group(1)) if match else 0


def check_file(path: str, model: str, image_folder: str = "", max_seq_length: int = 2048,
               system_prompt: str = DEFAULT_SYSTEM_PROMPT, workers: int | None = None, pool=None,
               min_pixels: int | None = None, max_pixels: int | None = None, max_images: int = 0,
               data_format: str = "auto", split: str = "train") -> Report:
    """Measure every row of one file or dataset (`split`: "train" or "eval", the split a DatasetDict gives).
    With `pool` (made by `make_pool` with the same settings) the rows go to its workers; otherwise they are
    measured in this process (workers is then ignored)."""
    report = Report(path, max_seq_length=max_seq_length)
    load_errors: list[str] = []
    try:
        rows = load_rows(path, image_folder, load_errors, data_format, split)
    except DataError as err:  # unreadable source, malformed .json array, unknown layout: no row can be read
        report.errors.append(str(err))
        return report
    report.rows = len(rows) + len(load_errors)
    report.images = sum(len(r["images"]) for r in rows)
    report.videos = sum(len(r.get("videos", [])) for r in rows)
    report.text_only = sum(1 for r in rows if not r["images"] and not r.get("videos"))
    chunks = [[(path, r) for r in rows[i:i + CHUNK]] for i in range(0, len(rows), CHUNK)]
    if pool is None:
        key = (model, system_prompt, max_seq_length, min_pixels, max_pixels, max_images)
        if not _STATE or _STATE.get("key") != key:
            _init_worker(model, system_prompt, max_seq_length, False, min_pixels, max_pixels, max_images)
            _STATE["key"] = key
        results = map(_measure_chunk, chunks)
    else:
        results = pool.imap(_measure_chunk, chunks)
    measured = [r for chunk in results for r in chunk]
    errors = list(load_errors)
    for length, _, error in measured:
        if length is not None:
            report.lengths.append(length)
            report.too_long += length > max_seq_length
        if error is not None:
            errors.append(error)
    report.errors = sorted(errors, key=lambda message: _row_number(message, path))  # stable: one row's in order
    return report


def make_pool(workers: int, model: str, system_prompt: str, max_seq_length: int, min_pixels: int | None = None,
              max_pixels: int | None = None, max_images: int = 0):
    return multiprocessing.get_context("fork").Pool(
        workers, initializer=_init_worker,
        initargs=(model, system_prompt, max_seq_length, True, min_pixels, max_pixels, max_images))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftloop.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-data", required=True,
                        help=".json/.jsonl file, Hugging Face dataset folder, .parquet/.arrow file or hub dataset name")
    parser.add_argument("--eval-data", default="",
                        help="optional second source, checked the same way (a DatasetDict gives its validation, "
                             "else test split)")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                        help="row layout: llava (`conversations`) or messages; auto tells it from the first rows")
    parser.add_argument("--image-folder", default="",
                        help="image paths are relative to it (default: the data file's folder)")
    parser.add_argument("--model-name-or-path", required=True, help="Qwen2.5-VL folder or hub id")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="smallest resized image / frame area (default: the checkpoint's preprocessor config)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest resized image / frame area (default: the checkpoint's preprocessor config)")
    parser.add_argument("--max-images-per-sample", type=int, default=0,
                        help="rows with more images are errors (videos do not count); 0: no limit")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: the CPU count); 1 measures in this process")
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"ftloop: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for flag, path in (("--train-data", args.train_data), ("--eval-data", args.eval_data)):
        problem = source_problem(path) if path else None
        if problem:
            fail(f"{flag} {path}: {problem}")
    if args.image_folder and not os.path.isdir(args.image_folder):
        fail(f"--image-folder {args.image_folder}: folder not found")
    if args.max_seq_length <= 0:
        fail("--max-seq-length must be positive")
    if args.workers <= 0:
        fail("--workers must be positive")
    if args.max_images_per_sample < 0:
        fail("--max-images-per-sample must be 0 (no limit) or positive")
    model = args.model_name_or_path
    looks_local = model.startswith((os.sep, ".", "~")) or model.count("/") > 1
    if (looks_local or os.path.exists(model)) and not os.path.isfile(os.path.join(model, "config.json")):
        fail(f"--model-name-or-path {model}: no config.json there; give a Hugging Face model folder")
    try:
        _load_tools(model, args.min_pixels, args.max_pixels)  # fail once, here, rather than in every worker
    except ConfigError as err:  # --min-pixels / --max-pixels
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - offline hub id, broken tokenizer files, ...
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"--model-name-or-path {model}: cannot load the tokenizer and image processor ({message})")

    files = [(p, split) for p, split in ((args.train_data, "train"), (args.eval_data, "eval")) if p]
    vision = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels, max_images=args.max_images_per_sample)
    pool = (make_pool(args.workers, model, args.system_prompt, args.max_seq_length, **vision)
            if args.workers > 1 else None)
    try:
        reports = [check_file(p, model, args.image_folder, args.max_seq_length, args.system_prompt, pool=pool,
                              data_format=args.data_format, split=split, **vision) for p, split in files]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for report in reports:
        print(report.summary())
    total = sum(len(r.errors) for r in reports)
    if total:
        print()
        for report in reports:
            for line in report.errors:
                print(line)
    print(f"\ntotal: {total} errors in {len(files)} file{'s' if len(files) > 1 else ''}")
    return 2 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
