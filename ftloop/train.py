"""Fine-tune a Qwen2.5-VL model with FSDP: `torchrun --nproc_per_node N -m ftloop.train [flags]`.

Read top to bottom: configuration, process group, data, model, optimizer, then the loop. Each optimizer
step takes `gradient_accumulation_steps` micro-batches per rank; the loss is the sum of token
cross-entropies divided by the number of supervised tokens of the whole step on all ranks, so the gradient
is the same however the global batch is split across processes and micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from tqdm import tqdm
from transformers import AutoImageProcessor, AutoTokenizer

from ftloop.config import Config, ConfigError, parse_args, validate
from ftloop.data.formats import DataError
from ftloop.data.loaders import build_eval_loader, build_train_loader
from ftloop.distributed import Dist, all_reduce_sum, fail, init_distributed, print0
from ftloop.fsdp.checkpoint import save_checkpoint
from ftloop.fsdp.export import export_model
from ftloop.fsdp.wrap import wrap_fsdp
from ftloop.metrics import MetricsLogger
from ftloop.model import (WRAPPER_PREFIX, VisionLanguageSFT, build_meta_model, load_config,
                          load_source_state, wrapped_layer_classes)
from ftloop.optim.build import build_optimizer
from ftloop.optim.schedule import build_lr_scheduler, warmup_steps_from_ratio


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def count_step_tokens(micro_batches: list[dict], d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(supervised tokens, [real tokens, padded positions]) of one optimizer step on all ranks. The first (at
    least 1) is the loss denominator. They stay on the device: reading them would stall every step."""
    counts = all_reduce_sum([sum(supervised_tokens(b) for b in micro_batches),
                             sum(int(b["attention_mask"].sum()) for b in micro_batches),
                             sum(b["attention_mask"].numel() for b in micro_batches)], d.device)
    return counts[0].clamp(min=1).float(), counts[1:]


