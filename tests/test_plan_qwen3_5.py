"""The memory plan at the published Qwen3.5-9B and -27B dimensions (meta device): each FSDP unit's parameters
against counts derived by hand from the dimensions (a Gated DeltaNet layer, a gated full-attention layer, a vision
block, the root), the activation formulas of both layer kinds against what autograd keeps on the CPU (transformers'
torch path), the recurrent state's share by hand, and `python -m ftloop.plan`'s per-GPU totals on 8 x 80 GiB."""

import pytest
import torch
from transformers import Qwen3_5Config, Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5TextRotaryEmbedding

from ftloop.activations import (deltanet_layer_activation_bytes, deltanet_state_bytes,
                                gated_attention_layer_activation_bytes, layer_activation_bytes)
from ftloop.plan import GIB, fsdp_units, plan_memory
from ftloop.plan import main as plan_main
from ftloop.model import build_skeleton
from test_plan import run_config, saved_bytes

# Qwen3.5-9B and -27B as published (their model cards and config.json): the language model's dimensions; both
# untie lm_head from the embeddings, and every fourth layer is full attention. The vision tower is transformers'
# Qwen3_5VisionConfig default (depth 27, width 1152), its merger projecting to the language model's width.
SIZES = {
    "9b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
               num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
               linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320),
    "27b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320),
}


def config(size: str) -> Qwen3_5Config:
    text = SIZES[size]
    return Qwen3_5Config(text_config=text, vision_config={"out_hidden_size": text["hidden_size"]},
                         tie_word_embeddings=False)


def by_hand(size: str) -> dict:
    """Parameters of each kind of unit, from the dimensions alone."""
    t = SIZES[size]
    d, i, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    nk, nv, dk, dv = (t["linear_num_key_heads"], t["linear_num_value_heads"], t["linear_key_head_dim"],
                      t["linear_value_head_dim"])
    heads, kv, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    mlp_and_norms = 3 * d * i + 2 * d
    conv = 2 * nk * dk + nv * dv  # the channels q, k and v share in the conv1d
    deltanet = (d * conv + d * nv * dv + 2 * d * nv  # in_proj_qkv, in_proj_z, in_proj_b and in_proj_a
                + conv * t["linear_conv_kernel_dim"] + 2 * nv + dv  # depthwise conv1d, A_log and dt_bias, gated norm
                + nv * dv * d + mlp_and_norms)  # out_proj
    attention = d * 2 * heads * hd + 2 * d * kv * hd + heads * hd * d + 2 * hd + mlp_and_norms  # q+gate, k, v, o, QK-norm
    w, wi = 1152, 4304  # the vision tower
    block = (w * 3 * w + 3 * w) + (w * w + w) + (w * wi + wi) + (wi * w + w) + 4 * w  # qkv, proj, MLP, 2 LayerNorms
    merged = 4 * w
    root = 2 * v * d + d  # embeddings, lm_head, final norm
    root += w * 3 * 2 * 16 * 16 + w + 2304 * w + 2 * w + (merged * merged + merged) + (merged * d + d)
    linear = t["num_hidden_layers"] * 3 // 4
    return {"deltanet": deltanet, "attention": attention, "block": block, "root": root, "linear": linear,
            "full": t["num_hidden_layers"] - linear,
            "language": linear * deltanet + (t["num_hidden_layers"] - linear) * attention + 2 * v * d + d}


@pytest.mark.parametrize("size", ["9b", "27b"])
def test_units_are_the_hand_derived_sizes(size):
    units, want = fsdp_units(build_skeleton(run_config(), config(size))), by_hand(size)
    layers = [u.numel for u in units if ".language_model.layers." in u.name]
    assert layers.count(want["deltanet"]) == want["linear"] and layers.count(want["attention"]) == want["full"]
    assert [u.numel for u in units if ".visual.blocks." in u.name] == [want["block"]] * 27
    assert units[-1].name == "root" and units[-1].numel == want["root"]
    assert sum(u.numel for u in units) == want["language"] + 27 * want["block"] + want["root"] - 2 * 248320 * \
        SIZES[size]["hidden_size"] - SIZES[size]["hidden_size"]
    # The language model's count as published (llama.cpp reports Qwen3.5-9B's text weights as 8.95B).
    assert round(want["language"] / 1e9, 2) == {"9b": 8.95, "27b": 26.9}[size]
    if size == "9b":  # the numbers themselves, for the README
        assert (want["deltanet"], want["attention"]) == (218_407_104, 209_723_904)


