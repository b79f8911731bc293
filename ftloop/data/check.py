"""The check of every row: read, every image and video frame opened and run through the model's image processor,
tokenised exactly as training does (ftloop.data.encode), measured. One check, in two places:

- before training (`checked_rows`, run by ftloop.data.loaders before the model loads), spread over the ranks,
  so that a bad row stops the run in seconds instead of at step 5000, and so that batches can be grouped by
  length; what it found is kept in --output-dir (ftloop.data.check_cache), so a resumed run skips it;
- on its own, `python -m ftloop.data.check --train-data FILE [--eval-data FILE] --model-name-or-path DIR`, spread
  over a pool of worker processes (--workers, default: the CPU count): it prints per file the rows, images,
  videos, text-only rows, token-length percentiles, rows over --max-seq-length and every problem as one
  `FILE: row N: problem` line in file order, and exits 2 when there is any. It takes ftloop.train's data flags
  (the same names, defaults and checks), so that a training command's data flags paste as they are;
  --eval-ratio, --skip-bad-rows, --group-by-length, --packing, --max-tokens-per-batch, --max-eval-samples and
  --dataloader-num-workers shape training only.

Both measure each row with `Measuring` (`measure_rows`), whose rule is training's: a row's length is its full
token count; under `--truncation right` a row whose images end past --max-seq-length is a problem (its text can be
cut, an image cannot); under `drop` (the default) such a row is only longer than the limit, like any other row
training drops (and counts). A row whose text holds one of the tokenizer's special tokens is a problem, and a
--system-prompt holding one is refused before any row is measured (ftloop.data.encode).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.pool
import os
from dataclasses import dataclass, field

import torch.distributed as dist
import tyro
from tqdm import tqdm

from ftloop.cli import run_command
from ftloop.config import DataArgs, VideoArgs, check_model_path
from ftloop.data.check_cache import Measured, cache_folder, cached_measurement
from ftloop.data.encode import (IMAGE_PAD, VIDEO_PAD, ChatFormat, chat_format, check_system_prompt, encode_row, measure,
                                vision_past_limit)
from ftloop.data.layouts import load_rows
from ftloop.data.rows import Row
from ftloop.data.sources import check_sources, read_mixture, row_number, where
from ftloop.distributed import World
from ftloop.errors import ConfigError, DataError, DataErrors, one_line
from ftloop.data.model_folder import read_model_folder
from ftloop.loss import IGNORE_INDEX

CHUNK = 64  # rows per task handed to a pool worker


@dataclass(frozen=True)
class Measuring:
    """How a row is measured: the model's tokenizer and image processor, the family's chat format, and the flags
    that decide what a problem is. Sent once to each pool worker."""
    tokenizer: object
    image_processor: object
    chat: ChatFormat
    max_seq_length: int = DataArgs.max_seq_length
    truncation: str = "drop"
    max_images: int = 0
    video: VideoArgs = field(default_factory=VideoArgs)

    def __post_init__(self):
        # a flag's problem, refused once before any row is measured (each row's own text: encode_row)
        check_system_prompt(self.chat, self.tokenizer)

    @property
    def limit(self) -> int | None:
        """The token a row's images must end before: --max-seq-length under `--truncation right`, where text after
        the last image is cut; none under `drop`, where a longer row is dropped whatever it holds."""
        return self.max_seq_length if self.truncation == "right" else None

    def __call__(self, row: Row, source: str) -> int | str | list:
        """The row's token length (uncut), or its one-line problem; a row with videos: [length, [[frames, tokens]
        of each video]]."""
        row_at = where(row.source or source, row.number)
        try:
            length, vision_end, videos = measure(row, self.tokenizer, self.image_processor, self.video, self.chat,
                                                 row_at, self.max_images)
        except DataError as err:
            return str(err)
        if self.limit is not None and vision_end >= self.limit:
            return vision_past_limit(row_at, length, vision_end, self.limit)
        return [length, videos] if videos else length


def measure_rows(rows: list[Row], source: str, measuring: Measuring,
                 across: World | multiprocessing.pool.Pool) -> Measured:
    """Every row measured, the work spread `across` the ranks of a World (each measures every world-size-th row,
    and every rank gets every result: collective) or a pool of worker processes (`make_pool`, made with the same
    `measuring`)."""
    measured = Measured()
    # the check of a large file takes minutes (2,400 rows: 43 s on 2 CPU processes): a bar on the first process
    progress = tqdm(total=len(rows), desc=f"checking {os.path.basename(source)}", unit="row", leave=False,
                    dynamic_ncols=True, disable=isinstance(across, World) and across.rank != 0)
    if isinstance(across, World):
        mine = {}
        for index in range(across.rank, len(rows), across.world_size):  # the bar counts rank 0's share x world
            mine[index] = measuring(rows[index], source)
            progress.update(across.world_size)
        progress.close()
        parts = [mine]
        if across.world_size > 1:
            parts = [None] * across.world_size
            dist.all_gather_object(parts, mine)
        for part in parts:
            for index, found in part.items():
                measured.add(index, found)
        return measured
    chunks = [(source, list(range(start, min(start + CHUNK, len(rows)))), rows[start:start + CHUNK])
              for start in range(0, len(rows), CHUNK)]
    for indices, results in across.imap(_measure_chunk, chunks):
        for index, found in zip(indices, results):
            measured.add(index, found)
        progress.update(len(indices))
    progress.close()
    return measured


_WORKER_MEASURING: list[Measuring] = []  # a pool worker's Measuring, set once by make_pool's initializer


def make_pool(workers: int, measuring: Measuring) -> multiprocessing.pool.Pool:
    return multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(measuring,))


def _start_worker(measuring: Measuring) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers already use every core
    import torch
    torch.set_num_threads(1)
    _WORKER_MEASURING[:] = [measuring]


def _measure_chunk(chunk: tuple[str, list[int], list[Row]]) -> tuple[list[int], list[int | str]]:
    source, indices, rows = chunk
    return indices, [_WORKER_MEASURING[0](row, source) for row in rows]


# ---- before training ------------------------------------------------------------------------------------------


@dataclass
class CheckedRows:
    rows: list[Row]  # the rows training will use
    lengths: list[int]  # their token lengths, images included (cut to --max-seq-length under --truncation right)
    skipped_bad: int  # rows dropped by --skip-bad-rows
    dropped_long: int  # rows dropped for being longer than --max-seq-length


def checked_rows(path: str, rows: list[Row], read_errors: list[str], measuring: Measuring, skip_bad_rows: bool,
                 world: World, output_dir: str | None = None) -> CheckedRows:
    """The rows of `path` (as read, with the lines of those that could not be) that are sound, with their lengths.
    Collective: the ranks measure a share each and agree on the same rows. `output_dir`: the run's --output-dir,
    where what was found is kept and, when the data, tokenizer and flags are the same, read back instead of
    measured again (a resumed run skips the check); None: always measure."""
    measured, entry = None, None
    if output_dir is not None:
        flags = {**dataclasses.asdict(measuring.chat), "limit": measuring.limit, "max_images": measuring.max_images,
                 "video": dataclasses.asdict(measuring.video)}
        measured, entry = cached_measurement(cache_folder(output_dir), path, rows, measuring.tokenizer,
                                             measuring.image_processor, flags, world)
    if measured is None:
        measured = measure_rows(rows, path, measuring, world)
        if entry is not None:  # before any bad row stops the run: a rerun with --skip-bad-rows reuses it
            entry.save(measured)
    errors = sorted(read_errors + list(measured.errors.values()), key=row_number)
    if errors and not skip_bad_rows:
        count = f"{len(errors)} bad row" + ("s" if len(errors) > 1 else "")
        raise DataErrors(errors, f"{path}: {count}; fix, or pass --skip-bad-rows to train without them")
    kept, lengths, dropped_long = [], [], 0
    for index, length in sorted(measured.lengths.items()):
        if length > measuring.max_seq_length and measuring.truncation == "drop":
            dropped_long += 1
            continue
        kept.append(rows[index])
        lengths.append(min(length, measuring.max_seq_length))
    return CheckedRows(kept, lengths, len(errors), dropped_long)


# ---- python -m ftloop.data.check ------------------------------------------------------------------------------


@dataclass
class Report:
    path: str
    rows: int = 0
    images: int = 0
    videos: int = 0
    text_only: int = 0
    video_frames: list[int] = field(default_factory=list)  # of each video measured, as fed (sampled, padded)
    video_tokens: list[int] = field(default_factory=list)
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
        if self.video_frames:
            lines.append(f"  per video: {min(self.video_frames)}-{max(self.video_frames)} frames, "
                         f"{min(self.video_tokens)}-{max(self.video_tokens)} tokens")
        lines.append(f"  {self.too_long} rows longer than --max-seq-length {self.max_seq_length}")
        lines.append(f"  {len(self.errors)} errors")
        return "\n".join(lines)


def report(path: str, measuring: Measuring, across: World | multiprocessing.pool.Pool, image_folder: str = "",
           data_format: str = "auto", split: str = "train") -> Report:
    """Every row of one file or dataset measured (`split`: "train" or "eval", the split a DatasetDict gives)."""
    result = Report(path, max_seq_length=measuring.max_seq_length)
    read_errors: list[str] = []
    try:
        rows = load_rows(path, image_folder, read_errors, data_format, split)
    except DataError as err:  # unreadable source, malformed .json array, unknown layout: no row can be read
        result.errors.append(str(err))
        return result
    result.rows = len(rows) + len(read_errors)
    result.images = sum(len(r.images) for r in rows)
    result.videos = sum(len(r.videos) for r in rows)
    result.text_only = sum(1 for r in rows if not r.images and not r.videos)
    measured = measure_rows(rows, path, measuring, across)
    result.lengths = [measured.lengths[i] for i in sorted(measured.lengths)]
    for index in sorted(measured.videos):
        for frames, tokens in measured.videos[index]:
            result.video_frames.append(frames)
            result.video_tokens.append(tokens)
    result.too_long = sum(length > measuring.max_seq_length for length in result.lengths)
    result.errors = sorted(read_errors + list(measured.errors.values()), key=row_number)
    return result


def shown(row: Row, measuring: Measuring, where: str) -> str:
    """A row as the model sees it, as LLaMA-Factory prints a sample before training: the rendered chat with its
    special tokens, each image's pad tokens as `<image WxH patches>` (merged patches, one token each) and each
    video's as `<video F frames, N tokens>` (a Qwen3-VL video: each frame group's, after its time), and what is
    learnt between `[[` and `]]`."""
    tensors, ids, labels = encode_row(row, measuring.tokenizer, measuring.image_processor, measuring.video,
                                      measuring.chat, where)
    tokenizer, merge = measuring.tokenizer, getattr(measuring.image_processor, "merge_size", 2)
    image_pad, video_pad = (tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD))
    grids = iter(tensors["image_grid_thw"].tolist() if "image_grid_thw" in tensors else [])
    temporal = getattr(measuring.image_processor, "temporal_patch_size", 2)
    # a block of video pads: a whole video, or (Qwen3-VL, timestamped) one group of `temporal` frames
    blocks = iter([t * temporal for t, _, _ in tensors["video_grid_thw"].tolist()] if "video_grid_thw" in tensors
                  and not measuring.chat.timestamped_videos else [])
    out, text, learnt, i = [], [], False, 0
    while i < len(ids):
        if (labels[i] != IGNORE_INDEX) != learnt or ids[i] in (image_pad, video_pad):
            out.append(tokenizer.decode(text))
            text = []
        if (labels[i] != IGNORE_INDEX) != learnt:
            learnt = not learnt
            out.append("[[" if learnt else "]]")
        if ids[i] in (image_pad, video_pad):
            end = i
            while end < len(ids) and ids[end] == ids[i]:
                end += 1
            if ids[i] == image_pad:
                _, height, width = next(grids)
                out.append(f"<image {width // merge}x{height // merge} patches>")
            else:
                out.append(f"<video {next(blocks, temporal)} frames, {end - i} tokens>")
            i = end
            continue
        text.append(ids[i])
        i += 1
    out.append(tokenizer.decode(text) + ("]]" if learnt else ""))
    supervised = sum(label != IGNORE_INDEX for label in labels)
    return f"--- {where} ({len(ids)} tokens, {supervised} learnt)\n" + "".join(out).rstrip("\n")


@dataclass
class CheckCommand:
    model_name_or_path: str = ""
    """Qwen2.5-VL, Qwen2-VL or Qwen3-VL folder, or a hub id: its tokenizer and image processor measure the rows."""
    data: DataArgs = field(default_factory=DataArgs)
    workers: int = os.cpu_count() or 1
    """Worker processes that measure rows (default: the CPU count); 1 measures in this process."""
    show: int = 0
    """Print the first N readable rows of each file as the model will see them (the rendered chat with its special
    tokens, media as `<image 12x8 patches>`, what is learnt between `[[` and `]]`), as LLaMA-Factory prints a
    sample before training."""


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
    if args.show < 0:
        raise ConfigError("--show must be 0 (no rows) or positive")
    try:
        hf_config, tokenizer, image_processor = read_model_folder(model, data.min_pixels, data.max_pixels)
        model_type = hf_config.model_type
    except ConfigError:  # an unknown family; --min-pixels / --max-pixels against the checkpoint's
        raise
    except Exception as err:  # noqa: BLE001 - offline hub id, broken tokenizer files, ...
        raise ConfigError(f"--model-name-or-path {model}: cannot load the tokenizer and image processor "
                          f"({one_line(err)})") from None

    # (source, its media folder, split): a mixture's sources each on their own (their weights shape training only)
    files = [(source.path, source.image_folder or data.image_folder, split) if mixed
             else (path, data.image_folder, split)
             for path, split in ((data.train_data, "train"), (data.eval_data, "eval")) if path
             for mixed in [read_mixture(path)] for source in (mixed or [None])]
    chat = chat_format(data.system_prompt, model_type, data.empty_think)
    measuring = Measuring(tokenizer, image_processor, chat, data.max_seq_length,
                          data.truncation, data.max_images_per_sample, data.video)
    across = make_pool(args.workers, measuring) if args.workers > 1 else World.single()
    try:
        reports = [report(path, measuring, across, folder, data.data_format, split) for path, folder, split in files]
    finally:
        if not isinstance(across, World):
            across.close()
            across.join()
    for found in reports:
        print(found.summary())
    for path, folder, split in files if args.show > 0 else []:
        print()
        rows = load_rows(path, folder, [], data.data_format, split)
        for row in rows[:args.show]:
            try:
                print(shown(row, measuring, where(path, row.number)))
            except DataError as err:  # reported with the others below
                print(f"--- {err}")
    total = sum(len(r.errors) for r in reports)
    if total:
        print()
        for found in reports:
            for line in found.errors:
                print(line)
    print(f"\ntotal: {total} errors in {len(files)} file{'s' if len(files) > 1 else ''}")
    return 2 if total else 0


if __name__ == "__main__":
    run_command(main)
