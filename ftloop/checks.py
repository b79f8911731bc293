"""The checks of every flag that can be checked before any process group or model exists (`validate`), each
refusal one line naming the flag and what to do. The flags themselves: ftloop.config."""

from __future__ import annotations

import dataclasses
import os

import torch

from ftloop.config import Config, DataArgs, LoraArgs, ModelArgs, parse_size, previous_run
from ftloop.errors import ConfigError


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_model_path(path: str) -> None:
    """--model-name-or-path: required, and a folder with a config.json unless it reads as a hub id."""
    _need(bool(path), "--model-name-or-path is required: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL folder or hub id")
    # A hub id is "name" or "org/name"; anything else (absolute, ./relative, deeper) is meant as a folder.
    looks_local = path.startswith((os.sep, ".", "~")) or path.count("/") > 1
    if looks_local or os.path.exists(path):
        _need(os.path.isfile(os.path.join(path, "config.json")),
              f"--model-name-or-path {path}: no config.json there; give a Hugging Face model folder")


def pixels_out_of_order(low: str, high: str) -> str:
    """The line for a smallest image area above the largest (each named by its flag or the checkpoint)."""
    return f"{low} is above {high}; give --min-pixels <= --max-pixels"


def check_data_args(data: DataArgs, need_data: bool = True) -> None:
    """The data flags on their own. Whether --train-data / --eval-data can be read is the data package's
    check (ftloop.data.sources.check_sources), and the pixel limits against the checkpoint's are checked
    where the image processor is loaded (ftloop.data.vision)."""
    _need(bool(data.train_data) or not need_data,
          "--train-data is required: a .json/.jsonl file, a dataset folder or a hub name")
    _need(0 <= data.eval_ratio < 1, "--eval-ratio must be in [0, 1)")
    _need(not (data.eval_ratio > 0 and data.eval_data),
          "--eval-ratio holds out training rows instead of --eval-data; give one of the two")
    _need(not data.image_folder or os.path.isdir(data.image_folder),
          f"--image-folder {data.image_folder}: folder not found")
    _need(data.max_seq_length > 0, "--max-seq-length must be positive")
    _need(data.dataloader_num_workers >= 0, "--dataloader-num-workers must be 0 or more")
    _need(data.max_eval_samples >= 0, "--max-eval-samples must be 0 (all) or positive")
    _need(data.length_group_steps >= 1, "--length-group-steps must be 1 or more")
    _need(data.max_tokens_per_batch == 0 or data.packing,
          "--max-tokens-per-batch is the size of a packed sequence; pass --packing with it")
    _need(data.max_tokens_per_batch == 0 or data.max_tokens_per_batch >= data.max_seq_length,
          f"--max-tokens-per-batch {data.max_tokens_per_batch} is below --max-seq-length {data.max_seq_length}: a "
          "row that long could not be packed; raise it, or lower --max-seq-length (longer rows are then dropped "
          "or cut as --truncation says)")
    _need(data.min_pixels is None or data.min_pixels > 0, "--min-pixels must be positive")
    _need(data.max_pixels is None or data.max_pixels > 0, "--max-pixels must be positive")
    _need(data.min_pixels is None or data.max_pixels is None or data.min_pixels <= data.max_pixels,
          pixels_out_of_order(f"--min-pixels {data.min_pixels}", f"--max-pixels {data.max_pixels}"))
    _need(data.max_images_per_sample >= 0, "--max-images-per-sample must be 0 (no limit) or positive")


def trains_something(model: ModelArgs) -> bool:
    vision = not model.freeze_vision_tower or model.unfreeze_topk_vision > 0
    llm = not model.freeze_llm or model.unfreeze_topk_llm > 0
    return vision or llm or not model.freeze_merger