def test_the_recurrent_state_and_each_layer_kind_by_hand():
    """Per token, bf16 compute, at 9B: a DeltaNet layer on the torch path keeps the fp32 state (32 value heads x 128
    x 128) at each 64-token chunk's start, 32 KiB a token, and ~529 KiB in all; with the kernels (which recompute
    the states) ~285 KiB; a full-attention layer ~260 KiB."""
    text = config("9b").text_config
    assert deltanet_state_bytes(text) == 32 * 128 * 128 * 4 // 64 == 32768
    assert deltanet_state_bytes(config("27b").text_config) == 48 * 128 * 128 * 4 // 64
    around = 2 * (8 * 4096 + 4) + 2 * 2 * 4096 + 4 * 2 * 12288  # the two fp32 RMSNorms, the MLP
    # out_proj's input, beta and the decay's inputs, the gated RMSNorm (value dim 32 x 128 = 4096)
    gate_and_norm = 2 * 4096 + 10 * 32 + 2 * 2 * 4096 + 12 * 4096 + 4 * 32
    conv = 2 * 16 * 128 + 32 * 128  # channels
    torch_rule = 32 * 32 * 128 + 12 * 4096 + 20 * 32 * 64 + 24 * 32 + 32768
    assert deltanet_layer_activation_bytes(text, 2) == around + gate_and_norm + 2 * 2 * conv + torch_rule == 541_896
    kernel_rule = 16 * (2 * 2 * 128 + 8) + 32 * (2 * 128 + 4 + 2 * 64)  # q, k and 1/norms at 16 heads; v, decay, A
    assert deltanet_layer_activation_bytes(text, 2, kernels=True) == around + gate_and_norm + 2 * conv + kernel_rule \
        == 291_528
    attention = around + (8 * 4096 + 4 * 16 + 8 * 1024 + 4 * 4) + (2 * 2 * 4096 + 2 * 2 * 1024 + 4 * 16) + 3 * 2 * 4096
    assert gated_attention_layer_activation_bytes(text, 2) == attention == 266_392
    kinds = layer_activation_bytes(text, 2)
    assert kinds.count(541_896) == 24 and kinds.count(266_392) == 8 and kinds[3] == 266_392


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_layer_kinds_activation_formulas_match_autograd(dtype):
    """One real layer of each kind on the CPU (transformers' torch path, sdpa), at small dimensions with grouped
    value heads (2 key heads, 4 value heads) and 1024 tokens (16 chunks of the delta rule): within 0.5% (the
    recurrent states alone are 1.4% of the DeltaNet layer's here)."""
    text = Qwen3_5TextConfig(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                             linear_value_head_dim=48, num_hidden_layers=2,
                             layer_types=["linear_attention", "full_attention"])
    text._attn_implementation = "sdpa"
    tokens = 1024
    hidden = torch.randn(1, tokens, 256, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
    cos, sin = Qwen3_5TextRotaryEmbedding(text)(hidden, positions)
    for index, formula in ((0, deltanet_layer_activation_bytes), (1, gated_attention_layer_activation_bytes)):
        layer = Qwen3_5DecoderLayer(text, index).to(dtype)
        measured = saved_bytes(layer, hidden, by_storage=True, position_embeddings=(cos, sin),
                               position_ids=positions[0])
        if index == 1:  # cos and sin are computed once per forward and shared by every layer: not the layer's own
            measured -= 2 * cos.numel() * cos.element_size()
        assert measured == pytest.approx(formula(text, dtype.itemsize) * tokens, rel=0.005), layer.block_type


@pytest.mark.parametrize("kernels", [False, True], ids=["torch path", "kernels"])
@pytest.mark.parametrize("size", ["9b", "27b"])
def test_the_plan_of_both_sizes_on_8_gpus_of_80_gib(size, kernels, tmp_path, capsys, monkeypatch):
    """`python -m ftloop.plan` on the config alone, the defaults (fp32 masters, bf16 compute, gradient checkpointing)
    at 4096 tokens a micro-batch, with the DeltaNet layers as the path that imports runs them: it fits, and says
    which path it counted. (The totals: the README.)"""
    import ftloop.plan

    monkeypatch.setattr(ftloop.plan, "linear_attention_kernels", lambda: kernels)
    config(size).save_pretrained(tmp_path)
    args = ["--model-name-or-path", str(tmp_path), "--nproc-per-node", "8", "--gpu-memory-gib", "80",
            "--max-seq-length", "4096"]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    parameters = sum(u.numel for u in fsdp_units(build_skeleton(run_config(), config(size))))
    assert f"{parameters / 1e9:.2f}B parameters" in out and ": fits, " in out
    assert f"DeltaNet layers as {'the kernels' if kernels else 'the torch path'} run them" in out
    # Checkpointed, the activations hold every layer's input and one layer recomputed: the largest, a DeltaNet one.
    text = config(size).text_config
    skeleton = build_skeleton(run_config(data={"max_seq_length": 4096}), config(size))
    plan = plan_memory(skeleton, run_config(data={"max_seq_length": 4096}), 8, 8, 80 * GIB)
    monkeypatch.setattr(ftloop.plan, "linear_attention_kernels", lambda: not kernels)
    other = plan_memory(skeleton, run_config(data={"max_seq_length": 4096}), 8, 8, 80 * GIB)
    difference = 2 * 4096 * (deltanet_layer_activation_bytes(text, 2, kernels)
                             - deltanet_layer_activation_bytes(text, 2, not kernels))
    assert plan.activations.nbytes - other.activations.nbytes == difference
