"""Fine-tune a Qwen2.5-VL model with FSDP: `torchrun --nproc_per_node N -m ftloop.train [flags]`.

Read top to bottom: configuration, process group, data, model, optimizer, then the loop. Each optimizer
step takes `gradient_accumulation_steps` micro-batches per rank; the loss is the sum of token
cross-entropies divided by the number of supervised tokens of the whole step on all ranks, so the gradient
is the same however the global batch is split across processes and micro-batches.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from tqdm import tqdm
from transformers import AutoTokenizer

from ftloop.config import Config, ConfigError, parse_args, validate
from ftloop.data.formats import DataError
from ftloop.data.loaders import RowFailedMidRun, StepBatches, build_loaders
from ftloop.data.vision import load_image_processor
from ftloop.distributed import Dist, all_reduce_sum, fail, init_distributed, print0
from ftloop.fsdp.checkpoint import (check_resumable, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                    resolve_resume, save_checkpoint)
from ftloop.fsdp.export import export_model
from ftloop.fsdp.load import UnitMaterializer, load_weights_into, open_weights
from ftloop.fsdp.wrap import wrap_fsdp
from ftloop.hf_folder import local_folder, meta_skeleton, save_model_files
from ftloop.metrics import MetricsLogger
from ftloop.model import (DTYPES, WRAPPER_PREFIX, VisionLanguageSFT, build_meta_model, load_config,
                          wrapped_layer_classes)
from ftloop.optim.build import build_optimizer
from ftloop.optim.schedule import build_lr_scheduler, warmup_steps_from_ratio
from ftloop.plan import check_fits
from ftloop.signals import StopRequest, Stopped
from ftloop.steps import (accumulate_gradients, count_step_tokens, evaluate, peak_memory_gib,
                          poison_gradients_for_tests)


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
    resume_from: str | None  # the checkpoint to continue from, checked against the model and data
    saved: dict  # its trainer_state.json ({} for a fresh start)


def prepare(cfg: Config, d: Dist) -> Setup:
    t, src = cfg.train, cfg.model.model_name_or_path
    torch.manual_seed(t.seed)
    hf_config = load_config(cfg.model)
    # The skeleton and the checkpoint's tensor names (safetensors headers only): a checkpoint that does not match
    # the model stops every rank now; and on GPUs a run that cannot fit stops before anything is loaded.
    hf_model = build_meta_model(hf_config, cfg.model)
    every_rank_reads = cfg.model.load_weights_on == "every-rank"
    weights = open_weights(lambda: local_folder(src), hf_model, "--model-name-or-path", every_rank_reads)
    if d.device.type == "cuda" and t.memory_check:
        check_fits(hf_model, cfg, d.world_size, torch.cuda.device_count(),  # FSDP's node size for HYBRID_SHARD
                   torch.cuda.get_device_properties(d.device).total_memory)
    tokenizer = AutoTokenizer.from_pretrained(src)
    image_processor = load_image_processor(src, cfg.data.min_pixels, cfg.data.max_pixels)  # --min/max-pixels

    # Data before the model: a bad row should stop the run before minutes go into loading weights.
    pin = d.device.type == "cuda"
    train_loader, sampler, eval_loader = build_loaders(cfg, tokenizer, image_processor, hf_config,
                                                       d.world_size, d.rank, pin)
    if sampler.steps_per_epoch == 0:
        raise ConfigError(f"--train-data has {sampler.num_rows} rows, fewer than one global batch of "
                          f"{sampler.global_batch} (processes x --per-device-train-batch-size x "
                          "--gradient-accumulation-steps)")
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * sampler.steps_per_epoch)
    # A checkpoint of another model or other data is refused now, before loading weights.
    resume_from = resolve_resume(t.resume_from_checkpoint, t.output_dir, d.is_main)
    saved = check_resumable(resume_from, hf_config, sampler.num_rows, t.seed, cfg.to_dict()) if resume_from else {}

    # FSDP wraps the skeleton unit by unit; each unit's tensors are read from the safetensors files one at a time
    # (by rank 0, which broadcasts them, or by every rank) as FSDP flattens it: no rank holds the whole model.
    materialize = UnitMaterializer(hf_model, weights, d.device, every_rank_reads)
    model = wrap_fsdp(VisionLanguageSFT(hf_model), wrapped_layer_classes(hf_model), cfg.fsdp, materialize, d.device)
    if weights is not None:
        weights.close()
    return Setup(hf_config, tokenizer, image_processor, train_loader, sampler, eval_loader, model, total_steps,
                 resume_from, saved)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why and what to do."""


