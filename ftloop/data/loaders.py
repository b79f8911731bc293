"""DataLoaders for training and evaluation on one rank, the held-out split of --eval-ratio, and each optimizer step's
micro-batches counted across the ranks (`StepBatches`)."""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from ftloop.config import Config
from ftloop.data.batches import EvalDataset, PackedRows, SFTDataset, eval_batches, make_collate, make_packed_collate
from ftloop.data.check import CheckedRows, Measuring, checked_rows
from ftloop.data.encode import ChatFormat, chat_format
from ftloop.data.layouts import load_rows
from ftloop.data.positions import HostRopeIndex
from ftloop.data.rows import Row
from ftloop.data.sampler import StepBatchSampler
from ftloop.distributed import World, all_gather_rows, print0
from ftloop.errors import ConfigError, DataError, RowFailedMidRun, Stopped
from ftloop.flops import batch_work
from ftloop.loss import supervised_tokens
from ftloop.signals import StopRequest, ignore_stop_signals, stop_signals_held


def _collate_for(tokenizer, hf_config, make=make_collate):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make(pad_id, hf_config.image_token_id, getattr(hf_config, "video_token_id", None),
                HostRopeIndex(hf_config))


def _loader(dataset, batch_sampler, collate, workers: int, world: World) -> DataLoader:
    # Every iter() of a DataLoader draws its workers' base seed from `generator`, by default torch's global
    # one, which also drives dropout: a resumed run, whose loaders start at another point, would then draw
    # other dropout masks than the uninterrupted run (the checkpoint restores the global generator). Their own
    # generator keeps them off it; the rows do not depend on it (the batch sampler is seeded on its own).
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=world.device.type == "cuda",
                      worker_init_fn=ignore_stop_signals,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(0))


