"""Model FLOPs of a training step, and MFU: the share of the GPUs' peak bf16 throughput that does the model's work.

The count (PaLM's, as nanoGPT and torchtitan report MFU; the recomputation of gradient checkpointing is not model
work and is not counted), per step:

- language model: 6 x its trainable matmul parameters (Linear weights; embeddings are a lookup) per real token
  (2 for the forward, 4 for the backward's input and weight gradients); lm_head's only per supervised token,
  since ftloop's loss computes logits there alone (ftloop.loss);
- attention: 12 x layers x (heads x head_dim) x the sum over the step's sequences of their real length^2 (a packed
  row: its own length); not halved for the causal mask, as PaLM does not. Only full-attention layers count:
  Qwen3.5's Gated DeltaNet layers are linear in length, their recurrence (~4 x value heads x key dim x value dim
  per token, well under 1% of their matmuls) left out like the vision tower's attention;
- vision tower: per patch, 6 x its trainable matmul parameters, 4 x the patch embedding's when it trains (its
  input, the pixels, needs no gradient), 2 x every frozen one (a frozen tower still runs forward); a merger's
  matrices take merge_size^2 patches at a time; its attention is left out (windowed: a small share).

A frozen language model's work is thus not counted (nor, with LoRA, the frozen matrices': only the adapters
train): MFU measures the work on what trains, and reads low for those runs; compare it between runs of one
configuration. Tested against a hand count and against torch's FlopCounterMode on the model's forward and
backward (tests/test_flops.py). The peak is the dense bf16 throughput of one GPU (PEAK_BF16_TFLOPS, told from
`torch.cuda.get_device_name`), or --peak-tflops; on a CPU, or a GPU not in the table, no MFU without the flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, per GPU (SXM)


@dataclass(frozen=True)
class FlopModel:
    """FLOPs per unit of a step's work."""
    per_token: int  # the language model's matmuls, per real token
    per_supervised_token: int  # lm_head's, per supervised token
    per_patch: int  # the vision tower's, per patch
    layers: int
    attention_width: int  # query heads x head_dim

    def step_flops(self, tokens, supervised, attention_pairs, patches):
        """FLOPs of a step with `tokens` real and `supervised` supervised tokens, sum of squared sequence lengths
        `attention_pairs` and `patches` vision patches (numbers or tensors: the loop keeps them on the device)."""
        return (self.per_token * tokens + self.per_supervised_token * supervised
                + 12 * self.layers * self.attention_width * attention_pairs + self.per_patch * patches)


def flop_model(model: nn.Module, text_config) -> FlopModel:
    """The counts of `model` (the unwrapped Hugging Face model, on any device, meta included, after freezing and
    adapters), whose language model's dimensions are `text_config`'s."""
    per_token = per_supervised = per_patch = 0
    merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", 1) ** 2
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv3d)):
            continue
        weight, trains = module.weight, module.weight.requires_grad
        if ".visual." in f".{name}.":
            numel = weight.numel() // merge if "merger" in name else weight.numel()
            per_patch += numel * (2 if not trains else 4 if isinstance(module, nn.Conv3d) else 6)
        elif trains and name.split(".")[-1] == "lm_head":
            per_supervised += 6 * weight.numel()
        elif trains:
            per_token += 6 * weight.numel()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    attention_layers = sum(kind != "linear_attention" for kind in layer_types)
    return FlopModel(per_token, per_supervised, per_patch, attention_layers, text_config.num_attention_heads * head_dim)


def batch_work(batch: dict) -> tuple[float, float]:
    """(sum over its sequences of real length^2, vision patches) of one micro-batch, from its host tensors. A packed
    batch's sequences are its rows (`segment_lengths`, the padding after the last row left out)."""
    if "segment_lengths" in batch:
        segments, real = batch["segment_lengths"], batch["attention_mask"].sum(1).tolist()
        pairs, row, at = 0.0, 0, 0
        for length in segments:
            if at < real[row]:  # a row; the segment after the last row of a sequence is its padding
                pairs += float(length) ** 2
            at += length
            if at >= batch["attention_mask"].shape[1]:
                row, at = row + 1, 0
    else:
        pairs = float((batch["attention_mask"].sum(1).double() ** 2).sum())
    patches = sum(float(batch[key].prod(-1).sum()) for key in ("image_grid_thw", "video_grid_thw") if key in batch)
    return pairs, patches


def peak_flops(device: torch.device, peak_tflops: float | None) -> float | None:
    """One device's peak FLOP/s: --peak-tflops, else the table's entry for this GPU, else None (no MFU)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for gpu, tflops in PEAK_BF16_TFLOPS.items() if gpu in name), None)
