"""The memory plan at the real Qwen2.5-VL sizes (meta device), checked against what is known outside it: the
published parameter counts, the bytes each dtype and optimizer keeps per parameter, a rank-64 LoRA's published
size, what autograd really saves (the activation formula), and how each flag moves the peak; the CLI's exit codes
and advice. (Per-rank memory measured on real CPU runs against the plan: test_loading.)"""

import dataclasses
import functools
import json

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from ftloop.config import Config, DataArgs, FSDPArgs, LoraArgs, ModelArgs, OptimArgs, TrainArgs
from ftloop.errors import ConfigError
from ftloop.model import build_skeleton
from ftloop.activations import decoder_layer_activation_bytes, vision_block_activation_bytes
from ftloop.plan import GIB, fsdp_units, plan_memory
from ftloop.plan import main as plan_main
from launch import forked_python_m

# The dimensions of Qwen2.5-VL-3B/7B/72B-Instruct's config.json (no weights).
VISION = dict(depth=32, hidden_size=1280, num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
              window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
              in_chans=3)
SIZES = {
    "3b": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
           dict(intermediate_size=3420, out_hidden_size=2048), True),
    "7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
           dict(intermediate_size=3420, out_hidden_size=3584), False),
    "72b": (dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
            dict(intermediate_size=3456, out_hidden_size=8192), False),
}
PUBLISHED = {"3b": 3.75, "7b": 8.29, "72b": 73.41}  # billions, as published


def config_dict(size: str) -> dict:
    text, vision, tied = SIZES[size]
    return {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": {**text, "model_type": "qwen2_5_vl_text", "max_position_embeddings": 128000,
                            "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
            "vision_config": {**VISION, **vision}, "tie_word_embeddings": tied,
            "image_token_id": 151655, "video_token_id": 151656}


@functools.lru_cache(maxsize=None)
def _skeleton(size: str, freezes: tuple, lora_rank: int):
    model = dict(zip(("freeze_vision_tower", "freeze_merger", "freeze_llm", "unfreeze_topk_llm"), freezes))
    cfg = run_config(model=model, lora={"lora_rank": lora_rank})
    return build_skeleton(cfg, Qwen2_5_VLConfig(**config_dict(size)))


def skeleton_for(size: str, cfg: Config):
    """The skeleton a run of `cfg` wraps (what ftloop.plan and ftloop.train both build), built once per size and
    set of flags that change it: the meta model is built anew only when freezing or LoRA differ."""
    m = cfg.model
    return _skeleton(size, (m.freeze_vision_tower, m.freeze_merger, m.freeze_llm, m.unfreeze_topk_llm),
                     cfg.lora.lora_rank)


def plan_for(size: str, cfg: Config, world: int, node: int, gpu_bytes: int | None = None):
    return plan_memory(skeleton_for(size, cfg), cfg, world, node, gpu_bytes)


def by_hand(size: str) -> dict:
    """Parameter counts of one decoder layer, one vision block and the root, from the dimensions alone."""
    text, vision, tied = SIZES[size]
    d, i, v = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    kv = text["num_key_value_heads"] * d // text["num_attention_heads"]
    layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * i + 2 * d  # q (bias), k, v (bias), o, MLP, 2 norms
    dv, iv = VISION["hidden_size"], vision["intermediate_size"]
    block = (dv * 3 * dv + 3 * dv) + (dv * dv + dv) + 2 * (dv * iv + iv) + (iv * dv + dv) + 2 * dv
    merged = 4 * dv
    root = (v * d) * (1 if tied else 2) + d  # embeddings (+ lm_head), final norm
    root += dv * 3 * 2 * 14 * 14 + dv + (merged * merged + merged) + (merged * d + d)  # patch embed, merger
    return {"layer": layer, "block": block, "root": root, "layers": text["num_hidden_layers"],
            "total": text["num_hidden_layers"] * layer + VISION["depth"] * block + root}


def run_config(**changes) -> Config:
    cfg = Config(ModelArgs(model_name_or_path="x"), DataArgs(max_seq_length=2048), OptimArgs(), FSDPArgs(),
                 TrainArgs(per_device_train_batch_size=1), LoraArgs())
    for group, values in changes.items():
        cfg = dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **values)})
    return cfg


