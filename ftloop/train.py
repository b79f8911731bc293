"""Fine-tune a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with FSDP: `torchrun --nproc_per_node N -m ftloop.train`.

Read top to bottom: `prepare` builds everything in the order that fails fastest on bad input, `run` is the
loop, `main` checks the flags and starts the process group. Each optimizer step takes
`gradient_accumulation_steps` micro-batches per rank, normalised so that the gradient does not depend on how the
global batch is split (ftloop.steps).

Where each concern lives:
- flags, their docs and their checks: ftloop.config (data sources: ftloop.data.sources); user errors:
  ftloop.errors; how every command ends (one line, the exit code): ftloop.cli; LoRA adapters: ftloop.lora
- rows, the check before training, loaders, the order of rows, and each step's micro-batches counted across the
  ranks (with their votes to stop): ftloop.data
- the model and its loss: ftloop.model; weights read into FSDP units: ftloop.fsdp.load; wrapping:
  ftloop.fsdp.wrap; the memory plan: ftloop.plan
- one step's arithmetic and the eval pass: ftloop.steps; the optimizer and schedule: ftloop.optim
- the run's state (what a checkpoint brings back): ftloop.state; when to save, evaluate, keep the best and
  give up: ftloop.policies; checkpoints on disk: ftloop.fsdp.checkpoint; exports: ftloop.export
- metrics: ftloop.metrics; preemption: ftloop.signals
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import BaseImageProcessor, PretrainedConfig, PreTrainedTokenizerBase

from ftloop.cli import run_command
from ftloop.config import Config, parse_args
from ftloop.data.loaders import StepBatches, build_loaders
from ftloop.data.model_folder import check_model_folder, check_same_inputs, input_fingerprints, load_processing
from ftloop.data.sampler import StepBatchSampler
from ftloop.data.sources import check_sources
from ftloop.distributed import World, init_distributed, make_deterministic, print0
from ftloop.errors import ConfigError, Stopped
from ftloop.export import export_model
from ftloop.fsdp.checkpoint import check_resumable, load_checkpoint, resolve_resume
from ftloop.fsdp.load import UnitMaterializer, open_weights
from ftloop.fsdp.wrap import shard_group_size, wrap_fsdp
from ftloop.hf_folder import ModelFiles, local_folder
from ftloop.lora import initial_adapter
from ftloop.flops import FlopModel, flop_model, peak_flops
from ftloop.metrics import MetricsLogger, StepWindow
from ftloop.family import deltanet_scalars_line, linear_attention_path
from ftloop.model import VisionLanguageSFT, build_skeleton, load_config
from ftloop.optim.build import build_lr_scheduler, build_optimizer, warmup_steps_from_ratio
from ftloop.output_dir import claim_output_dir
from ftloop.plan import check_fits
from ftloop.policies import Evaluator, Saver, skip_nonfinite_step
from ftloop.signals import StopRequest, watch_launcher
from ftloop.state import TrainState
from ftloop.steps import accumulate_gradients, clip_gradients


@dataclass
class Setup:
    """Everything the loop needs, built in the order that fails fastest on bad input."""
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    image_processor: BaseImageProcessor
    train_loader: DataLoader
    sampler: StepBatchSampler
    eval_loader: DataLoader | None
    model: FSDP
    flops: FlopModel  # what a step's model FLOPs are computed from (for `mfu`)
    total_steps: int
    resume_from: str | None  # the checkpoint to continue from, checked against the model and data
    saved: dict  # its trainer_state.json ({} for a fresh start)


def prepare(cfg: Config, world: World) -> Setup:
    args, src = cfg.train, cfg.model.model_name_or_path
    torch.manual_seed(args.seed)
    hf_config = load_config(cfg.model)
    # The skeleton (what ftloop.plan counts too) and the checkpoint's tensor names (safetensors headers only): a
    # checkpoint that does not match the model stops every rank now; on GPUs a run that cannot fit stops before
    # anything is loaded.
    skeleton = build_skeleton(cfg, hf_config)
    every_rank_reads = cfg.model.load_weights_on == "every-rank"
    weights = open_weights(lambda: local_folder(src), skeleton.model, "--model-name-or-path", world, every_rank_reads)
    if world.device.type == "cuda" and args.memory_check:
        # Against what is free now that the process group exists: the CUDA context, NCCL's first communicator and
        # any other process on this GPU are already taken.
        check_fits(skeleton, cfg, world.world_size, world.local_world_size, torch.cuda.mem_get_info(world.device)[0])
    tokenizer, image_processor = load_processing(src, cfg.data.min_pixels, cfg.data.max_pixels)
    check_model_folder(src, hf_config, tokenizer, image_processor)  # the folder agrees with itself, before any row

    # Data before the model: a bad row should stop the run before minutes go into loading weights.
    train_loader, sampler, eval_loader = build_loaders(cfg, tokenizer, image_processor, hf_config, world)
    if sampler.steps_per_epoch == 0:
        packed = f" in {sampler.num_units} packed sequences" if cfg.data.packing else ""
        raise ConfigError(f"--train-data has {sampler.num_rows} rows{packed}, fewer than one global batch of "
                          f"{sampler.global_batch} (processes x --per-device-train-batch-size x "
                          "--gradient-accumulation-steps)")
    total_steps = args.max_steps if args.max_steps > 0 else sampler.steps_in(args.num_train_epochs)
    # A checkpoint of another model or other data is refused now, before loading weights.
    resume_from = resolve_resume(args.resume_from_checkpoint, args.output_dir, world, args.overwrite_output_dir)
    saved = check_resumable(resume_from, hf_config, sampler.order_settings(), cfg.to_dict()) if resume_from else {}
    if resume_from:
        check_same_inputs(resume_from, saved, tokenizer, image_processor)

    # FSDP wraps the skeleton unit by unit; each unit's tensors are read from the safetensors files one at a time
    # (by rank 0, which broadcasts them, or by every rank) as FSDP flattens it: no rank holds the whole model.
    materialize = UnitMaterializer(skeleton.model, weights, world, every_rank_reads,
                                   functools.partial(initial_adapter, seed=args.seed) if cfg.lora.lora_rank else None)
    model = wrap_fsdp(VisionLanguageSFT(skeleton.model, cfg.model.loss_chunk_size), skeleton.units, cfg.fsdp,
                      materialize, world)
    materialize.progress.close()
    if weights is not None:
        weights.close()
    flops = flop_model(skeleton.model, getattr(hf_config, "text_config", hf_config))
    return Setup(hf_config, tokenizer, image_processor, train_loader, sampler, eval_loader, model, flops,
                 total_steps, resume_from, saved)


def run(cfg: Config, world: World) -> dict:
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
    for line in (linear_attention_path(setup.hf_config.model_type),
                 deltanet_scalars_line(setup.hf_config.model_type, cfg.model.param_dtype)):
        if line:
            print0(line)
    resume(setup, model, optimizer, state, args.allow_dtype_change, world)
    state.wandb_run_id = logger.wandb_id  # the run continued, or a new one when wandb could not resume it
    files = ModelFiles(setup.hf_config, setup.tokenizer, setup.image_processor, local_source_dir(cfg))
    lora = cfg.lora if cfg.lora.lora_rank else None  # with adapters, `best` holds them alone
    export = functools.partial(export_model, model, files=files, save_dtype=args.save_dtype,
                               max_shard_size=args.max_shard_size, world=world, lora=lora,
                               base_model=cfg.model.model_name_or_path)
    saver = Saver(model, optimizer, state, cfg, logger, files.save, world, resumed=bool(setup.resume_from),
                  inputs=input_fingerprints(setup.tokenizer, setup.image_processor))
    evaluator = Evaluator(model, setup.eval_loader, state, cfg, logger, functools.partial(export, merge=lora is None),
                          setup.hf_config, world)
    if args.eval_on_start and state.step == 0:
        evaluator()

    batches = StepBatches(setup.train_loader, sampler, args.gradient_accumulation_steps, world, stop)
    window = StepWindow(world, cfg.data.dataloader_num_workers, setup.flops, peak_flops(world.device, args.peak_tflops))
    progress = tqdm(total=total_steps, initial=state.step, disable=not world.is_main, desc="train", dynamic_ncols=True)
    model.train()
    try:
        while state.step < total_steps:
            step = batches.next_step()  # raises Stopped on every rank when any was signalled
            loss_sum = accumulate_gradients(model, step.micro_batches, step.targets, world)
            # The global norm (logged) decides whether to update, so the decision is the same on every rank.
            grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
            finite = math.isfinite(grad_norm)
            if finite:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.finish_step(step.tokens, finite)
            progress.update(1)
            if finite:
                window.add(loss_sum / step.targets, step)  # the loss: this rank's share of the step's mean
            else:
                skip_nonfinite_step(state, grad_norm, logger, args)

            if (state.step % args.logging_steps == 0 or state.step == total_steps) and window.steps:
                window.log(logger, progress, state.step, scheduler.get_last_lr()[0], grad_norm, sampler.epoch,
                           int(state.tokens_seen[0]))
            if evaluator.due(total_steps):
                evaluator()
            if saver.due(total_steps):
                saver.save()
    except Stopped as stopped:  # the step before it is complete on every rank: save it, and leave with the signal
        progress.close()
        stopped.step, stopped.checkpoint = state.step, saver.save()
        logger.close()
        raise
    progress.close()
    stop.restore()

    evaluator.restore_best()
    final = os.path.join(args.output_dir, "final")
    export(final, merge=cfg.lora.merge_lora)
    print0(f"exported {final}")
    logger.close()
    return {"steps": state.step, "best_eval_loss": state.best.eval_loss, "best_step": state.best.step}


def resume(setup: Setup, model: FSDP, optimizer, state: TrainState, allow_dtype_change: bool, world: World) -> None:
    """Continue from the checkpoint `prepare` chose and checked, if any: the model and optimizer shards
    (resharded to this world size), this rank's generators, and the run's state."""
    if not setup.resume_from:
        return
    started = time.perf_counter()
    load_checkpoint(model, optimizer, setup.resume_from, setup.saved, allow_dtype_change, world)
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
    return (f"ftloop: {world.world_size} process(es) on {world.device.type} ({world.backend}), attention "
            f"{cfg.model.attention(cfg.fsdp.bf16)}, "
            f"~{parameters / 1e6:.1f}M parameters{trains}, {setup.sampler.num_rows} train rows, {setup.total_steps} steps of "
            f"{setup.sampler.global_batch} {'packed ' if cfg.data.packing else ''}sequences, warmup {warmup}")


def local_source_dir(cfg: Config) -> str | None:
    """The model folder the run started from, whose extra files (chat template, README) exports carry along;
    None for a hub id."""
    src = cfg.model.model_name_or_path
    return src if os.path.isdir(src) else None


def main(argv: list[str] | None = None) -> None:
    """Check the flags (no process group yet), start the process group, train. Every way out (user errors as one
    line, the exit codes, leaving the process) is ftloop.cli.run_command's."""
    cfg = parse_args(argv)
    cfg.check()
    check_sources(cfg.data)
    if cfg.train.full_determinism:
        make_deterministic()  # before CUDA starts
    watch_launcher()
    world = init_distributed(cfg.train.ddp_timeout)
    with claim_output_dir(cfg.train.output_dir, world):  # one run per folder, proven writable, before anything slow
        run(cfg, world)


if __name__ == "__main__":
    run_command(main)
