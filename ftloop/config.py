"""Typed run configuration.

Each group is a dataclass whose attribute docstrings are the `--help` text (tyro reads them). Flags keep
the Hugging Face TrainingArguments names without a group prefix (`--learning-rate`, not
`--optim.learning-rate`), so a command line written for the HF Trainer mostly carries over. Defaults are
the ones of the guide this project grew from: Adafactor without relative steps or parameter scaling,
constant schedule with warmup, bf16 compute and eval, FSDP full shard with backward prefetch, gradient
checkpointing (non-reentrant), best model by eval loss, wandb reporting.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Literal

import tyro

from ftloop.errors import ConfigError

Dtype = Literal["bf16", "fp32"]


@dataclass
class ModelArgs:
    model_name_or_path: str = ""
    """Qwen2.5-VL, Qwen2-VL or Qwen3-VL folder in Hugging Face layout, or a hub id (needs network or the HF cache)."""
    param_dtype: Dtype = "fp32"
    """dtype of the master weights the optimizer updates. fp32 keeps small updates from vanishing."""
    gradient_checkpointing: bool = True
    """Recompute activations of each decoder layer and vision block in backward (non-reentrant)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    freeze_vision_tower: bool = False
    """Keep the vision tower's patch embedding (and Qwen3-VL's position embedding) and blocks fixed (the merger
    still trains unless --freeze-merger). Frozen parts get no gradients and no optimizer state."""
    freeze_merger: bool = False
    """Keep the vision-to-language merger fixed (and Qwen3-VL's DeepStack mergers)."""
    freeze_llm: bool = False
    """Keep the language model fixed: its embeddings, decoder layers, final norm and lm_head (tied or not)."""
    unfreeze_topk_llm: int = 0
    """Train only the last K decoder layers of the language model; the rest of it is frozen (implies
    --freeze-llm for the others, embeddings, final norm and lm_head included)."""
    unfreeze_topk_vision: int = 0
    """Train only the last K vision blocks; the patch embedding and the other blocks are frozen."""
    load_weights_on: Literal["rank0", "every-rank"] = "rank0"
    """Who reads the checkpoint's safetensors files while FSDP wraps the model, one tensor at a time: rank 0,
    which broadcasts each tensor to the others, or every rank for itself (no broadcast; the files must be
    readable on every node)."""


LORA_LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraArgs:
    lora_rank: int = 0
    """Train rank-R LoRA adapters (peft: `pip install 'ftloop[lora]'`) beside a frozen base, which is held in
    bf16 under --bf16 (the adapters in --param-dtype); 0: no adapters, the chosen parts train whole."""
    lora_alpha: float = 16.0
    """The adapters' scale: each adds (alpha / rank) x B A to its projection."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input."""
    lora_target_modules: tuple[str, ...] = LORA_LLM_TARGETS
    """Projections of every decoder layer that get an adapter (names inside the layer)."""
    lora_vision_target_modules: tuple[str, ...] = ()
    """Projections of every vision block that get one (Qwen2.5-VL: qkv proj gate_proj up_proj down_proj);
    none by default: the vision tower stays as it is."""
    merge_lora: bool = True
    """Export `final` as whole merged weights beside `final/adapter`; --no-merge-lora: `final/adapter` only."""