def hold_out(rows: list[Row], ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) for --eval-ratio.

    The rule: of the n rows read without error, k = max(1, round(ratio * n)) (halves round up, k <= n) are
    held out, namely the indices `random.Random(seed).sample(range(n), k)`; both parts keep the source's row
    order. It depends on nothing but the rows and --seed, so every rank and every world size gets the same
    split. It is made on the rows as read, before the token-length check: a row dropped later (too long,
    bad with --skip-bad-rows) leaves its own side, and no row moves across.
    """
    n = len(rows)
    k = min(n, max(1, int(ratio * n + 0.5)))
    held = set(random.Random(seed).sample(range(n), k))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


class SourceRows(NamedTuple):
    rows: list[Row]  # the rows read without error
    errors: list[str]  # one line per row that could not be read


def read_sources(cfg: Config) -> tuple[SourceRows, SourceRows | None]:
    """(training rows, evaluation rows or None): --eval-data, or the rows --eval-ratio holds out of
    --train-data (their reading errors are reported with the training rows)."""
    data = cfg.data
    train = _read(cfg, data.train_data, "train")
    if data.eval_data:
        return train, _read(cfg, data.eval_data, "eval")
    if data.eval_ratio <= 0:
        return train, None
    kept, held = hold_out(train.rows, data.eval_ratio, cfg.train.seed)
    print0(f"{data.train_data}: --eval-ratio {data.eval_ratio}: {len(held)} of {len(train.rows)} rows held out "
           "for evaluation")
    return SourceRows(kept, train.errors), SourceRows(held, [])


def _read(cfg: Config, path: str, split: str) -> SourceRows:
    errors: list[str] = []
    return SourceRows(load_rows(path, cfg.data.image_folder, errors, cfg.data.data_format, split), errors)


def check(cfg: Config, path: str, read: SourceRows, tokenizer, image_processor, chat: ChatFormat,
          world: World) -> CheckedRows:
    """Every row read from `path` measured across the ranks (or read back from the cache in --output-dir, as on
    a resume with the same data and flags); what was dropped is said once."""
    data = cfg.data
    measuring = Measuring(tokenizer, image_processor, chat, data.max_seq_length, data.truncation,
                          data.max_images_per_sample, data.video)
    checked = checked_rows(path, read.rows, read.errors, measuring, data.skip_bad_rows, world, cfg.train.output_dir)
    if checked.skipped_bad or checked.dropped_long:
        print0(f"{path}: using {len(checked.rows)} rows; skipped {checked.skipped_bad} bad rows and "
               f"{checked.dropped_long} rows longer than --max-seq-length {data.max_seq_length}")
    return checked


def build_loaders(cfg: Config, tokenizer, image_processor, hf_config,
                  world: World) -> tuple[DataLoader, StepBatchSampler, DataLoader | None]:
    """(training loader, its sampler, evaluation loader or None), every row checked first."""
    data, train = cfg.data, cfg.train
    train_read, eval_read = read_sources(cfg)
    chat = chat_format(data.system_prompt, hf_config.model_type, data.empty_think)
    checked = check(cfg, data.train_data, train_read, tokenizer, image_processor, chat, world)
    if not checked.rows and checked.dropped_long:
        raise ConfigError(f"--train-data {data.train_data}: all {checked.dropped_long} readable rows are longer than "
                          f"--max-seq-length {data.max_seq_length}; raise it, or pass --truncation right to cut their "
                          "text after the last image")
    dataset = SFTDataset(checked.rows, tokenizer, image_processor, data.max_seq_length, chat, data.train_data,
                         data.video)
    sampler = StepBatchSampler(len(checked.rows), world.world_size, world.rank, train.per_device_train_batch_size,
                               train.gradient_accumulation_steps, train.seed, lengths=checked.lengths,
                               group_by_length=data.group_by_length, mega_steps=data.length_group_steps,
                               pack_tokens=data.sequence_tokens if data.packing else 0)
    collate = _collate_for(tokenizer, hf_config, make_packed_collate if data.packing else make_collate)
    train_loader = _loader(PackedRows(dataset) if data.packing else dataset, sampler, collate,
                           data.dataloader_num_workers, world)
    eval_loader = None
    if eval_read is not None:
        eval_loader = build_eval_loader(cfg, tokenizer, image_processor, hf_config, world, eval_read)
    return train_loader, sampler, eval_loader


def build_eval_loader(cfg: Config, tokenizer, image_processor, hf_config, world: World,
                      read: SourceRows | None = None) -> DataLoader | None:
    """The evaluation loader over `read` (default: the rows of --eval-data), or None."""
    data = cfg.data
    if read is None:
        if not data.eval_data:
            return None
        read = _read(cfg, data.eval_data, "eval")
    path = data.eval_data or data.train_data  # held-out rows keep their row numbers in --train-data
    chat = chat_format(data.system_prompt, hf_config.model_type, data.empty_think)
    rows = check(cfg, path, read, tokenizer, image_processor, chat, world).rows
    if data.max_eval_samples and len(rows) > data.max_eval_samples:
        print0(f"{path}: evaluating on the first {data.max_eval_samples} of {len(rows)} held-out rows "
               "(--max-eval-samples)")
        rows = rows[:data.max_eval_samples]
    if not rows:
        print0(f"{path}: no evaluation rows left; evaluation is off")
        return None
    dataset = EvalDataset(SFTDataset(rows, tokenizer, image_processor, data.max_seq_length, chat, path, data.video))
    batches = eval_batches(len(rows), world.world_size, world.rank, cfg.train.per_device_eval_batch_size)
    return _loader(dataset, batches, _collate_for(tokenizer, hf_config), data.dataloader_num_workers, world)


@dataclass
class Step:
    """One optimizer step's micro-batches on this rank, and what the step holds on every rank (one collective)."""
    micro_batches: list[dict]
    targets: torch.Tensor  # supervised tokens of the step on all ranks (at least 1): the loss denominator
    tokens: torch.Tensor  # [real tokens, positions (with padding)] on all ranks
    rank_balance: torch.Tensor  # how much longer the step took than if ranks shared the work evenly (1: even)
    data_wait: float  # seconds this rank waited for its micro-batches (the loader's workers did not keep up)
    work: torch.Tensor  # [sum of squared sequence lengths, vision patches] on all ranks: its FLOPs (ftloop.flops)


