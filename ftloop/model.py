"""The model's skeleton and the module FSDP wraps.

Every rank builds the same skeleton on the meta device (no memory); FSDP then materialises it one unit at a
time and `ftloop.fsdp.load` fills each unit from the checkpoint's safetensors files. So no rank ever holds a
full copy, and the path is the same on CPU (where FSDP refuses `sync_module_states`) and on CUDA.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ftloop.config import Config, ModelArgs
from ftloop.data.model_folder import read_config
from ftloop.data.positions import packed_positions, vision_layout
from ftloop.errors import ConfigError
from ftloop.linear_attention import PackedRows, keep_rows_apart, linear_attention_kernels
from ftloop.lora import add_adapters, base_dtype
from ftloop.loss import LOSS_CHUNK_SIZE, supervised_loss

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_config(args: ModelArgs) -> PretrainedConfig:
    """--model-name-or-path's config.json, refused in one line when it cannot be read or is rejected
    (ftloop.data.model_folder.read_config)."""
    return read_config(args.model_name_or_path)


def build_meta_model(config: PretrainedConfig, args: ModelArgs, dtype: str | None = None,
                     bf16: bool = True) -> PreTrainedModel:
    """The model's structure without storage, in `dtype` (default: --param-dtype), with the attention
    --attn-implementation resolves to under `bf16` compute: costs no memory, identical on every rank."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=DTYPES[dtype or args.param_dtype], attn_implementation=args.attention(bf16)
        )
    model.config.use_cache = False  # a KV cache is useless in training and breaks checkpointing
    if args.gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # non-reentrant: works with FSDP and with frozen inputs
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def frozen_modules(model: PreTrainedModel, args: ModelArgs) -> list[nn.Module]:
    """The modules the freeze flags name (the model is not changed)."""
    visual, language = model.model.visual, model.model.language_model
    frozen: list[nn.Module] = []
    tower, mergers = vision_parts(visual)
    top_vision, top_llm = args.unfreeze_topk_vision, args.unfreeze_topk_llm
    for flag, k, blocks in (("--unfreeze-topk-vision", top_vision, visual.blocks),
                            ("--unfreeze-topk-llm", top_llm, language.layers)):
        if k > len(blocks):
            raise ConfigError(f"{flag} {k}: the model has {len(blocks)}; give at most that")
    if args.freeze_vision_tower or top_vision:
        frozen += [*tower, *visual.blocks[:len(visual.blocks) - top_vision]]
    if args.freeze_merger:
        frozen += mergers
    if args.freeze_llm or top_llm:
        rest = [m for name, m in language.named_children() if name != "layers"]  # embeddings, final norm
        frozen += [*rest, *language.layers[:len(language.layers) - top_llm], model.lm_head]
    return frozen


def vision_parts(visual: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the tower's modules besides its blocks: the patch embedding, and Qwen3-VL's learned position
    embedding; the mergers: the merger, and Qwen3-VL's DeepStack mergers of intermediate blocks' features)."""
    tower = [visual.patch_embed, *([visual.pos_embed] if hasattr(visual, "pos_embed") else [])]
    return tower, [visual.merger, *getattr(visual, "deepstack_merger_list", [])]


def separate_units(model: PreTrainedModel, frozen: list[nn.Module]) -> set[nn.Module]:
    """The modules that need FSDP units of their own once anything is frozen, so that no unit mixes frozen and
    trainable tensors (FSDP1 flattens a unit into one parameter, which has one requires_grad): the tower's
    modules besides its blocks and the mergers (`vision_parts`), which otherwise share the root unit with the
    language model's embeddings. Each runs through its own forward, which is where FSDP gathers a unit. Empty
    when nothing is frozen (the usual units)."""
    tower, mergers = vision_parts(model.model.visual)
    return {*tower, *mergers} if frozen else set()


def freeze_parts(model: PreTrainedModel, args: ModelArgs) -> set[nn.Module]:
    """Turn off requires_grad on what the freeze flags name; returns `separate_units`."""
    frozen = frozen_modules(model, args)
    for module in frozen:
        module.requires_grad_(False)
    return separate_units(model, frozen)


def wrapped_layer_classes(model: PreTrainedModel) -> set[type[nn.Module]]:
    """Decoder-layer and vision-block classes, found from the model rather than hard-coded by name."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"{type(model).__name__} declares no transformer layer classes to wrap with FSDP")
    return classes


@dataclass
class Skeleton:
    """The model a run wraps, on the meta device (no memory, identical on every rank): in its base dtype, with
    gradient checkpointing, the freeze flags' parts frozen and LoRA's adapters on; and the modules that become
    FSDP units. ftloop.train wraps it and ftloop.plan counts it: one builder, so the plan cannot drift from the run."""
    model: PreTrainedModel
    units: set[nn.Module]
    """Every module wrapped as an FSDP unit of its own (nested ones too); the rest goes to the root unit."""


