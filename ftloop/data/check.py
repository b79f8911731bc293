"""Data preflight: `python -m ftloop.data.check --train-data FILE [--eval-data FILE] --model-name-or-path DIR`.

Reads every row, opens every image, runs the model's image processor and tokeniser exactly as training
does, and prints per file: rows, images, text-only rows, token-length percentiles, rows over
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

from ftloop.data.chat import VISION_END, encode_chat
from ftloop.data.formats import DataError, load_rows
from ftloop.data.images import open_rgb

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # ftloop.config.DataArgs.system_prompt
CHUNK = 64  # rows per task handed to a worker


def _measure(row: dict, tokenizer, image_processor, system_prompt: str, where: str) -> tuple[int, int]:
    """(token length, index of the last `<|vision_end|>` or -1), as SFTDataset would tokenise the row."""
    counts = []
    if row["images"]:
        images = [open_rgb(path, where) for path in row["images"]]
        try:
            vision = image_processor(images=images, return_tensors="pt")
        except Exception as err:  # noqa: BLE001 - the processor's own complaint, on one line
            raise DataError(f"{where}: image processor failed ({str(err).strip().splitlines()[-1]})") from None
        counts = (vision["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
    input_ids, _ = encode_chat(row["messages"], counts, tokenizer, system_prompt)
    vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)
    last_image_end = max((i for i, t in enumerate(input_ids) if t == vision_end_id), default=-1)
    return len(input_ids), last_image_end


def measure_row(row: dict, tokenizer, image_processor, system_prompt: str, max_seq_length: int | None = None,
                source: str = "data") -> int:
    """Token length of one normalised row (images included); DataError (naming `source` and the row) for
    an unreadable image, or when max_seq_length is given and the row's images end past it (training could
    not truncate it)."""
    where = f"{source}: row {row.get('row', '?')}"
    length, last_image_end = _measure(row, tokenizer, image_processor, system_prompt, where)
    if max_seq_length is not None and last_image_end >= max_seq_length:
        raise DataError(f"{where}: {length} tokens and its images end at token "
                        f"{last_image_end + 1}, past --max-seq-length {max_seq_length}; raise it or shrink the images")
    return length


@dataclass
class Report:
    path: str
    rows: int = 0
    images: int = 0
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
        lines = [f"{self.path}: {self.rows} rows, {self.images} images, {self.text_only} text-only rows"]
        if self.lengths:
            p50, p90, p99 = (self.percentile(q) for q in (0.5, 0.9, 0.99))
            lines.append(f"  tokens: p50 {p50}  p90 {p90}  p99 {p99}  max {max(self.lengths)}")
        lines.append(f"  {self.too_long} rows longer than --max-seq-length {self.max_seq_length}")
        lines.append(f"  {len(self.errors)} errors")
        return "\n".join(lines)


# Per-worker state, set once by _init_worker (or by check_file for an in-process pass).
_STATE: dict = {}


def _load_tools(model: str):
    from transformers import AutoImageProcessor, AutoTokenizer
    return AutoTokenizer.from_pretrained(model), AutoImageProcessor.from_pretrained(model)


def _init_worker(model: str, system_prompt: str, max_seq_length: int, in_pool: bool = True) -> None:
    if in_pool:  # one thread per worker: the workers already use every core
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        import torch
        torch.set_num_threads(1)
    tokenizer, image_processor = _load_tools(model)
    _STATE.update(tokenizer=tokenizer, image_processor=image_processor, system_prompt=system_prompt,
                  max_seq_length=max_seq_length)


def _measure_chunk(chunk: list[tuple[str, dict]]) -> list[tuple[int | None, int, str | None]]:
    """(token length or None, n_images, error line or None) per (file, row)."""
    out = []
    for path, row in chunk:
        try:
            length, last_image_end = _measure(row, _STATE["tokenizer"], _STATE["image_processor"],
                                              _STATE["system_prompt"], f"{path}: row {row['row']}")
        except DataError as err:
            out.append((None, len(row["images"]), str(err)))
            continue
        error = None
        if last_image_end >= _STATE["max_seq_length"]:
            error = (f"{path}: row {row['row']}: {length} tokens and its images end at token {last_image_end + 1}, "
                     f"past --max-seq-length {_STATE['max_seq_length']}; training cannot truncate it")
        out.append((length, len(row["images"]), error))
    return out


def _row_number(message: str, path: str) -> int:
    match = re.match(re.escape(path) + r": row (\d+):", message)
    return int(match.group(1)) if match else 0


def check_file(path: str, model: str, image_folder: str = "", max_seq_length: int = 2048,
               system_prompt: str = DEFAULT_SYSTEM_PROMPT, workers: int | None = None, pool=None) -> Report:
    """Measure every row of one file. With `pool` (made by `make_pool`) the rows go to its workers;
    otherwise they are measured in this process (workers is then ignored)."""
    report = Report(path, max_seq_length=max_seq_length)
    load_errors: list[str] = []
    try:
        rows = load_rows(path, image_folder, errors=load_errors)
    except DataError as err:  # unreadable file or malformed .json array: no row can be read
        report.errors.append(str(err))
        return report
    report.rows = len(rows) + len(load_errors)
    report.images = sum(len(r["images"]) for r in rows)
    report.text_only = sum(1 for r in rows if not r["images"])
    chunks = [[(path, r) for r in rows[i:i + CHUNK]] for i in range(0, len(rows), CHUNK)]
    if pool is None:
        if not _STATE or _STATE.get("key") != (model, system_prompt, max_seq_length):
            _init_worker(model, system_prompt, max_seq_length, in_pool=False)
            _STATE["key"] = (model, system_prompt, max_seq_length)
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


def make_pool(workers: int, model: str, system_prompt: str, max_seq_length: int):
    return multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker,
                                                    initargs=(model, system_prompt, max_seq_length))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftloop.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-data", required=True, help="LLaVA-style .json or .jsonl file")
    parser.add_argument("--eval-data", default="", help="optional second file, checked the same way")
    parser.add_argument("--image-folder", default="",
                        help="image paths are relative to it (default: the data file's folder)")
    parser.add_argument("--model-name-or-path", required=True, help="Qwen2.5-VL folder or hub id")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: the CPU count); 1 measures in this process")
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"ftloop: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for flag, path in (("--train-data", args.train_data), ("--eval-data", args.eval_data)):
        if path and not os.path.isfile(path):
            fail(f"{flag} {path}: file not found")
    if args.image_folder and not os.path.isdir(args.image_folder):
        fail(f"--image-folder {args.image_folder}: folder not found")
    if args.max_seq_length <= 0:
        fail("--max-seq-length must be positive")
    if args.workers <= 0:
        fail("--workers must be positive")
    model = args.model_name_or_path
    looks_local = model.startswith((os.sep, ".", "~")) or model.count("/") > 1
    if (looks_local or os.path.exists(model)) and not os.path.isfile(os.path.join(model, "config.json")):
        fail(f"--model-name-or-path {model}: no config.json there; give a Hugging Face model folder")
    try:
        _load_tools(model)  # fail once, here, rather than in every worker
    except Exception as err:  # noqa: BLE001 - offline hub id, broken tokenizer files, ...
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"--model-name-or-path {model}: cannot load the tokenizer and image processor ({message})")

    files = [p for p in (args.train_data, args.eval_data) if p]
    pool = make_pool(args.workers, model, args.system_prompt, args.max_seq_length) if args.workers > 1 else None
    try:
        reports = [check_file(p, model, args.image_folder, args.max_seq_length, args.system_prompt, pool=pool)
                   for p in files]
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