def check_lora_args(lora: LoraArgs, model: ModelArgs) -> None:
    if not lora.lora_rank:  # LoRA flags without adapters would be silently ignored
        given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(LoraArgs)
                 if getattr(lora, f.name) != f.default and f.name != "lora_rank"]
        _need(not given, f"{', '.join(given)} set without --lora-rank; give the adapters' rank, or drop them")
        return
    _need(lora.lora_rank > 0, "--lora-rank must be 0 (off) or positive")
    _need(lora.lora_alpha > 0, "--lora-alpha must be positive")
    _need(0 <= lora.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
    _need(bool(lora.lora_target_modules or lora.lora_vision_target_modules),
          "--lora-rank with no --lora-target-modules or --lora-vision-target-modules: name the projections")
    freezing = [f"--{name.replace('_', '-')}" for name in ("freeze_vision_tower", "freeze_merger", "freeze_llm",
                                                          "unfreeze_topk_llm", "unfreeze_topk_vision")
                if getattr(model, name)]
    _need(not freezing, f"--lora-rank trains the adapters alone (every base weight is frozen), so "
          f"{(freezing or [''])[0]} means nothing with it; drop it")


def validate(cfg: Config, need_data: bool = True) -> None:
    """Check every flag that can be checked before any process group or model exists (`need_data=False`: all
    but the data flags, for the memory plan). ftloop.train also runs ftloop.data.sources.check_sources."""
    model, optim, train = cfg.model, cfg.optim, cfg.train
    check_model_path(model.model_name_or_path)
    check_data_args(cfg.data, need_data)
    _need(model.unfreeze_topk_llm >= 0 and model.unfreeze_topk_vision >= 0,
          "--unfreeze-topk-llm and --unfreeze-topk-vision must be 0 (off) or positive")
    check_lora_args(cfg.lora, model)
    _need(trains_something(model) or cfg.lora.lora_rank, "--freeze-vision-tower, --freeze-merger and --freeze-llm together leave nothing "
          "to train; drop one, or unfreeze the last blocks with --unfreeze-topk-llm / --unfreeze-topk-vision")
    _need(optim.learning_rate > 0, "--learning-rate must be positive")
    _need(optim.weight_decay >= 0, "--weight-decay must be 0 or more")
    _need(optim.vision_lr is None or optim.vision_lr > 0, "--vision-lr must be positive")
    _need(optim.merger_lr is None or optim.merger_lr > 0, "--merger-lr must be positive")
    _need(0 <= optim.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
    _need(optim.max_grad_norm >= 0, "--max-grad-norm must be 0 (off) or positive")
    _need(not (model.param_dtype == "bf16" and optim.optim == "adamw" and optim.bf16_master_rounding != "nearest"),
          "--param-dtype bf16 with --optim adamw rounds every update to the nearest bf16 (torch's AdamW has no "
          "compensated updates, and most fine-tuning updates vanish): use --optim adafactor, --param-dtype fp32, "
          "or pass --bf16-master-rounding nearest to accept it")
    _need(train.per_device_train_batch_size > 0, "--per-device-train-batch-size must be positive")
    _need(train.per_device_eval_batch_size > 0, "--per-device-eval-batch-size must be positive")
    _need(train.gradient_accumulation_steps > 0, "--gradient-accumulation-steps must be positive")
    _need(train.max_steps > 0 or train.max_steps == -1, "--max-steps must be positive, or -1 to use --num-train-epochs")
    _need(train.max_steps > 0 or train.num_train_epochs > 0,
          "--num-train-epochs must be positive when --max-steps is -1")
    _need(train.logging_steps > 0, "--logging-steps must be positive")
    _need(train.eval_steps > 0, "--eval-steps must be positive")
    _need(train.save_steps >= 0, "--save-steps must be 0 (off) or positive")
    _need(train.save_grace_s > 0, "--save-grace-s must be positive (seconds)")
    _need(train.save_total_limit >= 0, "--save-total-limit must be 0 (keep all) or positive")
    _need(train.max_bad_steps > 0, "--max-bad-steps must be positive")
    _need(train.ddp_timeout > 0, "--ddp-timeout must be positive (seconds)")
    resume = train.resume_from_checkpoint
    _need(resume in ("", "auto") or os.path.isdir(resume),
          f"--resume-from-checkpoint {resume}: folder not found; give a checkpoint-<step> folder or `auto`")
    _need(bool(train.output_dir), "--output-dir is required")
    _need(not os.path.isfile(train.output_dir), f"--output-dir {train.output_dir}: is a file; give a folder")
    earlier = previous_run(train.output_dir)
    _need(not earlier or resume or train.overwrite_output_dir,
          f"--output-dir {train.output_dir}: holds a run already ({', '.join(earlier[:3])}); continue it with "
          "--resume-from-checkpoint auto, give a new --output-dir, or pass --overwrite-output-dir to replace it")
    parse_size(train.max_shard_size)
    _need(not (cfg.fsdp.cpu_offload and cfg.fsdp.sharding_strategy == "NO_SHARD"),
          "--cpu-offload needs a sharded --sharding-strategy")
    _need(not cfg.fsdp.cpu_offload or torch.cuda.is_available(),
          "--cpu-offload moves GPU shards to host memory, and there is no GPU here; drop the flag")