def build_skeleton(cfg: Config, hf_config: PretrainedConfig) -> Skeleton:
    model = build_meta_model(hf_config, cfg.model, base_dtype(cfg), cfg.fsdp.bf16)
    own_units = freeze_parts(model, cfg.model)  # frozen and trainable tensors never share an FSDP unit
    if cfg.lora.lora_rank:
        own_units |= add_adapters(model, cfg.lora, DTYPES[cfg.model.param_dtype])
    return Skeleton(model, unit_roots(model, own_units))


def unit_roots(model: PreTrainedModel, own_units: set[nn.Module] = frozenset()) -> set[nn.Module]:
    """The modules FSDP wraps as units (its auto-wrap policy is membership in this set): every decoder layer and
    vision block, and `own_units` (what freezing keeps apart, LoRA's adapter matrices)."""
    classes = tuple(wrapped_layer_classes(model))
    return {m for m in model.modules() if isinstance(m, classes)} | set(own_units)


WRAPPER_PREFIX = "hf."  # parameter names under VisionLanguageSFT start with this; HF names do not


class VisionLanguageSFT(nn.Module):
    """The FSDP root: a Hugging Face vision-language model plus the supervised loss.

    Keeping the loss (and the one vision pass below) inside the root forward means everything a step
    computes runs under FSDP's root pre/post-forward logic, on every rank, in the same order.
    """

    def __init__(self, model: PreTrainedModel, loss_chunk_size: int = LOSS_CHUNK_SIZE,
                 packs_in_one_sequence: bool | None = None):
        """`packs_in_one_sequence`: lay a packed micro-batch out as one sequence (default: with flash-attention,
        whose varlen path transformers takes for a batch of one sequence only; with more, the packed rows would
        attend to each other). Under sdpa, several sequences keep its mask at batch x length^2."""
        super().__init__()
        self.hf = model
        self.loss_chunk_size = loss_chunk_size  # --loss-chunk-size
        if packs_in_one_sequence is None:
            packs_in_one_sequence = "flash" in (getattr(model.config, "_attn_implementation", None) or "")
        self.packs_in_one_sequence = packs_in_one_sequence
        vision = model.config.vision_config
        in_channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
        self.patch_dim = in_channels * vision.temporal_patch_size * vision.patch_size**2
        self.merge = vision.spatial_merge_size
        # The blank image of a text-only micro-batch (`_vision`): its grid and the tower's layout of it, made once on
        # the host (ftloop.data.positions.vision_layout), so that no micro-batch makes the tower read its grid.
        self.blank_grid = torch.tensor([[1, self.merge, self.merge]])
        self.blank_layout = vision_layout(self.blank_grid, vision)
        # Qwen2.5-VL spaces video frames in time by second_per_grid_ts; Qwen2-VL's forward has no such input.
        self.takes_seconds = "second_per_grid_ts" in inspect.signature(model.model.forward).parameters
        # Qwen3.5's Gated DeltaNet layers carry a state (and a causal conv1d's window) from token to token, which
        # position ids do not reset: packed, they are told where each row starts (ftloop.linear_attention).
        self.linear_attention = [layer.linear_attn for layer in model.model.language_model.layers
                                 if hasattr(layer, "linear_attn")]
        self.linear_kernels = bool(self.linear_attention) and linear_attention_kernels()
        keep_rows_apart(self.linear_attention, self.linear_kernels)

    def forward(self, input_ids, attention_mask, labels, mm_token_type_ids, pixel_values=None,
                image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                second_per_grid_ts=None, segment_lengths=None, segment_starts=None, segment_mask=None,
                segment_index=None, supervised_index=None, position_ids=None, vision_position_ids=None,
                vision_cu_seqlens=None, vision_max_seqlen=None, vision_window_index=None, vision_cu_window_seqlens=None,
                vision_max_window_seqlen=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sum of token cross-entropies over supervised tokens in fp32, count of those tokens).
        `segment_mask`, `segment_index`: a packed micro-batch's rows laid out one per line (ftloop.data.batches),
        each row attending only to itself; `segment_lengths`, `segment_starts`: where its rows start, for the
        linear-attention layers (ftloop.linear_attention); `supervised_index`: the
        positions the loss counts (ftloop.loss.supervised_index); `position_ids`: the rope positions
        (ftloop.data.positions). The collate computes them all on the host, so that nothing here waits for the
        device to learn a size; without `position_ids` the model computes them here. The `vision_` arguments: the
        vision tower's layout of this batch's patches (ftloop.data.positions.vision_layout), which the tower
        computes itself without them."""
        layout = {key: value for key, value in (
            ("position_ids", vision_position_ids), ("cu_seqlens", vision_cu_seqlens), ("max_seqlen", vision_max_seqlen),
            ("window_index", vision_window_index), ("cu_window_seqlens", vision_cu_window_seqlens),
            ("max_window_seqlen", vision_max_window_seqlen)) if value is not None}
        encoder_outputs, dummy = self._vision(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                              input_ids.device, layout)
        extra = {}
        if second_per_grid_ts is not None and self.takes_seconds:  # Qwen2.5-VL's video time positions
            extra["second_per_grid_ts"] = second_per_grid_ts
        if segment_mask is not None:
            if self.packs_in_one_sequence:  # each sequence starts a row, whose first label is ignored
                input_ids, labels, mm_token_type_ids = (t.reshape(1, -1) for t in (input_ids, labels,
                                                                                   mm_token_type_ids))
            # No attention mask: transformers then builds one from the text positions, attending only within
            # each run of consecutive positions, i.e. within each row (sdpa's mask; flash-attention's varlen
            # path, for one sequence).
            if position_ids is None:
                position_ids = packed_positions(input_ids, mm_token_type_ids, segment_mask, segment_index,
                                                image_grid_thw, video_grid_thw, self.hf.model.get_rope_index, **extra)
            extra["position_ids"] = position_ids.view(4, *input_ids.shape)
            attention_mask = None
            if self.linear_kernels:  # each position's row, as causal-conv1d reads it (the lines' row of its place)
                row_of = (segment_index // segment_mask.shape[1]).to(torch.int32).view(1, -1)
                extra["packed_rows"] = PackedRows.of(segment_lengths, segment_starts, row_of)
            elif self.linear_attention:
                extra["packed_rows"] = PackedRows.of(segment_lengths)
        elif position_ids is not None:
            extra["position_ids"] = position_ids
        # The grids and token types still go in: they give the 3D rope positions of image and video tokens.
        hidden = self.hf.model(
            input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, mm_encoder_outputs=encoder_outputs,
            use_cache=False, **extra,
        ).last_hidden_state
        loss_sum, count = supervised_loss(hidden, labels, self.hf.lm_head, self.loss_chunk_size, supervised_index)
        if dummy is not None:
            loss_sum = loss_sum + 0.0 * dummy
        return loss_sum, count

    def _vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, device: torch.device,
                layout: dict):
        """({"image": ..., "video": ...} encoder outputs for the HF model, or None; the dummy output, or None).

        FSDP gathers a vision block's weights when that block runs. Every rank must run the same vision
        blocks the same number of times in the same order, or one rank waits in an all-gather the others
        never start: a hang. The HF model runs the vision tower once for images and once more for videos,
        and not at all for text, which differs from rank to rank. So the tower runs here exactly once per
        micro-batch on every rank: on the image patches and video patches together (attention never crosses
        from one image or frame group to another, so this equals two passes), split back afterwards; without
        either, on one tiny blank image whose output counts zero times in the loss (all of it: Qwen3-VL's DeepStack
        features too, so that every merger gets its gradient, zero, on every rank).
        """
        visual = self.hf.model.visual
        dtype = visual.patch_embed.proj.weight.dtype  # the compute dtype under mixed precision
        parts = [(name, pixels, grid) for name, pixels, grid in
                 (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw))
                 if pixels is not None]
        if not parts:
            blank = {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                     for key, value in self.blank_layout.items()}
            pixels = torch.zeros(self.merge * self.merge, self.patch_dim, device=device, dtype=dtype)
            features, deepstack, _ = self._features(visual(pixels, grid_thw=self.blank_grid.to(device), **blank))
            return None, sum(f.float().sum() for f in [features, *(deepstack or [])])
        pixels = torch.cat([pixels for _, pixels, _ in parts]).to(dtype)
        features, deepstack, output_type = self._features(
            visual(pixels, grid_thw=torch.cat([grid for _, _, grid in parts]), **layout))
        outputs, offset = {}, 0
        for name, pixels, _ in parts:
            # The images' (videos') tokens: one per merge^2 patches, counted from the pixels' shape, which the host
            # knows, not from the grids' values, which it would wait to read. One chunk for them all: the HF model
            # concatenates the per-image chunks it is given before it places them.
            mine = slice(offset, offset + pixels.shape[0] // self.merge**2)
            fields = {"pooler_output": (features[mine],)}
            if deepstack is not None:  # Qwen3-VL: the same for each block feeding the decoder
                fields["deepstack_features"] = [(f[mine],) for f in deepstack]
            outputs[name] = output_type(**fields)
            offset = mine.stop
        return outputs, None

    @staticmethod
    def _features(out) -> tuple[torch.Tensor, list[torch.Tensor] | None, type]:
        """(merged features, Qwen3-VL's DeepStack features (the merged features of intermediate blocks, which
        its decoder adds at the vision tokens of its first layers; None for the other families), the output
        class the model's forward reads them from)."""
        if not hasattr(out, "pooler_output"):
            return out, None, BaseModelOutputWithPooling
        if not hasattr(out, "deepstack_features"):
            return out.pooler_output, None, BaseModelOutputWithPooling
        return out.pooler_output, list(out.deepstack_features or []), type(out)
