"""The Qwen vision-language families ftloop trains, told apart by config.json's `model_type`, and what differs
between them outside the model code (which transformers supplies): how a conversation is rendered.

- Qwen2-VL and Qwen2.5-VL: a default system prompt ("You are a helpful assistant.", which their chat
  templates insert), and each video one block of `<|video_pad|>` tokens.
- Qwen3-VL (dense): no default system prompt (its chat template inserts none), and each video one block per
  group of `temporal_patch_size` frames, after a `<t seconds>` timestamp, as its processor lays videos out
  (the model's 3D rope takes each group's block as one frame of the grid).
- Qwen3.5 (dense; Qwen3.6 and Qwen3.8 keep its `model_type`): Qwen3-VL's conversation and video layout (its
  processor is Qwen3-VL's), a hybrid decoder whose linear-attention layers carry a state from token to token.
"""

from __future__ import annotations


from ftloop.errors import ConfigError
from ftloop.linear_attention import linear_attention_kernels, missing_kernels

FAMILIES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "qwen3_5": "Qwen3.5"}
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2-VL's and Qwen2.5-VL's chat templates' default
LATER = {"qwen3_vl_moe": "Qwen3-VL-MoE", "qwen3_5_moe": "Qwen3.5-MoE"}  # known, not yet trained: refused rather than trained wrongly


def check_supported(model_type: str, where: str) -> None:
    """One ConfigError line unless ftloop trains this family."""
    if model_type in FAMILIES:
        return
    trains = ", ".join(FAMILIES.values())
    if model_type in LATER:
        raise ConfigError(f"{where}: a {LATER[model_type]} model ({model_type}), which ftloop does not train yet "
                          f"(its experts need their own FSDP wrapping and export); it trains {trains} (dense)")
    raise ConfigError(f"{where}: model_type {model_type!r} is not a family ftloop trains ({trains})")


QWEN3_LAYOUT = ("qwen3_vl", "qwen3_5")  # no default system prompt; timestamped videos


def default_system_prompt(model_type: str) -> str:
    return "" if model_type in QWEN3_LAYOUT else QWEN_SYSTEM_PROMPT


def timestamped_videos(model_type: str) -> bool:
    return model_type in QWEN3_LAYOUT


EMPTY_THINK = "<think>\n\n</think>\n\n"  # what Qwen3.5's chat templates write before a reply without reasoning


def empty_think_block(model_type: str) -> str:
    """The empty think block this family's chat template writes before a final reply without reasoning ("": none)."""
    return EMPTY_THINK if model_type == "qwen3_5" else ""


def linear_attention_path(model_type: str) -> str | None:
    """For a family with linear-attention layers (Qwen3.5), which implementation transformers runs them with, in a
    line for the start of a run; None for the others. transformers takes flash-linear-attention's chunked gated
    delta rule and causal-conv1d's kernel when they import, else its torch path."""
    if model_type != "qwen3_5":
        return None
    if linear_attention_kernels():
        return "linear attention: flash-linear-attention and causal-conv1d kernels"
    missing = " and ".join(sorted(missing_kernels()))
    return (f"linear attention: transformers' torch path ({missing} not installed; on GPUs "
            "`pip install 'ftloop[qwen3_5]'` runs a step about 2x faster)")


def deltanet_scalars_line(model_type: str, param_dtype: str) -> str | None:
    """For Qwen3.5 under --param-dtype bf16, a line for the start of a run: its DeltaNet layers' A_log and dt_bias
    are bf16 masters too (FSDP1 flattens a decoder layer into one parameter of one dtype), their fp32 updates
    rounded into bf16 as every weight's (--bf16-master-rounding). None otherwise: fp32 masters (the default) keep
    them fp32, the update computed and applied in fp32."""
    if model_type != "qwen3_5" or param_dtype != "bf16":
        return None
    return ("note: --param-dtype bf16 holds the DeltaNet layers' A_log and dt_bias in bf16 with the rest of their "
            "layer (FSDP1 flattens a layer into one dtype); --param-dtype fp32 keeps them fp32")