@dataclass
class DataArgs:
    train_data: str = ""
    """Training rows: a .json (array) or .jsonl file, a Hugging Face dataset folder (`save_to_disk`; its
    `train` split), a .parquet or .arrow file, or a hub dataset name (org/name; needs network or the HF cache).
    Rows in LLaVA layout (`conversations`, `image`, `video`) or messages layout (`messages`, `images`)."""
    eval_data: str = ""
    """Held-out rows, in any form --train-data takes (a DatasetDict gives its `validation`, else `test`
    split); empty disables evaluation unless --eval-ratio is set."""
    eval_ratio: float = 0.0
    """Without --eval-data: hold out this fraction of the training rows (at least 1) for evaluation, chosen
    by --seed, the same at every world size. 0: no held-out set."""
    data_format: Literal["auto", "llava", "messages"] = "auto"
    """Row layout: `auto` tells it per file from the first rows' keys (`conversations`: llava, `messages`:
    messages)."""
    image_folder: str = ""
    """Folder that relative image paths in the data are resolved against (default: the data file's folder,
    a dataset folder itself, or the working directory for a hub dataset)."""
    max_seq_length: int = 2048
    """Longest token sequence, image tokens included."""
    truncation: Literal["drop", "right"] = "drop"
    """Rows longer than --max-seq-length: `drop` them (counted), or `right`: cut their text after the last
    image (never through an image: its tokens and features must stay paired)."""
    skip_bad_rows: bool = False
    """Train without rows that fail the check before training (counted) instead of refusing to start."""
    group_by_length: bool = True
    """Batch rows (or packs) of similar length together to cut padding, within windows of
    --length-group-steps steps."""
    length_group_steps: int = 1
    """With --group-by-length: steps' worth of rows sorted by length together. 1: each step holds the rows it
    would hold without grouping (so the same learning), sorted so that similar lengths share a micro-batch
    and an accumulation round. N > 1: rows sorted within N steps' worth, each step taking micro-batches from
    across that order, the steps shuffled: less padding still, but rows batched together are alike in length
    and so in kind, which at small global batches costs held-out loss (README: Batching)."""
    packing: bool = False
    """Concatenate several rows into each sequence of a micro-batch, up to --max-tokens-per-batch tokens, in
    place of padding every row to the longest: each row keeps its own positions, attends only to itself, and
    its labels stay its own. --per-device-train-batch-size then counts packed sequences."""
    max_tokens_per_batch: int = 0
    """With --packing: most tokens in one packed sequence (0: --max-seq-length). At least --max-seq-length, so
    every row fits: a longer row is dropped or cut first, as --truncation says."""
    system_prompt: str | None = None
    """System prompt of a conversation that has none (default: the family's, as its chat template inserts it:
    "You are a helpful assistant." for Qwen2-VL and Qwen2.5-VL, none for Qwen3-VL; "" for none)."""
    min_pixels: int | None = None
    """Smallest area (pixels) an image or video frame is resized to (default: the checkpoint's preprocessor
    config). Exported with the image processor."""
    max_pixels: int | None = None
    """Largest area (pixels) an image or video frame is resized to: fewer pixels, fewer vision tokens (default:
    the checkpoint's preprocessor config). Exported with the image processor."""
    max_images_per_sample: int = 0
    """Rows with more images are bad rows (see --skip-bad-rows); videos do not count. 0: no limit."""
    dataloader_num_workers: int = 1
    """Worker processes that load images and tokenise per rank (the HF default). Raise it when the log's
    `data_wait_s` is more than a few percent of `step_time_s`: each worker prepares whole micro-batches."""
    max_eval_samples: int = 0
    """Evaluate on the first N held-out rows that pass the check (the same rows at every world size); 0: all."""

    @property
    def sequence_tokens(self) -> int:
        """The most tokens in one sequence of a micro-batch: a packed sequence or a row."""
        return (self.max_tokens_per_batch or self.max_seq_length) if self.packing else self.max_seq_length


@dataclass
class OptimArgs:
    optim: Literal["adafactor", "adamw"] = "adafactor"
    """ftloop's Adafactor (scale_parameter=False, relative_step=False, as the HF Trainer) or torch AdamW."""
    learning_rate: float = 1e-5
    """Peak learning rate."""
    vision_lr: float | None = None
    """Learning rate of the vision tower's blocks and patch embedding (default: --learning-rate)."""
    merger_lr: float | None = None
    """Learning rate of the vision-to-language merger, Qwen3-VL's DeepStack mergers too (default:
    --learning-rate)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on weight matrices (never on biases and norm weights)."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after the linear warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the total optimizer steps spent warming the learning rate up from 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    bf16_master_rounding: Literal["stochastic", "kahan", "nearest"] = "stochastic"
    """With --param-dtype bf16, how Adafactor writes each update into the bf16 weights. `nearest` rounds, which
    loses every update smaller than half a bf16 step (most of them at fine-tuning learning rates);
    `stochastic` rounds up or down with the probabilities that make the expected weight exact (no extra memory);
    `kahan` keeps the rounding error in a bf16 compensation buffer (2 bytes per parameter) and adds it back."""


@dataclass
class FSDPArgs:
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    """How parameters, gradients and optimizer state are split across ranks."""
    bf16: bool = True
    """bf16 mixed precision for forward, backward and gradient reduction; --no-bf16 computes in fp32."""
    buffer_dtype: Dtype = "fp32"
    """dtype of module buffers under bf16. fp32 keeps the rotary inverse frequencies exact: in bf16 they
    carry 3 significant digits and the rotary angle at position 2000 is off by whole radians."""
    reduce_dtype: Dtype = "fp32"
    """dtype in which gradients are reduce-scattered (and so summed over ranks) under --bf16; bf16 halves the
    traffic and rounds every rank's contribution."""
    cpu_offload: bool = False
    """Keep sharded parameters and gradients in host memory (slow; for models that do not fit)."""
    use_orig_params: bool = False
    """Expose original parameters instead of flat ones to the optimizer."""
    limit_all_gathers: bool = True
    """Rate-limit all-gathers so memory does not spike when the CPU runs ahead of the GPU."""
    forward_prefetch: bool = False
    """Issue the next all-gather before the current forward computation."""


