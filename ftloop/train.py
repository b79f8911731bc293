"""Fine-tune a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with FSDP: `torchrun --nproc_per_node N -m ftloop.train`.

Read top to bottom: `prepare` builds everything in the order that fails fastest on bad input, `run` is the
loop, `main` turns user errors into one line. Each optimizer step takes `gradient_accumulation_steps`
micro-batches per rank, normalised so that the gradient does not depend on how the global batch is split
(ftloop.steps).

Where each concern lives:
- flags and their docs: ftloop.config; their checks: ftloop.checks (data sources: ftloop.data.sources); user
  errors: ftloop.errors; LoRA adapters: ftloop.lora
- rows, the check before training, loaders and the order of rows: ftloop.data (build_loaders)
- the model and its loss: ftloop.model; weights read into FSDP units: ftloop.fsdp.load; wrapping:
  ftloop.fsdp.wrap; the memory plan: ftloop.plan
- one step's arithmetic and the eval pass: ftloop.steps; the optimizer and schedule: ftloop.optim
- the run's state (what a checkpoint brings back): ftloop.state; when to save, evaluate, keep the best and
  give up: ftloop.policies; checkpoints and exports on disk: ftloop.fsdp.checkpoint, ftloop.fsdp.export
- metrics: ftloop.metrics; preemption: ftloop.signals; faults the tests inject: ftloop.faults
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
import traceback
from typing import NoReturn
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from tqdm import tqdm

from ftloop.checks import validate
from ftloop.config import Config, parse_args
from ftloop.data.encode import load_tokenizer_and_processor
from ftloop.data.loaders import StepBatches, build_loaders
from ftloop.data.sources import check_sources
from ftloop.distributed import World, init_distributed, leave, print0
from ftloop.errors import ConfigError, DataError, RowFailedMidRun, Stopped, TrainingError, fail, tell_launcher
from ftloop.faults import NO_FAULTS, Faults
from ftloop.fsdp.checkpoint import check_resumable, load_checkpoint, resolve_resume
from ftloop.fsdp.export import export_model
from ftloop.fsdp.load import UnitMaterializer, open_weights
from ftloop.fsdp.wrap import shard_group_size, wrap_fsdp
from ftloop.hf_folder import local_folder, save_model_files
from ftloop.lora import add_adapters, base_dtype, initial_adapter
from ftloop.metrics import MetricsLogger, StepWindow, finish_reporting
from ftloop.model import DTYPES, VisionLanguageSFT, build_meta_model, freeze_parts, load_config, wrapped_layer_classes
from ftloop.optim.build import build_optimizer
from ftloop.optim.schedule import build_lr_scheduler, warmup_steps_from_ratio
from ftloop.plan import check_fits
from ftloop.policies import Evaluator, Saver, skip_nonfinite_step
from ftloop.signals import StopRequest
from ftloop.state import TrainState
from ftloop.steps import accumulate_gradients, clip_gradients, count_step_tokens


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


def prepare(cfg: Config, world: World) -> Setup:
    args, src = cfg.train, cfg.model.model_name_or_path
    torch.manual_seed(args.seed)
    hf_config = load_config(cfg.model)
    # The skeleton and the checkpoint's tensor names (safetensors headers only): a checkpoint that does not match
    # the model stops every rank now; and on GPUs a run that cannot fit stops before anything is loaded.
    hf_model = build_meta_model(hf_config, cfg.model, base_dtype(cfg))
    own_units = freeze_parts(hf_model, cfg.model)  # frozen and trainable tensors never share an FSDP unit
    every_rank_reads = cfg.model.load_weights_on == "every-rank"
    weights = open_weights(lambda: local_folder(src), hf_model, "--model-name-or-path", every_rank_reads)
    if cfg.lora.lora_rank:  # after the folder's names are matched: adapters are not in it
        own_units |= add_adapters(hf_model, cfg.lora, DTYPES[cfg.model.param_dtype])
    if world.device.type == "cuda" and args.memory_check:
        check_fits(hf_model, cfg, world.world_size, world.local_world_size,
                   torch.cuda.get_device_properties(world.device).total_memory)
    tokenizer, image_processor = load_tokenizer_and_processor(src, cfg.data.min_pixels, cfg.data.max_pixels)

    # Data before the model: a bad row should stop the run before minutes go into loading weights.
    pin = world.device.type == "cuda"
    train_loader, sampler, eval_loader = build_loaders(cfg, tokenizer, image_processor, hf_config,
                                                       world.world_size, world.rank, pin)
    if sampler.steps_per_epoch == 0:
        packed = f" in {sampler.num_units} packed sequences" if cfg.data.packing else ""
        raise ConfigError(f"--train-data has {sampler.num_rows} rows{packed}, fewer than one global batch of "
                          f"{sampler.global_batch} (processes x --per-device-train-batch-size x "
                          "--gradient-accumulation-steps)")
    total_steps = args.max_steps if args.max_steps > 0 else sampler.steps_in(args.num_train_epochs)
    # A checkpoint of another model or other data is refused now, before loading weights.
    resume_from = resolve_resume(args.resume_from_checkpoint, args.output_dir, world.is_main, args.overwrite_output_dir)
    saved = check_resumable(resume_from, hf_config, sampler.order_settings(), cfg.to_dict()) if resume_from else {}

    # FSDP wraps the skeleton unit by unit; each unit's tensors are read from the safetensors files one at a time
    # (by rank 0, which broadcasts them, or by every rank) as FSDP flattens it: no rank holds the whole model.
    materialize = UnitMaterializer(hf_model, weights, world.device, every_rank_reads,
                                   functools.partial(initial_adapter, seed=args.seed) if cfg.lora.lora_rank else None)
    model = wrap_fsdp(VisionLanguageSFT(hf_model), wrapped_layer_classes(hf_model), cfg.fsdp, materialize, world.device,
                      world.local_world_size, own_units)
    if weights is not None:
        weights.close()
    return Setup(hf_config, tokenizer, image_processor, train_loader, sampler, eval_loader, model, total_steps,
                 resume_from, saved)


def run(cfg: Config, world: World, faults: Faults = NO_FAULTS) -> dict:
    args = cfg.train
    stop = StopRequest()  # from the start: a preemption while loading still ends in a clean save
    setup = prepare(cfg, world)
    model, sampler, total_steps = setup.model, setup.sampler, setup.total_steps
    optimizer = build_optimizer(model, cfg.optim, world.device, args.seed)
    warmup = warmup_steps_from_ratio(cfg.optim.warmup_ratio, total_steps)
    scheduler = build_lr_scheduler(optimizer, cfg.optim.lr_scheduler_type, warmup, total_steps)
    state = TrainState(scheduler, sampler, tokens_seen=torch.zeros(2, dtype=torch.float64, device=world.device))
    logger = MetricsLogger(args.output_dir, world.is_main, args.report_to, args.wandb_project_name, args.run_name,
                           cfg.to_dict(), wandb_id=setup.saved.get("wandb_run_id"))
    print0(describe(cfg, world, setup, warmup))
    resume(setup, model, optimizer, state, args.allow_dtype_change)
    state.wandb_run_id = logger.wandb_id  # the run continued, or a new one when wandb could not resume it
    model_files = dict(hf_config=setup.hf_config, tokenizer=setup.tokenizer, image_processor=setup.image_processor,
                       source_dir=local_source_dir(cfg))
    lora = cfg.lora if cfg.lora.lora_rank else None  # with adapters, `best` holds them alone
    export = functools.partial(export_model, model, save_dtype=args.save_dtype, max_shard_size=args.max_shard_size,
                               lora=lora, base_model_name_or_path=cfg.model.model_name_or_path, **model_files)
    saver = Saver(model, optimizer, state, cfg, logger, functools.partial(save_model_files, **model_files),
                  faults.after_shards_written, world.is_main, resumed=bool(setup.resume_from))
    evaluator = Evaluator(model, setup.eval_loader, state, cfg, logger, functools.partial(export, merge=lora is None),
                          setup.hf_config, world.device)
    if args.eval_on_start and state.step == 0:
        evaluator()

    steps_data = StepBatches(setup.train_loader, sampler, args.gradient_accumulation_steps)
    model.train()
    progress = tqdm(total=total_steps, initial=state.step, disable=not world.is_main, desc="train", dynamic_ncols=True)
    window = StepWindow(world, cfg.data.dataloader_num_workers)
    while state.step < total_steps:
        micro_batches, failed = [], None
        waiting_since = time.perf_counter()
        try:
            micro_batches = steps_data.next_step()
        except RowFailedMidRun as err:  # said in the vote below, so that the other ranks do not wait for us
            failed = err
        data_wait = time.perf_counter() - waiting_since  # the loader's workers did not keep up
        counts = count_step_tokens(micro_batches, world, stop.signum, failed is not None,
                                   args.gradient_accumulation_steps)
        step_targets, step_tokens, votes = counts.targets, counts.tokens, counts.votes
        # Reading the votes waits for the last step to end on the device: one small stall per step, the price
        # of every rank leaving together, right after the step in which a rank was signalled or failed.
        sigterm_votes, sigint_votes, failed_ranks = votes.tolist()
        if failed_ranks:
            raise failed or RowFailedMidRun.elsewhere(int(failed_ranks))
        if sigterm_votes or sigint_votes:  # every rank exits with the same signal's code
            progress.close()
            path = saver.save()
            logger.close()
            raise Stopped(signal.SIGINT if sigint_votes else signal.SIGTERM, state.step, path)  # batches unread
        loss_sum = accumulate_gradients(model, micro_batches, step_targets, world)
        faults.after_backward(model, state.step + 1)
        # The global norm (logged) decides whether to update, so the decision is the same on every rank.
        grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
        finite = math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.finish_step(step_tokens, finite)
        progress.update(1)
        if finite:
            window.add(loss_sum / step_targets, step_tokens, counts.rank_balance, data_wait)  # loss: this rank's share
        else:
            skip_nonfinite_step(state, grad_norm, logger, args)

        if (state.step % args.logging_steps == 0 or state.step == total_steps) and window.steps:
            window.log(logger, progress, state.step, scheduler.get_last_lr()[0], grad_norm, sampler.epoch,
                       int(state.tokens_seen[0]))
        if evaluator.due(total_steps):
            evaluator()
        if saver.due(total_steps):
            saver.save()
    progress.close()
    stop.restore()

    evaluator.restore_best()
    final = os.path.join(args.output_dir, "final")
    export(final, merge=cfg.lora.merge_lora)
    print0(f"exported {final}")
    logger.close()
    return {"steps": state.step, "best_eval_loss": state.best.eval_loss, "best_step": state.best.step}


def resume(setup: Setup, model: FSDP, optimizer, state: TrainState, allow_dtype_change: bool) -> None:
    """Continue from the checkpoint `prepare` chose and checked, if any: the model and optimizer shards
    (resharded to this world size), this rank's generators, and the run's state."""
    if not setup.resume_from:
        return
    started = time.perf_counter()
    load_checkpoint(model, optimizer, setup.resume_from, setup.saved, allow_dtype_change)
    state.load_state_dict(setup.saved)
    unit = "packed sequence" if setup.sampler.pack_tokens else "row"
    print0(f"resumed from {setup.resume_from} at step {state.step} (epoch {setup.sampler.epoch}, {unit} "
           f"{setup.sampler.position}) in {time.perf_counter() - started:.1f}s")


def describe(cfg: Config, world: World, setup: Setup, warmup: int) -> str:
    """The run in one line, said before the first step."""
    shards = shard_group_size(cfg.fsdp.sharding_strategy, world.world_size, world.local_world_size)
    parameters = sum(p.numel() for p in setup.model.parameters()) * shards
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad) * shards
    trains = f" ({trainable / 1e6:.2f}M trainable)" if trainable < parameters else ""
    return (f"ftloop: {world.world_size} process(es) on {world.device.type} ({world.backend}), "
            f"~{parameters / 1e6:.1f}M parameters{trains}, {setup.sampler.num_rows} train rows, {setup.total_steps} steps of "
            f"{setup.sampler.global_batch} {'packed ' if cfg.data.packing else ''}sequences, warmup {warmup}")


def local_source_dir(cfg: Config) -> str | None:
    """The model folder the run started from, whose extra files (chat template, README) exports carry along;
    None for a hub id."""
    src = cfg.model.model_name_or_path
    return src if os.path.isdir(src) else None


def main(argv: list[str] | None = None, faults: Faults = NO_FAULTS) -> None:
    cfg = parse_args(argv)
    try:
        validate(cfg)
        check_sources(cfg.data)
    except ConfigError as err:
        fail(str(err))
    world = init_distributed(cfg.train.ddp_timeout)
    try:
        run(cfg, world, faults)
    except (Stopped, TrainingError) as err:
        line = f"ftloop: {'' if isinstance(err, Stopped) else 'error: '}{err}"
        print0(f"\n{line}", file=sys.stderr)
        tell_launcher(line)
        dist.destroy_process_group()
        raise SystemExit(getattr(err, "exit_code", 1)) from None
    except (ConfigError, DataError) as err:
        # Every rank reads the same files and flags, so every rank stops here with the same message, said
        # once; but a row that fails mid-run fails on one rank, which says it. An error raised in a data-loader
        # worker arrives wrapped in the worker's traceback: keep its last line.
        on_this_rank = getattr(err, "on_this_rank", False)
        lines = getattr(err, "lines", None) or [
            str(err).strip().splitlines()[-1].removeprefix(f"{type(err).__module__}.{type(err).__name__}: ")]
        where = f"[rank {world.rank}] " if on_this_rank else ""
        if world.is_main or on_this_rank:
            print("\n" + "\n".join(f"ftloop: error: {where}{line}" for line in lines), file=sys.stderr, flush=True)
        tell_launcher(f"ftloop: error: {where}{lines[-1]}")  # one line, or the bad rows' count and what to do
        dist.destroy_process_group()
        raise SystemExit(2) from None
    dist.destroy_process_group()


def cli(argv: list[str] | None = None, faults: Faults = NO_FAULTS) -> NoReturn:
    """`python -m ftloop.train`: `main`, then `leave` with its exit code; anything unexpected (a lost peer, a
    bug, a second Ctrl-C) with its traceback, exit 1 (130 for Ctrl-C)."""
    code = 0
    try:
        main(argv, faults)
    except SystemExit as err:  # ftloop's own exits (the line is said), tyro's --help and usage errors
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
        code = err.code if isinstance(err.code, int) else 0 if err.code is None else 1
    except BaseException as err:
        traceback.print_exc()
        code = 130 if isinstance(err, KeyboardInterrupt) else 1
    finish_reporting(code)
    leave(code)


if __name__ == "__main__":
    cli()
