"""Typed run configuration and its checks.

Each group is a dataclass whose attribute docstrings are the `--help` text (tyro reads them) and whose `check()`
refuses its own bad values in one line naming the flag; `Config.check()` runs them all, then the checks across
groups, before any process group or model exists. Flags keep
the Hugging Face TrainingArguments names without a group prefix (`--learning-rate`, not
`--optim.learning-rate`), so a command line written for the HF Trainer mostly carries over. Defaults are
the ones of the guide this project grew from: Adafactor without relative steps or parameter scaling,
constant schedule with warmup, bf16 compute and eval, FSDP full shard with backward prefetch, gradient
checkpointing (non-reentrant), best model by eval loss, wandb reporting.

This file is long because it is the one home of every flag: each group's fields, their `--help` text and their
checks, and the parsing that turns a command line (HF spellings included) into a Config.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Annotated, Literal, get_type_hints

import torch
import tyro

from ftloop.errors import ConfigError
from ftloop.loss import LOSS_CHUNK_SIZE

Dtype = Literal["bf16", "fp32"]


@dataclass
class ModelArgs:
    model_name_or_path: str = ""
    """Qwen2.5-VL, Qwen2-VL or Qwen3-VL folder in Hugging Face layout, or a hub id (needs network or the HF cache)."""
    param_dtype: Dtype = "fp32"
    """dtype of the master weights the optimizer updates. fp32 keeps small updates from vanishing."""
    gradient_checkpointing: bool = True
    """Recompute activations of each decoder layer and vision block in backward (non-reentrant)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers. `auto`: flash_attention_2 on NVIDIA GPUs under --bf16 when flash-attn
    imports (`pip install 'ftloop[flash]'`), else sdpa; the start line says which."""
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
    loss_chunk_size: int = LOSS_CHUNK_SIZE
    """Supervised positions whose logits (positions x vocabulary, in fp32 for the loss) exist at once: the loss is
    computed chunk by chunk and each chunk's logits are recomputed in backward. 0: all at once (one matmul less, and
    12 bytes per position x vocabulary entry at its peak: 3.5 GiB for 2k positions at Qwen's 152k vocabulary)."""
    load_weights_on: Literal["rank0", "every-rank"] = "rank0"
    """Who reads the checkpoint's safetensors files while FSDP wraps the model, one tensor at a time: rank 0,
    which broadcasts each tensor to the others, or every rank for itself (no broadcast; the files must be
    readable on every node)."""

    def check(self) -> None:
        check_model_path(self.model_name_or_path)
        _need(self.loss_chunk_size >= 0, "--loss-chunk-size must be 0 (one chunk) or positive")
        _need(self.unfreeze_topk_llm >= 0 and self.unfreeze_topk_vision >= 0,
              "--unfreeze-topk-llm and --unfreeze-topk-vision must be 0 (off) or positive")

    def attention(self, bf16: bool = True) -> str:
        """The attention implementation transformers gets: --attn-implementation, with `auto` resolved."""
        if self.attn_implementation != "auto":
            return self.attn_implementation
        return "flash_attention_2" if bf16 and torch.cuda.is_available() and flash_attention_imports() else "sdpa"

    def check_attention(self, bf16: bool) -> None:
        if self.attn_implementation != "flash_attention_2":
            return
        _need(flash_attention_imports(), "--attn-implementation flash_attention_2: flash-attn does not import here "
              "(install it with `pip install 'ftloop[flash]'`, built for this torch and CUDA); or use sdpa or auto")
        _need(bf16, "--attn-implementation flash_attention_2 computes in bf16 only, and --no-bf16 computes in fp32: "
              "drop --no-bf16, or use sdpa")
        _need(torch.cuda.is_available(), "--attn-implementation flash_attention_2 runs on NVIDIA GPUs only, and none "
              "is visible here; use sdpa or auto")

    def freezes(self) -> list[str]:
        """The freeze flags given, as the user wrote them."""
        return [f"--{name.replace('_', '-')}" for name in ("freeze_vision_tower", "freeze_merger", "freeze_llm",
                                                          "unfreeze_topk_llm", "unfreeze_topk_vision")
                if getattr(self, name)]

    def trains_something(self) -> bool:
        vision = not self.freeze_vision_tower or self.unfreeze_topk_vision > 0
        llm = not self.freeze_llm or self.unfreeze_topk_llm > 0
        return vision or llm or not self.freeze_merger