@pytest.mark.parametrize("size", ["3b", "7b", "72b"])
def test_units_and_parameters_are_the_published_sizes(size):
    units, want = fsdp_units(skeleton_for(size, run_config())), by_hand(size)
    assert sum(u.numel for u in units) == want["total"]
    assert round(want["total"] / 1e9, 2) == PUBLISHED[size]
    assert units[-1].name == "root" and units[-1].numel == want["root"]
    assert sorted({u.numel for u in units[:-1]}) == sorted({want["layer"], want["block"]})
    assert len(units) == want["layers"] + VISION["depth"] + 1


def local_elements(size: str) -> int:
    """Elements each of 8 GPUs holds: every unit's flat parameter padded to a multiple of 8, as FSDP pads it."""
    hand = by_hand(size)
    return hand["layers"] * -(-hand["layer"] // 8) + VISION["depth"] * -(-hand["block"] // 8) + -(-hand["root"] // 8)


def test_72b_on_8_gpus_of_80_gib_with_bf16_masters_fits():
    hand = by_hand("72b")
    assert hand["layer"] == 877_684_736 and hand["root"] == 2_561_102_080 and hand["total"] == 73_410_777_344
    plan = plan_for("72b", run_config(model={"param_dtype": "bf16"}), 8, 8, 80 * GIB)
    assert plan.sharded_parameters.nbytes == local_elements("72b") * 2 == 18_352_694_336  # ~18 GB of bf16 per GPU
    assert plan.gradients.nbytes == local_elements("72b") * 2  # FSDP reduces into the master dtype
    assert plan.optimizer_state.nbytes < 0.2 * GIB  # factored: rows + columns, not a float per element
    assert plan.activations.nbytes < plan.activations_other / 10  # gradient checkpointing on (the default)
    assert plan.fits() and plan.peak_bytes < 70 * GIB  # with headroom


def test_72b_with_fp32_masters_does_not_fit_and_the_plan_names_the_flag(tmp_path, capsys):
    plan = plan_for("72b", run_config(), 8, 8, 80 * GIB)
    assert plan.sharded_parameters.nbytes == plan.gradients.nbytes == 18_352_694_336 * 2
    assert not plan.fits()
    folder = tmp_path / "qwen2.5-vl-72b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_dict("72b")))
    args = ["--model-name-or-path", str(folder), "--nproc-per-node", "8", "--gpu-memory-gib", "80"]
    refused = forked_python_m("ftloop.plan", args)  # its command line: needs no data, no tokenizer, no weights
    assert refused.returncode == 2, refused.stderr
    verdict = refused.stdout.strip().splitlines()[-1]
    assert "does not fit" in verdict and "--param-dtype bf16 brings it to" in verdict
    for term in ("sharded parameters", "gradients", "optimizer state", "largest unit", "root unit", "activations",
                 "logits", "peak"):
        assert term in refused.stdout
    assert plan_main([*args, "--param-dtype", "bf16"]) == 0
    assert "fits" in capsys.readouterr().out.strip().splitlines()[-1]
    # Data flags are not needed, but a given one that cannot be read is refused, as ftloop.train refuses it.
    with pytest.raises(ConfigError, match=f"--train-data {tmp_path / 'no.json'}: file not found"):
        plan_main([*args, "--param-dtype", "bf16", "--train-data", str(tmp_path / "no.json")])


def test_7b_with_accumulation_4_fits_with_fp32_masters():
    cfg = run_config(train={"gradient_accumulation_steps": 4})
    plan = plan_for("7b", cfg, 8, 8, 80 * GIB)
    assert plan.fits()
    # accumulation adds nothing: each micro-batch's gradient is reduce-scattered into the sharded gradient
    assert plan.peak_bytes == plan_for("7b", run_config(), 8, 8, 80 * GIB).peak_bytes
    assert plan.sharded_parameters.nbytes == 4 * local_elements("7b")


def test_the_plan_follows_the_flags():
    base = plan_for("7b", run_config(), 8, 8)
    kahan = plan_for("7b", run_config(model={"param_dtype": "bf16"}, optim={"bf16_master_rounding": "kahan"}), 8, 8)
    assert kahan.optimizer_state.nbytes - base.optimizer_state.nbytes == 2 * local_elements("7b")  # a bf16 buffer
    bf16_reduce = plan_for("7b", run_config(fsdp={"reduce_dtype": "bf16"}), 8, 8)
    assert bf16_reduce.largest_unit.nbytes < base.largest_unit.nbytes  # no fp32 copy of the unit's gradient
    hybrid = plan_for("7b", run_config(fsdp={"sharding_strategy": "HYBRID_SHARD"}), 16, 8)
    assert hybrid.sharded_parameters.nbytes == base.sharded_parameters.nbytes  # sharded within the node
    no_ckpt = plan_for("7b", run_config(model={"gradient_checkpointing": False}), 8, 8)
    assert no_ckpt.activations.nbytes == base.activations_other > 5 * base.activations.nbytes
    adamw = plan_for("7b", run_config(optim={"optim": "adamw"}), 8, 8)
    assert adamw.optimizer_state.nbytes == 2 * 4 * local_elements("7b")  # two fp32 moments per element
    grad_op = plan_for("7b", run_config(fsdp={"sharding_strategy": "SHARD_GRAD_OP"}), 8, 8)
    every_unit = by_hand("7b")["layers"] * by_hand("7b")["layer"] + VISION["depth"] * by_hand("7b")["block"]
    assert grad_op.largest_unit.nbytes >= every_unit * 2  # every unit stays gathered (bf16) until its backward
    offload = plan_for("7b", run_config(fsdp={"cpu_offload": True}), 8, 8)
    assert offload.sharded_parameters.nbytes == offload.gradients.nbytes == offload.optimizer_state.nbytes == 0
    assert plan_for("7b", run_config(), 16, 8).sharded_parameters.nbytes < base.sharded_parameters.nbytes
    # Frozen parts: no gradients, no optimizer state.
    want = by_hand("7b")
    vision = 32 * want["block"] + VISION["hidden_size"] * 3 * 2 * 14 * 14  # blocks and patch embedding
    frozen_tower = plan_for("7b", run_config(model={"freeze_vision_tower": True}), 8, 8)
    assert base.gradients.nbytes - frozen_tower.gradients.nbytes == pytest.approx(vision * 4 / 8, rel=1e-5)
    assert frozen_tower.optimizer_state.nbytes < base.optimizer_state.nbytes
    llm_only_top = plan_for("7b", run_config(model={"freeze_vision_tower": True, "freeze_merger": True,
                                                    "unfreeze_topk_llm": 1}), 8, 8)
    assert llm_only_top.gradients.nbytes == pytest.approx(want["layer"] * 4 / 8, rel=1e-5)
    # --packing: sequences of --max-tokens-per-batch tokens, and sdpa's dense mask over each one (a boolean a pair,
    # and again in bf16 once sdpa converts it to the query dtype).
    packed = plan_for("7b", run_config(data={"packing": True, "max_tokens_per_batch": 8192}), 8, 8)
    assert packed.activations.nbytes == 4 * base.activations.nbytes  # 8192 tokens against 2048
    assert packed.packed_mask.nbytes == 8192**2 * 3 and packed.peak_bytes > base.peak_bytes
    flash = run_config(model={"attn_implementation": "flash_attention_2"}, data={"packing": True})
    assert base.packed_mask is None and plan_for("7b", flash, 8, 8).packed_mask is None


def saved_bytes(module, *inputs, by_storage: bool = False, **kwargs) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `module` runs, its weights left out;
    `by_storage`: of the storages it keeps instead, each once however many views of it are saved (Qwen3.5's
    chunked delta rule saves many per-chunk views of one tensor)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() in weights:
            pass
        elif by_storage:
            seen[storage.data_ptr()] = storage.nbytes()
        else:
            seen[(storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs, **kwargs)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layer_activation_formula_matches_autograd(dtype):
    """One real decoder layer (and vision block) on the CPU: what autograd keeps for backward, per token, against
    the plan's formula. Attention through sdpa without a mask, as a single packed row runs on GPUs."""
    config = Qwen2_5_VLConfig(**config_dict("72b"))
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 256, 704, 4, 2
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # head_dim 64
    text._attn_implementation = "sdpa"
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLDecoderLayer,
                                                                    Qwen2_5_VLRotaryEmbedding,
                                                                    Qwen2_5_VLVisionBlock)
    layer = Qwen2_5_VLDecoderLayer(text, 0).to(dtype)
    tokens = 128
    hidden = torch.randn(1, tokens, 256, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
    cos, sin = Qwen2_5_VLRotaryEmbedding(text)(hidden, positions)
    measured = saved_bytes(layer, hidden, position_embeddings=(cos, sin))
    # cos and sin are computed once per forward and shared by every layer: not the layer's own
    measured -= 2 * cos.numel() * cos.element_size()
    formula = decoder_layer_activation_bytes(text, dtype.itemsize) * tokens
    assert measured == pytest.approx(formula, rel=0.05)

    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size, vision.num_heads = 128, 352, 2
    vision._attn_implementation = "sdpa"
    block = Qwen2_5_VLVisionBlock(vision).to(dtype)
    patches = 256
    x = torch.randn(patches, 128, dtype=dtype, requires_grad=True)
    angles = torch.randn(patches, 64 // 2).repeat(1, 2)
    measured = saved_bytes(block, x, cu_seqlens=torch.tensor([0, patches], dtype=torch.int32),
                           position_embeddings=(angles.cos(), angles.sin()))
    measured -= 2 * angles.numel() * 4
    assert measured == pytest.approx(vision_block_activation_bytes(vision, dtype.itemsize) * patches, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_qwen3_vl_decoder_layer_with_its_qk_norm_matches_autograd(dtype):
    """Qwen3-VL's decoder layer normalises q and k (an RMSNorm each): what autograd keeps against the formula."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer, Qwen3VLTextRotaryEmbedding

    text = Qwen3VLTextConfig(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64, num_hidden_layers=1, rope_parameters={
                                 "rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 12, 12],
                                 "mrope_interleaved": True})
    text._attn_implementation = "sdpa"
    tokens = 512
    hidden = torch.randn(1, tokens, 256, dtype=dtype, requires_grad=True)
    cos, sin = Qwen3VLTextRotaryEmbedding(text)(hidden, torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1))
    measured = saved_bytes(Qwen3VLTextDecoderLayer(text, 0).to(dtype), hidden, position_embeddings=(cos, sin))
    measured -= 2 * cos.numel() * cos.element_size()  # shared by every layer
    assert measured == pytest.approx(decoder_layer_activation_bytes(text, dtype.itemsize) * tokens, rel=0.005)


def test_a_run_that_cannot_fit_is_refused_in_one_line_with_the_figures_and_the_flag():
    """What ftloop.train runs on GPUs before it loads anything."""
    from ftloop.plan import check_fits

    model = skeleton_for("72b", run_config())
    check_fits(model, run_config(model={"param_dtype": "bf16"}), 8, 8, 80 * GIB)  # fits: no error
    with pytest.raises(ConfigError) as refused:
        check_fits(model, run_config(), 8, 8, 80 * GIB)
    message = str(refused.value)
    # By hand from the figures of an earlier plan (95.3 GiB before a 2 GiB reserve, 61.1 with bf16 masters, with
    # unchunked logits of 2048 x 152064 x 10 B = 2.90 GiB): chunked logits are 1024 x 152064 x 6 B + lm_head's
    # gradient 152064 x 8192 x 2 B = 3.19 GiB; against free memory the reserve is 5% of the peak:
    # (95.3 - 2.90 + 3.19) x 1.05 = 100.4; the suggestion is planned the same way, (61.1 - 2.90 + 3.19) x 1.05 = 64.5
    # (100.3 and 64.4 from the unrounded figures).
    assert "\n" not in message and "100.3 GiB per GPU of 80.0 GiB on 8 GPU(s): does not fit" in message
    assert "sharded parameters 34.2 GiB" in message and "logits 3.2 GiB" in message
    assert "--param-dtype bf16 brings it to 64.4 GiB" in message
    # When no single flag is enough, the changes add up; when nothing is, the message says so.
    with pytest.raises(ConfigError, match="--param-dtype bf16 --gradient-checkpointing brings it to"):
        check_fits(model, run_config(model={"gradient_checkpointing": False}), 8, 8, 80 * GIB)
    with pytest.raises(ConfigError, match="no flag makes it fit"):
        check_fits(model, run_config(), 2, 2, 80 * GIB)


def test_the_loss_and_the_reserve_are_counted_as_measured():
    """The loss's peak as tests/test_loss.py measures it (12 B per position x vocabulary entry unchunked; one chunk's
    logits at compute + 4 B, plus lm_head's gradient, in chunks), and the reserve: the CUDA context and each NCCL
    communicator when planned against the GPU's whole memory, only the communicators still to come when against
    what was free after start-up, and 5% of the peak for fragmentation either way."""
    vocab, hidden = 152_064, 3584  # Qwen2.5-VL-7B
    unchunked = plan_for("7b", run_config(model={"loss_chunk_size": 0}), 8, 8)
    assert unchunked.logits.nbytes == 2048 * vocab * 12 and unchunked.eval_logits.nbytes == 2048 * vocab * 8
    chunked = plan_for("7b", run_config(), 8, 8)  # the default chunk, 1024 positions
    assert chunked.logits.nbytes == 1024 * vocab * 6 + vocab * hidden * 2
    assert chunked.eval_logits.nbytes == 1024 * vocab * 6
    assert chunked.peak_bytes < unchunked.peak_bytes
    whole = plan_for("7b", run_config(), 8, 8, 80 * GIB)
    peak = whole.peak_bytes - whole.reserve.nbytes
    assert whole.reserve.nbytes == GIB + GIB + int(0.05 * peak)
    free = plan_memory(skeleton_for("7b", run_config()), run_config(), 8, 8, 78 * GIB, measured_free=True)
    assert free.reserve.nbytes == int(0.05 * peak) and free.peak_bytes == peak + int(0.05 * peak)
    hybrid = plan_for("7b", run_config(fsdp={"sharding_strategy": "HYBRID_SHARD"}), 16, 8, 80 * GIB)
    assert hybrid.reserve.nbytes - int(0.05 * (hybrid.peak_bytes - hybrid.reserve.nbytes)) == GIB + 3 * GIB


def test_a_lora_run_holds_the_base_in_bf16_and_trains_the_adapters_alone():
    """Qwen2.5-VL-7B with rank-64 adapters on every decoder projection: the frozen base in bf16 (2 B), the
    adapters' fp32 masters, gradients and Adafactor statistics for the adapters alone."""
    cfg = run_config(lora={"lora_rank": 64})
    model = skeleton_for("7b", cfg).model
    d, i, kv = 3584, 18944, 512
    per_layer = 64 * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + i) + (i + d))  # q, k, v, o, gate, up, down
    adapters = 28 * per_layer
    assert adapters == 161_480_704  # the well-known 161M of a rank-64 LoRA of Qwen2.5-VL-7B's language model
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapters
    plan = plan_for("7b", cfg, 8, 8)
    base = by_hand("7b")["total"]
    assert plan.sharded_parameters.nbytes == pytest.approx((base * 2 + adapters * 4) / 8, rel=1e-5)
    assert plan.gradients.nbytes == pytest.approx(adapters * 4 / 8, rel=1e-5)
    stats = 28 * sum(64 + n for n in (d, d, d, kv, d, kv, d, d, d, i, d, i, i, d))  # rows + columns of A and B
    assert plan.optimizer_state.nbytes == stats * 4
    full = plan_for("7b", run_config(), 8, 8)

    def persistent(p):
        return p.sharded_parameters.nbytes + p.gradients.nbytes + p.optimizer_state.nbytes
    assert persistent(plan) < 0.3 * persistent(full)  # 2.2 GB against 8.3 GB per GPU
