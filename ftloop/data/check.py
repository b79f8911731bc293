"""Data preflight: `python -m ftloop.data.check --train-data FILE [--eval-data FILE] --model-name-or-path DIR`.

Reads every row, opens every image and video frame, runs the model's image processor and tokeniser exactly
as training does, and prints per file: rows, images, videos, text-only rows, token-length percentiles, rows over
--max-seq-length and every problem as one `FILE: row N: problem` line. Exit 0 when there is none, 2 otherwise.
It takes ftloop.train's data flags (the same names, defaults and checks), so that a training command's data
flags paste as they are; --eval-ratio, --truncation, --skip-bad-rows, --group-by-length, --packing,
--max-tokens-per-batch, --max-eval-samples and --dataloader-num-workers shape training only and leave the
check unchanged. Rows are measured in worker
processes (--workers, default: the CPU count). The work is ftloop.data.preflight's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import tyro

from ftloop.cli import run_command
from ftloop.config import DataArgs, check_model_path
from ftloop.data.chat import chat_format
from ftloop.data.encode import load_model_type, load_tokenizer_and_processor
from ftloop.data.preflight import Measuring, check_file, make_pool
from ftloop.data.sources import check_sources
from ftloop.errors import ConfigError, one_line


@dataclass
class CheckCommand:
    model_name_or_path: str = ""
    """Qwen2.5-VL, Qwen2-VL or Qwen3-VL folder, or a hub id: its tokenizer and image processor measure the rows."""
    data: DataArgs = field(default_factory=DataArgs)
    workers: int = os.cpu_count() or 1
    """Worker processes that measure rows (default: the CPU count); 1 measures in this process."""


def main(argv: list[str] | None = None) -> int:
    """Print every file's report and every problem; 2 when there is any (ftloop.cli.run_command leaves with it)."""
    args = tyro.cli(CheckCommand, args=argv, config=(tyro.conf.OmitArgPrefixes,), prog="python -m ftloop.data.check",
                    description=__doc__.split("\n\n")[0])
    data, model = args.data, args.model_name_or_path
    check_model_path(model)
    data.check()
    check_sources(data)
    if args.workers <= 0:
        raise ConfigError("--workers must be positive")
    try:  # fail once, here, not per worker
        model_type = load_model_type(model)
        load_tokenizer_and_processor(model, data.min_pixels, data.max_pixels)
    except ConfigError:  # an unknown family; --min-pixels / --max-pixels against the checkpoint's
        raise
    except Exception as err:  # noqa: BLE001 - offline hub id, broken tokenizer files, ...
        raise ConfigError(f"--model-name-or-path {model}: cannot load the tokenizer and image processor "
                          f"({one_line(err)})") from None

    files = [(path, split) for path, split in ((data.train_data, "train"), (data.eval_data, "eval")) if path]
    settings = Measuring(model, chat_format(data.system_prompt, model_type), data.max_seq_length, data.min_pixels,
                         data.max_pixels, data.max_images_per_sample)
    pool = make_pool(args.workers, settings) if args.workers > 1 else None
    try:
        reports = [check_file(path, settings, data.image_folder, pool, data.data_format, split)
                   for path, split in files]
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
    run_command(main)
