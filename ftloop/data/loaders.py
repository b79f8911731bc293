"""DataLoaders for training and evaluation on one rank."""

from __future__ import annotations

from torch.utils.data import DataLoader

from ftloop.config import Config
from ftloop.data.dataset import EvalDataset, SFTDataset, eval_batches, make_collate
from ftloop.data.sampler import StepBatchSampler
from ftloop.data.validate import CheckedRows, checked_rows
from ftloop.distributed import print0


def _collate_for(tokenizer, hf_config):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make_collate(pad_id, hf_config.image_token_id, getattr(hf_config, "video_token_id", None))


def _loader(dataset, batch_sampler, collate, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin,
                      prefetch_factor=4 if workers > 0 else None)


def check(cfg: Config, path: str, tokenizer, image_processor) -> CheckedRows:
    """Every row of `path` read and measured (across the ranks); what was dropped is said once."""
    d = cfg.data
    checked = checked_rows(path, d.image_folder, tokenizer, image_processor, d.system_prompt, d.max_seq_length,
                           d.truncation, d.skip_bad_rows)
    if checked.skipped_bad or checked.dropped_long:
        print0(f"{path}: using {len(checked.rows)} rows; skipped {checked.skipped_bad} bad rows and "
               f"{checked.dropped_long} rows longer than --max-seq-length {d.max_seq_length}")
    return checked


def build_train_loader(cfg: Config, tokenizer, image_processor, hf_config, world_size: int, rank: int,
                       pin: bool) -> tuple[DataLoader, StepBatchSampler]:
    d, t = cfg.data, cfg.train
    checked = check(cfg, d.train_data, tokenizer, image_processor)
    dataset = SFTDataset(checked.rows, tokenizer, image_processor, d.max_seq_length, d.system_prompt,
                         d.train_data)
    sampler = StepBatchSampler(len(checked.rows), world_size, rank, t.per_device_train_batch_size,
                               t.gradient_accumulation_steps, t.seed,
                               lengths=checked.lengths if d.group_by_length else None)
    loader = _loader(dataset, sampler, _collate_for(tokenizer, hf_config), d.dataloader_num_workers, pin)
    return loader, sampler


def build_eval_loader(cfg: Config, tokenizer, image_processor, hf_config, world_size: int, rank: int,
                      pin: bool) -> DataLoader | None:
    d = cfg.data
    if not d.eval_data:
        return None
    rows = check(cfg, d.eval_data, tokenizer, image_processor).rows
    dataset = EvalDataset(SFTDataset(rows, tokenizer, image_processor, d.max_seq_length, d.system_prompt,
                                     d.eval_data))
    batches = eval_batches(len(rows), world_size, rank, cfg.train.per_device_eval_batch_size)
    return _loader(dataset, batches, _collate_for(tokenizer, hf_config), d.dataloader_num_workers, pin)