# The attention and MLP projections, and Qwen3.5's Gated DeltaNet projections (its query-key-value, output-gate and
# output projections; the per-head decay and beta inputs, in_proj_a and in_proj_b, are a few outputs wide). A default
# name a model does not have is skipped (ftloop.lora.check_targets); a name given by flag must exist.
LORA_LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "in_proj_qkv", "in_proj_z", "out_proj")


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
    """Projections of the decoder layers that get an adapter (names inside a layer; default: attention and MLP
    projections, and Qwen3.5's DeltaNet in_proj_qkv, in_proj_z and out_proj, each where the model has it)."""
    lora_vision_target_modules: tuple[str, ...] = ()
    """Projections of every vision block that get one (Qwen2.5-VL: qkv proj gate_proj up_proj down_proj);
    none by default: the vision tower stays as it is."""
    merge_lora: bool = True
    """Export `final` as whole merged weights beside `final/adapter`; --no-merge-lora: `final/adapter` only."""

    def check(self) -> None:
        if not self.lora_rank:  # LoRA flags without adapters would be silently ignored
            given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(LoraArgs)
                     if getattr(self, f.name) != f.default and f.name != "lora_rank"]
            _need(not given, f"{', '.join(given)} set without --lora-rank; give the adapters' rank, or drop them")
            return
        _need(self.lora_rank > 0, "--lora-rank must be 0 (off) or positive")
        _need(self.lora_alpha > 0, "--lora-alpha must be positive")
        _need(0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        _need(bool(self.lora_target_modules or self.lora_vision_target_modules),
              "--lora-rank with no --lora-target-modules or --lora-vision-target-modules: name the projections")


@dataclass(frozen=True)
class VideoArgs:
    """How a video file is sampled and sized, as Qwen's own tools do (qwen-vl-utils; ftloop.data.video): frames at
    --video-fps between --video-min-frames and --video-max-frames (an even count: the temporal patch), each
    resized within --video-min-pixels .. --video-max-pixels and within the video's share of --video-total-pixels.
    The pixel defaults are qwen-vl-utils', in tokens of the model's patch: with f = patch_size x merge_size (28
    for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL), 128 f^2, 768 f^2 and 0.9 x 128000 f^2. A video given as a list
    of frame images takes all its frames, each within --min-pixels / --max-pixels, as qwen-vl-utils does."""
    video_fps: float = 2.0
    """Frames sampled per second of a video file (a row's own `fps` / `video_fps` for a video wins)."""
    video_min_frames: int = 4
    """Fewest frames sampled from a video file (rounded up to an even count; a shorter video gives all it has)."""
    video_max_frames: int = 768
    """Most frames sampled from a video file (rounded down to an even count)."""
    video_min_pixels: int | None = None
    """Smallest area (pixels) of a video file's frames (default: 128 f^2 = 100,352 for Qwen2/2.5-VL, 131,072 for
    Qwen3-VL)."""
    video_max_pixels: int | None = None
    """Largest area (pixels) of a video file's frames (default: 768 f^2 = 602,112 for Qwen2/2.5-VL, 786,432 for
    Qwen3-VL)."""
    video_total_pixels: int | None = None
    """Pixels of all a video file's frames together: each frame gets at most 2 x this / frames, never below 1.05 x
    --video-min-pixels (default: 0.9 x 128000 f^2 = 90,316,800 for Qwen2/2.5-VL, 117,964,800 for Qwen3-VL; lower
    it to fit long videos in --max-seq-length)."""

    def check(self) -> None:
        _need(self.video_fps > 0, "--video-fps must be positive")
        _need(self.video_min_frames >= 1, "--video-min-frames must be 1 or more")
        _need(self.video_max_frames >= 2, "--video-max-frames must be 2 or more (frames go in pairs)")
        _need(self.video_min_frames <= self.video_max_frames,
              f"--video-min-frames {self.video_min_frames} is above --video-max-frames {self.video_max_frames}")
        for name in ("video_min_pixels", "video_max_pixels", "video_total_pixels"):
            value = getattr(self, name)
            _need(value is None or value > 0, f"--{name.replace('_', '-')} must be positive")
        low, high = self.video_min_pixels, self.video_max_pixels
        _need(low is None or high is None or low <= high,
              f"--video-min-pixels {low} is above --video-max-pixels {high}; give --video-min-pixels <= "
              "--video-max-pixels")


@dataclass
class DataArgs:
    train_data: Annotated[str, tyro.conf.arg(aliases=("--data-path",))] = ""
    """Training rows: a .json (array) or .jsonl file, a Hugging Face dataset folder (`save_to_disk`; its `train`
    split), a .parquet or .arrow file, or a hub dataset name (org/name; needs network or the HF cache). Rows in
    LLaVA layout (`conversations`, `image`, `video`) or messages layout (`messages`, `images`); or
    `DIR/dataset_info.json:NAME`, data set NAME of LLaMA-Factory's table, read as LLaMA-Factory reads it; or a
    mixture file (`.yaml`: a list of `- path: ...` with optional `image_folder` and `weight`) for several. Also
    --data-path, the name in 2U1's and Qwen's older scripts."""
    eval_data: Annotated[str, tyro.conf.arg(aliases=("--eval-path",))] = ""
    """Held-out rows, in any form --train-data takes (a DatasetDict gives its `validation`, else `test` split);
    empty disables evaluation unless --eval-ratio is set. Also --eval-path, 2U1's name."""
    eval_ratio: float = 0.0
    """Without --eval-data: hold out this fraction of the training rows (at least 1) for evaluation, chosen
    by --seed, the same at every world size. 0: no held-out set."""
    data_format: Literal["auto", "llava", "messages", "query"] = "auto"
    """Row layout: `auto` tells it per file from the first rows' keys (`conversations`: llava, `messages`:
    messages, `query` or `conversation`: query, ms-swift's query/response/history rows)."""
    image_folder: str = ""
    """Folder that relative image paths in the data are resolved against (default: the data file's folder,
    a dataset folder itself, or the working directory for a hub dataset)."""
    max_seq_length: Annotated[int, tyro.conf.arg(aliases=("--model-max-length", "--cutoff-len",
                                                          "--max-length"))] = 2048
    """Longest token sequence, image tokens included (also --model-max-length, the name in the HF Trainer's and
    Qwen's scripts; --cutoff-len, LLaMA-Factory's; --max-length, ms-swift's and TRL's)."""
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
    "You are a helpful assistant." for Qwen2-VL and Qwen2.5-VL, none for Qwen3-VL and Qwen3.5; "" for none)."""
    empty_think: Literal["context", "trained", "none"] = "context"
    """Qwen3.5 (whose post-trained chat templates write an empty `<think>\n\n</think>\n\n` before an answer
    without reasoning): a final reply (after the last user turn) that holds no `<think>` gets the empty block, as
    the template renders it at inference with thinking off, where it ends the prompt: `context` (default) puts it
    in the row untrained, `trained` trains it as part of the reply (the model learns to close an empty think block
    itself), `none` leaves it out. A reply that holds `<think>` trains as written. Other families write none."""
    min_pixels: int | None = None
    """Smallest area (pixels) an image or a listed video frame is resized to (default: the checkpoint's
    preprocessor config; video files: --video-min-pixels). Exported with the image processor."""
    max_pixels: int | None = None
    """Largest area (pixels) an image or a listed video frame is resized to: fewer pixels, fewer vision tokens
    (default: the checkpoint's preprocessor config; video files: --video-max-pixels). Exported with the image
    processor."""
    video: VideoArgs = field(default_factory=VideoArgs)
    """Video files: how their frames are sampled and sized."""
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

    def check(self, need_data: bool = True) -> None:
        """The data flags on their own. Whether --train-data / --eval-data can be read is the data package's
        check (ftloop.data.sources.check_sources), and the pixel limits against the checkpoint's are checked
        where the image processor is loaded (ftloop.data.media)."""
        _need(bool(self.train_data) or not need_data,
              "--train-data is required: a .json/.jsonl file, a dataset folder or a hub name")
        _need(0 <= self.eval_ratio < 1, "--eval-ratio must be in [0, 1)")
        _need(not (self.eval_ratio > 0 and self.eval_data),
              "--eval-ratio holds out training rows instead of --eval-data; give one of the two")
        _need(not self.image_folder or os.path.isdir(self.image_folder),
              f"--image-folder {self.image_folder}: folder not found")
        _need(self.max_seq_length > 0, "--max-seq-length must be positive")
        _need(self.dataloader_num_workers >= 0, "--dataloader-num-workers must be 0 or more")
        _need(self.max_eval_samples >= 0, "--max-eval-samples must be 0 (all) or positive")
        _need(self.length_group_steps >= 1, "--length-group-steps must be 1 or more")
        _need(self.max_tokens_per_batch == 0 or self.packing,
              "--max-tokens-per-batch is the size of a packed sequence; pass --packing with it")
        _need(self.max_tokens_per_batch == 0 or self.max_tokens_per_batch >= self.max_seq_length,
              f"--max-tokens-per-batch {self.max_tokens_per_batch} is below --max-seq-length {self.max_seq_length}: "
              "a row that long could not be packed; raise it, or lower --max-seq-length (longer rows are then "
              "dropped or cut as --truncation says)")
        _need(self.min_pixels is None or self.min_pixels > 0, "--min-pixels must be positive")
        _need(self.max_pixels is None or self.max_pixels > 0, "--max-pixels must be positive")
        _need(self.min_pixels is None or self.max_pixels is None or self.min_pixels <= self.max_pixels,
              f"--min-pixels {self.min_pixels} is above --max-pixels {self.max_pixels}; give --min-pixels <= "
              "--max-pixels")
        _need(self.max_images_per_sample >= 0, "--max-images-per-sample must be 0 (no limit) or positive")
        self.video.check()


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

    def check(self) -> None:
        _need(self.learning_rate > 0, "--learning-rate must be positive")
        _need(self.weight_decay >= 0, "--weight-decay must be 0 or more")
        _need(self.vision_lr is None or self.vision_lr > 0, "--vision-lr must be positive")
        _need(self.merger_lr is None or self.merger_lr > 0, "--merger-lr must be positive")
        _need(0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        _need(self.max_grad_norm >= 0, "--max-grad-norm must be 0 (off) or positive")


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

    def check(self) -> None:
        _need(not (self.cpu_offload and self.sharding_strategy == "NO_SHARD"),
              "--cpu-offload needs a sharded --sharding-strategy")
        _need(not self.cpu_offload or torch.cuda.is_available(),
              "--cpu-offload moves GPU shards to host memory, and there is no GPU here; drop the flag")


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
    peak_tflops: float | None = None
    """Peak bf16 TFLOP/s of one device, for the `mfu` in the log and on the bar (default: from the GPU's name: A100
    312, H100 and H200 989, B200 2250, dense; none on a CPU or an unknown GPU)."""
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
    full_determinism: bool = False
    """The same results from the same inputs and world size on GPUs too (deterministic cuBLAS, scatter-adds and
    attention backward; ftloop.distributed.make_deterministic), at some speed. Without it a resumed GPU run
    continues the interrupted one closely but not bit for bit; on the CPU every run is deterministic anyway."""
    ddp_timeout: int = 1800
    """Seconds a collective (all-gather, all-reduce, barrier) may wait for the other ranks before the run fails
    instead of hanging."""

    def check(self) -> None:
        _need(self.per_device_train_batch_size > 0, "--per-device-train-batch-size must be positive")
        _need(self.per_device_eval_batch_size > 0, "--per-device-eval-batch-size must be positive")
        _need(self.gradient_accumulation_steps > 0, "--gradient-accumulation-steps must be positive")
        _need(self.max_steps > 0 or self.max_steps == -1,
              "--max-steps must be positive, or -1 to use --num-train-epochs")
        _need(self.max_steps > 0 or self.num_train_epochs > 0,
              "--num-train-epochs must be positive when --max-steps is -1")
        _need(self.logging_steps > 0, "--logging-steps must be positive")
        _need(self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be positive")
        _need(self.eval_steps > 0, "--eval-steps must be positive")
        _need(self.save_steps >= 0, "--save-steps must be 0 (off) or positive")
        _need(self.save_grace_s > 0, "--save-grace-s must be positive (seconds)")
        _need(self.save_total_limit >= 0, "--save-total-limit must be 0 (keep all) or positive")
        _need(self.max_bad_steps > 0, "--max-bad-steps must be positive")
        _need(self.ddp_timeout > 0, "--ddp-timeout must be positive (seconds)")
        resume = self.resume_from_checkpoint
        _need(resume in ("", "auto") or os.path.isdir(resume),
              f"--resume-from-checkpoint {resume}: folder not found; give a checkpoint-<step> folder or `auto`")
        _need(bool(self.output_dir), "--output-dir is required")
        _need(not os.path.isfile(self.output_dir), f"--output-dir {self.output_dir}: is a file; give a folder")
        earlier = previous_run(self.output_dir)
        _need(not earlier or resume or self.overwrite_output_dir,
              f"--output-dir {self.output_dir}: holds a run already ({', '.join(earlier[:3])}); continue it with "
              "--resume-from-checkpoint auto, give a new --output-dir, or pass --overwrite-output-dir to replace it")
        parse_size(self.max_shard_size)


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

    def check(self, need_data: bool = True) -> None:
        """Every flag that can be checked before any process group or model exists, each refusal one line naming
        the flag and what to do: each group's own, then those across groups. `need_data=False`: the data flags
        may be left out (the memory plan). ftloop.train also runs ftloop.data.sources.check_sources."""
        model, optim, lora = self.model, self.optim, self.lora
        model.check()
        self.data.check(need_data)
        lora.check()
        optim.check()
        self.fsdp.check()
        self.train.check()
        model.check_attention(self.fsdp.bf16)
        _need(not (lora.lora_rank and model.freezes()), "--lora-rank trains the adapters alone (every base weight "
              f"is frozen), so {(model.freezes() or [''])[0]} means nothing with it; drop it")
        _need(model.trains_something() or lora.lora_rank, "--freeze-vision-tower, --freeze-merger and --freeze-llm "
              "together leave nothing to train; drop one, or unfreeze the last blocks with --unfreeze-topk-llm / "
              "--unfreeze-topk-vision")
        _need(not (model.param_dtype == "bf16" and optim.optim == "adamw" and optim.bf16_master_rounding != "nearest"),
              "--param-dtype bf16 with --optim adamw rounds every update to the nearest bf16 (torch's AdamW has no "
              "compensated updates, and most fine-tuning updates vanish): use --optim adafactor, --param-dtype fp32, "
              "or pass --bf16-master-rounding nearest to accept it")


def flash_attention_imports() -> bool:
    """Whether flash-attn is installed and its CUDA extension loads (a build for another torch fails here)."""
    try:
        import flash_attn  # noqa: F401  (importing it is the check)
    except Exception:  # not installed, or built against another torch / CUDA: an ImportError or an OSError
        return False
    return True


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (decimal units, as transformers' max_shard_size); 'MiB' style is binary."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", text.upper())
    if not match:
        raise ConfigError(f"--max-shard-size {text!r}: give a size such as 5GB or 500MB")
    number, unit = float(match.group(1)), match.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(number * base**power)


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


RUN_OUTPUTS = ("metrics.jsonl", "final", "best")  # with checkpoint-*: what a run leaves in --output-dir


def previous_run(output_dir: str) -> list[str]:
    """What an earlier run left in `output_dir` (names), or [] for a new or unrelated folder."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in RUN_OUTPUTS or re.fullmatch(r"checkpoint-\d+(\.tmp|\.old)?", name))


def with_switch_values(argv: list[str]) -> list[str]:
    """`argv` with the HF Trainer's spelling of an on/off flag, `--bf16 True`, `--gradient_checkpointing=false` (as
    the scripts of Qwen, LLaMA-Factory and 2U1 pass them), written as tyro takes it: `--bf16`,
    `--no-gradient-checkpointing`."""
    switches = {name.replace("_", "-") for group in get_type_hints(Config).values()
                for name, kind in get_type_hints(group).items() if kind is bool}
    words, out, i = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}, [], 0
    while i < len(argv):
        flag, has_value, value = argv[i].partition("=")
        name = flag[2:].replace("_", "-")
        if flag.startswith("--") and name in switches:
            if not has_value and i + 1 < len(argv) and argv[i + 1].lower() in words:
                has_value, value, i = True, argv[i + 1], i + 1
            if has_value and value.lower() not in words:
                raise ConfigError(f"{argv[i]}: --{name} is on or off; give --{name} or --no-{name} (or --{name} "
                                  "True/False)")
            out.append(flag if not has_value else f"--{name}" if words[value.lower()] else f"--no-{name}")
        else:
            out.append(argv[i])
        i += 1
    return out


def parse_args(argv: list[str] | None = None) -> Config:
    """The flags in `argv` (default: the command line), in our spelling or the HF Trainer's (`--bf16 True`, and the
    aliases of other tools' names that --help lists beside ours)."""
    return tyro.cli(
        Config,
        args=with_switch_values(sys.argv[1:] if argv is None else argv),
        config=(tyro.conf.OmitArgPrefixes,),
        prog="python -m ftloop.train",
        description="Fine-tune a Qwen2.5-VL, Qwen2-VL or Qwen3-VL model with FSDP. Run under torchrun for several "
                    "processes.",
    )