def count_step(micro_batches: list[dict], world: World, rounds: int, stop_signum: int = 0, row_failed: bool = False,
               data_wait: float = 0.0) -> tuple[Step, list[float]]:
    """What one optimizer step of `rounds` micro-batches per rank holds on every rank, and the ranks' votes
    ([ranks signalled with SIGTERM, with SIGINT, ranks whose row failed]), in one collective. Reading the votes
    waits for the last step to end on the device: one small stall per step, the price of every rank leaving
    together.

    The rank balance: FSDP's collectives make every rank wait for the slowest in each round, and a micro-batch's
    work grows with its positions, padding included; so it is the sum over rounds of the most positions any rank
    had, over the sum of the mean over ranks."""
    positions = [float(b["attention_mask"].numel()) for b in micro_batches]
    positions += [0.0] * (rounds - len(positions))  # a rank whose row failed
    work = [sum(values) for values in zip(*map(batch_work, micro_batches))] or [0.0, 0.0]
    ranks = all_gather_rows([sum(supervised_tokens(b["labels"]) for b in micro_batches),
                             sum(int(b["attention_mask"].sum()) for b in micro_batches), sum(positions),
                             float(stop_signum == signal.SIGTERM), float(stop_signum == signal.SIGINT),
                             float(row_failed), *work, *positions], world.device)
    counts = ranks[:, :8].sum(0)
    per_round = ranks[:, 8:]
    balance = per_round.max(0).values.sum() / per_round.mean(0).sum().clamp(min=1)
    return (Step(micro_batches, counts[0].clamp(min=1).float(), counts[1:3], balance, data_wait, counts[6:8]),
            counts[3:6].tolist())


class StepBatches:
    """The micro-batches of each optimizer step on this rank, epoch after epoch (each a new seeded permutation
    of the rows), counted across the ranks in one collective. The loader is first iterated at the first step,
    after a resume has set the sampler.

    The same collective carries every rank's vote to stop, so that the ranks leave together, after the same
    step, instead of one waiting for the others in FSDP's next all-gather: a stop signal on any rank
    (`stop`, ftloop.signals) raises `Stopped` on every rank (with the signal: SIGINT wins), a row that failed
    to load on any rank raises `RowFailedMidRun` on every rank (the failing rank's names the row)."""

    def __init__(self, loader: DataLoader, sampler: StepBatchSampler, accumulation: int, world: World,
                 stop: StopRequest):
        self.loader, self.sampler, self.accumulation = loader, sampler, accumulation
        self.world, self.stop = world, stop
        self.batches = None

    def next_step(self) -> Step:
        waiting_since = time.perf_counter()
        micro_batches, failed = [], None
        try:
            micro_batches = [self._next_micro_batch() for _ in range(self.accumulation)]
        except DataError as err:  # said in the vote below, so that the other ranks do not wait for this one
            failed = RowFailedMidRun(str(err))
        data_wait = time.perf_counter() - waiting_since
        step, (sigterm_votes, sigint_votes, failed_ranks) = count_step(micro_batches, self.world, self.accumulation,
                                                                       self.stop.signum, failed is not None, data_wait)
        if failed_ranks:
            raise failed or RowFailedMidRun.elsewhere(int(failed_ranks))
        if sigterm_votes or sigint_votes:  # every rank exits with the same signal's code
            raise Stopped(signal.SIGINT if sigint_votes else signal.SIGTERM)
        return step

    def _next_micro_batch(self) -> dict:
        if self.batches is None:
            with stop_signals_held():  # the workers start here
                self.batches = iter(self.loader)
        try:
            return next(self.batches)
        except StopIteration:  # end of the epoch; a step never spans two epochs
            self.sampler.set_epoch(self.sampler.epoch + 1)
            if self.sampler.steps_left_in_epoch == 0:  # packing: an epoch of fewer packs (the same on every rank)
                raise ConfigError(f"epoch {self.sampler.epoch} of --train-data packs into "
                                  f"{self.sampler.num_units} sequences, fewer than one global batch of "
                                  f"{self.sampler.global_batch}; lower --per-device-train-batch-size, "
                                  "--gradient-accumulation-steps or --max-tokens-per-batch")
            self.batches = iter(self.loader)
            return next(self.batches)