def accumulate_gradients(model, micro_batches: list[dict], step_targets: torch.Tensor, d: Dist) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; returns the rank's summed token loss."""
    loss_sum = torch.zeros((), device=d.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Skip the gradient reduce-scatter on all but the last micro-batch; gradients accumulate locally.
        with contextlib.nullcontext() if last else model.no_sync():
            micro_loss, _ = model(**to_device(batch, d.device))
            # FSDP averages gradients over ranks; multiplying by world_size turns that into a sum.
            (micro_loss * (d.world_size / step_targets)).backward()
        loss_sum += micro_loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(model, loader, device: torch.device) -> float:
    """Token-weighted mean cross-entropy over the whole eval set, all ranks together."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        loss_sum, count = model(**to_device(batch, device))
        totals += torch.stack([loss_sum.double(), count.double()])
    model.train()
    totals = all_reduce_sum(totals, device)
    return float(totals[0] / totals[1].clamp(min=1))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class Setup:
    """Everything the loop needs, built in the order that fails fastest on bad input."""
    hf_config: object
    tokenizer: object
    image_processor: object
    train_loader: object
    sampler: object
    eval_loader: object
    model: FSDP
    total_steps: int


def prepare(cfg: Config, d: Dist) -> Setup:
    t, src = cfg.train, cfg.model.model_name_or_path
    torch.manual_seed(t.seed)
    hf_config = load_config(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(src)
    image_processor = AutoImageProcessor.from_pretrained(src)

    # Data before the model: a bad row should stop the run before minutes go into loading weights.
    pin = d.device.type == "cuda"
    train_loader, sampler = build_train_loader(cfg, tokenizer, image_processor, hf_config, d.world_size,
                                               d.rank, pin)
    eval_loader = build_eval_loader(cfg, tokenizer, image_processor, hf_config, d.world_size, d.rank, pin)
    if sampler.steps_per_epoch == 0:
        raise ConfigError(f"--train-data has {sampler.num_rows} rows, fewer than one global batch of "
                          f"{sampler.global_batch} (processes x --per-device-train-batch-size x "
                          "--gradient-accumulation-steps)")
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * sampler.steps_per_epoch)

    # Rank 0 reads the checkpoint; every rank receives it unit by unit while FSDP wraps the skeleton.
    hf_model = build_meta_model(hf_config, cfg.model)
    source = None
    if d.is_main:
        source = {WRAPPER_PREFIX + name: tensor for name, tensor in load_source_state(cfg.model).items()}
    model = wrap_fsdp(VisionLanguageSFT(hf_model), wrapped_layer_classes(hf_model), cfg.fsdp, source, d.device)
    return Setup(hf_config, tokenizer, image_processor, train_loader, sampler, eval_loader, model, total_steps)


def run(cfg: Config, d: Dist) -> dict:
    t = cfg.train
    s = prepare(cfg, d)
    model, sampler, total_steps = s.model, s.sampler, s.total_steps
    optimizer = build_optimizer(model, cfg.optim, d.device)
    warmup = warmup_steps_from_ratio(cfg.optim.warmup_ratio, total_steps)
    scheduler = build_lr_scheduler(optimizer, cfg.optim.lr_scheduler_type, warmup, total_steps)
    logger = MetricsLogger(t.output_dir, d.is_main, t.report_to, t.wandb_project_name, t.run_name,
                           cfg.to_dict())
    shards = 1 if cfg.fsdp.sharding_strategy == "NO_SHARD" else d.world_size
    n_params = sum(p.numel() for p in model.parameters()) * shards
    print0(f"ftloop: {d.world_size} process(es) on {d.device.type} ({d.backend}), ~{n_params / 1e6:.1f}M "
           f"parameters, {sampler.num_rows} train rows, {total_steps} steps of {sampler.global_batch} "
           f"sequences, warmup {warmup}")

    def export(name: str) -> None:
        src = cfg.model.model_name_or_path
        export_model(model, os.path.join(t.output_dir, name), s.hf_config, s.tokenizer, s.image_processor,
                     t.save_dtype, t.max_shard_size, src if os.path.isdir(src) else None)

    best = {"eval_loss": math.inf, "step": None, "shards": None}

    def run_eval(step: int) -> None:
        if s.eval_loader is None:
            return
        eval_loss = evaluate(model, s.eval_loader, d.device)
        improved = eval_loss < best["eval_loss"]
        if improved:
            # An exact host copy of this rank's shards, to load back at the end (load_best_model_at_end).
            best.update(eval_loss=eval_loss, step=step,
                        shards=[p.detach().to("cpu", copy=True) for p in model.parameters()])
            if step > 0:
                export("best")
        logger.log(step, {"eval_loss": eval_loss, "best_eval_loss": best["eval_loss"], "best_step": best["step"]})
        print0(f"step {step}: eval_loss {eval_loss:.4f}" + (" (best)" if improved else ""))

    if t.eval_on_start:
        run_eval(0)

    epoch, step = 0, 0
    tokens_seen = torch.zeros(2, dtype=torch.float64, device=d.device)  # real tokens, padded positions
    batches = iter(s.train_loader)

    def next_micro_batch() -> dict:
        nonlocal epoch, batches
        try:
            return next(batches)
        except StopIteration:  # end of epoch: a new seeded permutation
            epoch += 1
            sampler.set_epoch(epoch)
            batches = iter(s.train_loader)
            return next(batches)

    model.train()
    progress = tqdm(total=total_steps, disable=not d.is_main, desc="train", dynamic_ncols=True)
    # Sums over the steps since the last log line; read on the host only when logged.
    window = {"loss": torch.zeros((), device=d.device), "tokens": torch.zeros_like(tokens_seen), "steps": 0,
              "start": time.perf_counter()}
    while step < total_steps:
        micro_batches = [next_micro_batch() for _ in range(t.gradient_accumulation_steps)]
        step_targets, step_tokens = count_step_tokens(micro_batches, d)
        loss_sum = accumulate_gradients(model, micro_batches, step_targets, d)
        grad_norm = model.clip_grad_norm_(cfg.optim.max_grad_norm or math.inf)  # the global norm, logged
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        # This rank's share of the step's mean loss; summed over ranks only when logged.
        window["loss"] += loss_sum / step_targets
        window["tokens"] += step_tokens
        window["steps"] += 1
        progress.update(1)

        if step % t.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window["start"]
            record = {"loss": float(all_reduce_sum(window["loss"].view(1), d.device)) / window["steps"],
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_s": float(window["tokens"][0]) / elapsed, "step_time_s": elapsed / window["steps"],
                      "padding_ratio": 1 - float(window["tokens"][0] / window["tokens"][1]),
                      "peak_mem_gib": peak_memory_gib(d.device), "epoch": epoch, "tokens_seen": int(tokens_seen[0])}
            logger.log(step, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window = {"loss": torch.zeros_like(window["loss"]), "tokens": torch.zeros_like(tokens_seen), "steps": 0,
                      "start": time.perf_counter()}
        if step % t.eval_steps == 0 or step == total_steps:
            run_eval(step)
        if t.save_steps and step % t.save_steps == 0 and step < total_steps:
            save_checkpoint(model, optimizer, scheduler, step, os.path.join(t.output_dir, f"checkpoint-{step}"))
    progress.close()

    if t.load_best_model_at_end and best["shards"] is not None and best["step"] != step:
        with torch.no_grad():
            for param, saved in zip(model.parameters(), best["shards"]):
                param.copy_(saved.to(param.device))
        print0(f"loaded the best weights back (step {best['step']}, eval_loss {best['eval_loss']:.4f})")
    export("final")
    print0(f"exported {os.path.join(t.output_dir, 'final')}")
    logger.close()
    return {"steps": step, "best_eval_loss": best["eval_loss"], "best_step": best["step"]}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        validate(cfg)
    except ConfigError as err:
        fail(str(err))
    d = init_distributed()
    try:
        run(cfg, d)
    except (ConfigError, DataError) as err:
        # Every rank reads the same files and flags, so every rank stops here with the same message. An
        # error raised in a data-loader worker arrives wrapped in the worker's traceback: keep its last line.
        lines = getattr(err, "lines", None) or [
            str(err).strip().splitlines()[-1].removeprefix(f"{type(err).__module__}.{type(err).__name__}: ")]
        if d.is_main:
            print("\n" + "\n".join(f"ftloop: error: {line}" for line in lines), file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(2) from None
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