@dataclass
class TrainArgs:
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, checkpoints and the exported `best` and `final` folders are written."""
    max_steps: int = -1
    """Total optimizer steps; -1 derives them from --num-train-epochs."""
    num_train_epochs: float = 3.0
    """Epochs over the training data, used when --max-steps is -1."""
    per_device_train_batch_size: int = 1
    """Sequences per micro-batch on each rank."""
    per_device_eval_batch_size: int = 1
    """Sequences per evaluation batch on each rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    logging_steps: int = 10
    """Log loss, lr, grad norm, throughput and memory every this many optimizer steps."""
    eval_steps: int = 100
    """Evaluate every this many optimizer steps (and at the end)."""
    eval_on_start: bool = False
    """Also evaluate before the first step, as a baseline."""
    save_steps: int = 500
    """Write a sharded checkpoint every this many optimizer steps; 0 disables."""
    save_grace_s: float = 25.0
    """Seconds a save may take and still finish inside a preemption's grace period (torchrun kills its workers
    --shutdown-timeout 30 s after its own SIGTERM). A save that took longer is said at the start of the next."""
    save_total_limit: int = 0
    """Keep only the newest this many checkpoints (the one of the best eval loss is always kept); 0 keeps all."""
    resume_from_checkpoint: str = ""
    """`auto`: continue from the newest complete checkpoint in --output-dir (a fresh start when there is none);
    or the path of a `checkpoint-<step>` folder."""
    overwrite_output_dir: bool = False
    """Start afresh in an --output-dir that holds a run already: its checkpoints, `best`, `final` and
    metrics.jsonl are deleted first. Without it, such a folder is refused unless the run resumes."""
    allow_dtype_change: bool = False
    """Resume even when the checkpoint's parameters or optimizer state were saved in other dtypes than this
    run configures (they are cast on load)."""
    max_bad_steps: int = 5
    """Steps with a non-finite loss or gradient norm are skipped (no update); stop after this many in a row."""
    load_best_model_at_end: bool = True
    """Export the weights of the lowest eval loss as `final` (they are always exported as `best`)."""
    seed: int = 42
    """Seed for data order, dropout and initialisation."""
    save_dtype: Dtype = "bf16"
    """dtype of the exported safetensors."""
    max_shard_size: str = "5GB"
    """Largest safetensors file in an export (e.g. 5GB, 500MB)."""
    report_to: Literal["wandb", "none"] = "wandb"
    """Where metrics go besides the console and metrics.jsonl; wandb runs offline without credentials."""
    wandb_project_name: str = "ftloop"
    """wandb project."""
    run_name: str = ""
    """wandb run name (default: the output folder's name)."""
    memory_check: bool = True
    """On GPUs, refuse before loading a run whose memory plan (`python -m ftloop.plan`) does not fit, naming the
    flag to change. The plan assumes the worst (every position supervised, 4 image patches per token);
    --no-memory-check runs it anyway."""
    ddp_timeout: int = 1800
    """Seconds a collective (all-gather, all-reduce, barrier) may wait for the other ranks before the run fails
    instead of hanging."""


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    fsdp: FSDPArgs = field(default_factory=FSDPArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (decimal units, as transformers' max_shard_size); 'MiB' style is binary."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", text.upper())
    if not match:
        raise ConfigError(f"--max-shard-size {text!r}: give a size such as 5GB or 500MB")
    number, unit = float(match.group(1)), match.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(number * base**power)


RUN_OUTPUTS = ("metrics.jsonl", "final", "best")  # with checkpoint-*: what a run leaves in --output-dir


def previous_run(output_dir: str) -> list[str]:
    """What an earlier run left in `output_dir` (names), or [] for a new or unrelated folder."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in RUN_OUTPUTS or re.fullmatch(r"checkpoint-\d+(\.tmp|\.old)?", name))


def parse_args(argv: list[str] | None = None) -> Config:
    return tyro.cli(
        Config,
        args=argv,
        config=(tyro.conf.OmitArgPrefixes,),
        prog="python -m ftloop.train",
        description="Fine-tune a Qwen2.5-VL, Qwen2-VL or Qwen3-VL model with FSDP. Run under torchrun for several "
                    "processes.",
    )
