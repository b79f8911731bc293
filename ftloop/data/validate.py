"""The check ftloop.train runs before it builds the model: every row read, every image opened, every
row's token length measured, split across the ranks and gathered, so that a bad row stops the run in
seconds instead of at step 5000, and so that batches can be grouped by length. What it found is kept in
--output-dir (ftloop.data.length_cache), so a resumed run with the same data and flags skips it."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ftloop.data.chat import ChatFormat
from ftloop.data.encode import measure_row
from ftloop.data.formats import load_rows
from ftloop.data.length_cache import Found, cache_folder, cached_found
from ftloop.data.rows import row_number
from ftloop.distributed import World
from ftloop.errors import DataError, DataErrors


@dataclass
class CheckedRows:
    rows: list[dict]  # the rows training will use
    lengths: list[int]  # their token lengths, images included
    skipped_bad: int  # rows dropped by --skip-bad-rows
    dropped_long: int  # rows dropped for being longer than --max-seq-length


def checked_rows(path: str, image_folder: str, tokenizer, image_processor, chat: ChatFormat,
                 max_seq_length: int, truncation: str, skip_bad_rows: bool, max_images: int = 0,
                 loaded: tuple[list[dict], list[str]] | None = None, output_dir: str | None = None, *,
                 world: World) -> CheckedRows:
    """Rows of `path` that are sound, with their lengths. Collective: every rank measures every world-size-th
    row and all ranks exchange what they found, so they agree on the same rows. A row with more than
    `max_images` images (0: no limit) is a bad row. `loaded`: (rows, their reading errors) already read
    from `path` (ftloop.data.loaders.read_sources), instead of reading it here. `output_dir`: the run's
    --output-dir, where what was found is kept and, when the data, tokenizer and flags are the same, read back
    instead of measured again (ftloop.data.length_cache: a resumed run skips the check); None: always measure."""
    errors: list[str] = []
    if loaded is None:
        rows = load_rows(path, image_folder, errors=errors)
    else:
        rows, errors = loaded[0], list(loaded[1])
    # With --truncation right, text after the last image can be cut: only the images must fit.
    limit = max_seq_length if truncation == "right" else None
    found, entry = None, None
    if output_dir is not None:
        flags = {"system_prompt": chat.system_prompt, "timestamped_videos": chat.timestamped_videos, "limit": limit,
                 "max_images": max_images}
        found, entry = cached_found(cache_folder(output_dir), path, rows, tokenizer, image_processor, flags, world)
    if found is None:
        found = _measured(rows, path, tokenizer, image_processor, chat, limit, max_images, world)
        if entry is not None:  # before any bad row stops the run: a rerun with --skip-bad-rows reuses it
            entry.save(found)
    errors += [found[i] for i in sorted(found) if isinstance(found[i], str)]
    errors.sort(key=row_number)
    if errors and not skip_bad_rows:
        count = f"{len(errors)} bad row" + ("s" if len(errors) > 1 else "")
        raise DataErrors(errors, f"{path}: {count}; fix, or pass --skip-bad-rows to train without them")
    kept, lengths, dropped_long = [], [], 0
    for index in sorted(found):
        length = found[index]
        if isinstance(length, str):
            continue
        if length > max_seq_length and truncation == "drop":
            dropped_long += 1
            continue
        kept.append(rows[index])
        lengths.append(min(length, max_seq_length))
    return CheckedRows(kept, lengths, len(errors), dropped_long)


def _measured(rows: list[dict], path: str, tokenizer, image_processor, chat: ChatFormat, limit: int | None,
              max_images: int, world: World) -> Found:
    """Each row's token length or one-line error, every world-size-th row on each rank, gathered on all."""
    found = {}
    for index in range(world.rank, len(rows), world.world_size):
        try:
            found[index] = measure_row(rows[index], tokenizer, image_processor, chat, limit, path,
                                       max_images)
        except DataError as err:
            found[index] = str(err)
    if world.world_size > 1:
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, found)
        found = {k: v for part in gathered for k, v in part.items()}
    return found