def run(cfg: Config, d: Dist) -> dict:
    t = cfg.train
    stop = StopRequest()  # from the start: a preemption while loading still ends in a clean save
    s = prepare(cfg, d)
    model, sampler, total_steps = s.model, s.sampler, s.total_steps
    optimizer = build_optimizer(model, cfg.optim, d.device, t.seed)
    warmup = warmup_steps_from_ratio(cfg.optim.warmup_ratio, total_steps)
    scheduler = build_lr_scheduler(optimizer, cfg.optim.lr_scheduler_type, warmup, total_steps)
    resume_from, saved = s.resume_from, s.saved
    logger = MetricsLogger(t.output_dir, d.is_main, t.report_to, t.wandb_project_name, t.run_name,
                           cfg.to_dict(), wandb_id=saved.get("wandb_run_id"))
    shards = 1 if cfg.fsdp.sharding_strategy == "NO_SHARD" else d.world_size
    n_params = sum(p.numel() for p in model.parameters()) * shards
    print0(f"ftloop: {d.world_size} process(es) on {d.device.type} ({d.backend}), ~{n_params / 1e6:.1f}M "
           f"parameters, {sampler.num_rows} train rows, {total_steps} steps of {sampler.global_batch} "
           f"sequences, warmup {warmup}")
    src = cfg.model.model_name_or_path
    source_dir = src if os.path.isdir(src) else None

    def export(name: str) -> None:
        export_model(model, os.path.join(t.output_dir, name), s.hf_config, s.tokenizer, s.image_processor,
                     t.save_dtype, t.max_shard_size, source_dir)

    # What a checkpoint must bring back for the run to continue exactly where it was.
    step, bad_steps, last_saved = 0, 0, None
    tokens_seen = torch.zeros(2, dtype=torch.float64, device=d.device)  # real tokens, padded positions
    best = {"eval_loss": math.inf, "step": None}
    if resume_from:
        started = time.perf_counter()
        load_checkpoint(model, optimizer, resume_from, saved, t.allow_dtype_change)
        scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler sets the lr of the next step; loading its state does not
        sampler.load_state_dict(saved["sampler"])
        step = last_saved = saved["step"]
        bad_steps = saved["bad_steps_in_a_row"]
        tokens_seen.copy_(torch.tensor(saved["tokens_seen"], dtype=torch.float64))
        best.update(eval_loss=saved["best_eval_loss"], step=saved["best_step"])
        print0(f"resumed from {resume_from} at step {step} (epoch {sampler.epoch}, row {sampler.position}) "
               f"in {time.perf_counter() - started:.1f}s")

    def save(step: int) -> str:
        nonlocal last_saved
        path = os.path.join(t.output_dir, f"checkpoint-{step}")
        if last_saved == step:
            return path
        started = time.perf_counter()
        state = {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                 "tokens_seen": tokens_seen.tolist(), "best_eval_loss": best["eval_loss"],
                 "best_step": best["step"], "bad_steps_in_a_row": bad_steps, "wandb_run_id": logger.wandb_id}
        save_checkpoint(model, optimizer, path, state, cfg.to_dict(), lambda folder: save_model_files(
            folder, s.hf_config, s.tokenizer, s.image_processor, source_dir))
        if d.is_main and t.save_total_limit:
            prune_checkpoints(t.output_dir, t.save_total_limit, protected_step=best["step"])
        logger.log(step, {"checkpoint_save_s": time.perf_counter() - started})
        last_saved = step
        return path

    def run_eval(step: int) -> None:
        if s.eval_loader is None:
            return
        eval_loss = evaluate(model, s.eval_loader, d.device)
        improved = eval_loss < best["eval_loss"]
        if improved:  # the weights stay on disk (`best`), loaded back at the end: no copy in memory
            best.update(eval_loss=eval_loss, step=step)
            if step > 0:
                export("best")
        logger.log(step, {"eval_loss": eval_loss, "best_eval_loss": best["eval_loss"], "best_step": best["step"]})
        print0(f"step {step}: eval_loss {eval_loss:.4f}" + (" (best)" if improved else ""))

    if t.eval_on_start and step == 0:
        run_eval(0)

    steps_data = StepBatches(s.train_loader, sampler, t.gradient_accumulation_steps)

    model.train()
    progress = tqdm(total=total_steps, initial=step, disable=not d.is_main, desc="train", dynamic_ncols=True)
    # Sums over the steps since the last log line; read on the host only when logged.
    window = {"loss": torch.zeros((), device=d.device), "tokens": torch.zeros_like(tokens_seen), "steps": 0,
              "start": time.perf_counter()}
    while step < total_steps:
        micro_batches, failed = [], None
        try:
            micro_batches = steps_data.next_step()
        except RowFailedMidRun as err:  # said in the vote below, so that the other ranks do not wait for us
            failed = err
        step_targets, step_tokens, votes = count_step_tokens(micro_batches, d, stop.requested, failed is not None)
        # Reading the votes waits for the last step to end on the device: one small stall per step, the price
        # of every rank leaving together, right after the step in which a rank was signalled or failed.
        stop_votes, failed_ranks = votes.tolist()
        if failed_ranks:
            raise failed or RowFailedMidRun(f"a row failed to load on {int(failed_ranks)} other rank(s), which "
                                            "name it; fix or remove it and resume", here=False)
        if stop_votes:
            progress.close()
            path = save(step)
            logger.close()
            raise Stopped(stop.signum or signal.SIGTERM, step, path)  # these micro-batches count as unread
        loss_sum = accumulate_gradients(model, micro_batches, step_targets, d)
        poison_gradients_for_tests(model, step + 1)
        grad_norm = model.clip_grad_norm_(cfg.optim.max_grad_norm or math.inf)  # the global norm, logged
        # Whether to update must be the same on every rank: the global norm decides.
        grad_norm_value = grad_norm.item()
        finite = math.isfinite(grad_norm_value)
        if finite:
            optimizer.step()
        bad_steps = 0 if finite else bad_steps + 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sampler.advance()
        tokens_seen += step_tokens
        progress.update(1)
        if not finite:  # skipped: no update, optimizer state untouched; the data and the schedule move on
            logger.log(step, {"skipped_nonfinite_step": True, "grad_norm": grad_norm_value,
                              "bad_steps_in_a_row": bad_steps})
            print0(f"step {step}: non-finite loss or gradient norm ({grad_norm_value}); step skipped "
                   f"({bad_steps} in a row, --max-bad-steps {t.max_bad_steps})")
            if bad_steps >= t.max_bad_steps:
                kept = latest_checkpoint(t.output_dir)
                raise TrainingError(f"{bad_steps} non-finite steps in a row (up to step {step}); the last good "
                                    f"checkpoint is {kept or 'none (--save-steps)'}; lower --learning-rate, check "
                                    "the data, or raise --max-bad-steps")
        else:
            # This rank's share of the step's mean loss; summed over ranks only when logged.
            window["loss"] += loss_sum / step_targets
            window["tokens"] += step_tokens
            window["steps"] += 1

        if (step % t.logging_steps == 0 or step == total_steps) and window["steps"]:
            elapsed = time.perf_counter() - window["start"]
            record = {"loss": float(all_reduce_sum(window["loss"].view(1), d.device)) / window["steps"],
                      "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm_value,
                      "tokens_per_s": float(window["tokens"][0]) / elapsed, "step_time_s": elapsed / window["steps"],
                      "padding_ratio": 1 - float(window["tokens"][0] / window["tokens"][1]),
                      "peak_mem_gib": peak_memory_gib(d.device), "epoch": sampler.epoch,
                      "tokens_seen": int(tokens_seen[0])}
            logger.log(step, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window = {"loss": torch.zeros_like(window["loss"]), "tokens": torch.zeros_like(tokens_seen), "steps": 0,
                      "start": time.perf_counter()}
        if step % t.eval_steps == 0 or step == total_steps:
            run_eval(step)
        if t.save_steps and step % t.save_steps == 0 and step < total_steps:
            save(step)
    progress.close()
    stop.restore()

    final = os.path.join(t.output_dir, "final")
    if t.load_best_model_at_end and best["step"] is not None and best["step"] != step:
        # Streamed back from disk one FSDP unit at a time: the `best` export (or, for the weights of step 0,
        # the folder the run started from), in --save-dtype, which `final` is written in too.
        best_dir = os.path.join(t.output_dir, "best")
        weights = open_weights(lambda: best_dir if best["step"] > 0 else local_folder(src),  # rank 0, which wrote it
                               meta_skeleton(s.hf_config, DTYPES[cfg.model.param_dtype]), "--load-best-model-at-end",
                               every_rank_reads=False)
        load_weights_into(model, weights, prefix=WRAPPER_PREFIX)
        if weights is not None:
            weights.close()
        print0(f"loaded the best weights back (step {best['step']}, eval_loss {best['eval_loss']:.4f}) from "
               f"{best_dir if best['step'] > 0 else src}")
    export("final")
    print0(f"exported {final}")
    logger.close()
    return {"steps": step, "best_eval_loss": best["eval_loss"], "best_step": best["step"]}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        validate(cfg)
    except ConfigError as err:
        fail(str(err))
    d = init_distributed(cfg.train.ddp_timeout)
    try:
        run(cfg, d)
    except (Stopped, TrainingError) as err:
        print0(f"\nftloop: {'' if isinstance(err, Stopped) else 'error: '}{err}", file=sys.stderr)
        dist.destroy_process_group()
        raise SystemExit(getattr(err, "exit_code", 1)) from None
    except (ConfigError, DataError) as err:
        # Every rank reads the same files and flags, so every rank stops here with the same message, said
        # once; but a row that fails mid-run fails on one rank, which says it. An error raised in a data-loader
        # worker arrives wrapped in the worker's traceback: keep its last line.
        local = getattr(err, "here", False)
        lines = getattr(err, "lines", None) or [
            str(err).strip().splitlines()[-1].removeprefix(f"{type(err).__module__}.{type(err).__name__}: ")]
        if d.is_main or local:
            where = f"[rank {d.rank}] " if local else ""
            print("\n" + "\n".join(f"ftloop: error: {where}{line}" for line in lines), file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(2) from None
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
