"""What autograd keeps for backward, in bytes per token (per patch for the vision tower), in one decoder layer or
vision block: the formulas the memory plan (ftloop.plan) multiplies by a micro-batch's tokens, each checked against
autograd on the CPU by the tests (tests/test_plan.py, tests/test_plan_qwen3_5.py)."""

from __future__ import annotations


def decoder_layer_activation_bytes(text_config, compute_bytes: int) -> int:
    """Bytes autograd saves per token in one decoder layer (flash/memory-efficient attention, no dropout):
    two RMSNorms (their fp32 input copy, the normalised input of the weight product, and that product, which
    the next projections save), q, k and v (the attention kernel saves them with its output and per-head
    log-sum-exp), the attention output again (contiguous copy for o_proj), and the MLP's gate, silu, up and
    product (4 x intermediate). Qwen3-VL also passes q and k through an RMSNorm each (QK-norm: the fp32 input,
    the normalised copy in the compute dtype, 1/rms per head)."""
    d, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv_heads = text_config.num_key_value_heads
    attn, kv = heads * head_dim, kv_heads * head_dim
    cb = compute_bytes
    norms = 2 * (4 * d + 2 * cb * d)
    attention = cb * (attn + 2 * kv) + 2 * cb * attn + 4 * heads
    if getattr(text_config, "model_type", None) == "qwen3_vl_text":
        attention += (4 + cb) * (attn + kv) + 4 * (heads + kv_heads)
    return norms + attention + 4 * cb * text_config.intermediate_size


LINEAR_ATTENTION_CHUNK = 64  # tokens per chunk of the gated delta rule (transformers' torch path)


def layer_activation_bytes(text_config, compute_bytes: int, kernels: bool = False) -> list[int]:
    """Bytes autograd saves per token in each decoder layer, in order: Qwen3.5's by their kind (its Gated DeltaNet
    layers as `kernels`, flash-linear-attention's and causal-conv1d's, or transformers' torch path runs them), the
    other families' all alike."""
    if getattr(text_config, "model_type", None) != "qwen3_5_text":
        return [decoder_layer_activation_bytes(text_config, compute_bytes)] * text_config.num_hidden_layers
    deltanet = deltanet_layer_activation_bytes(text_config, compute_bytes, kernels)
    attention = gated_attention_layer_activation_bytes(text_config, compute_bytes)
    return [deltanet if kind == "linear_attention" else attention for kind in text_config.layer_types]


def _zero_centred_norms_and_mlp(text_config, cb: int) -> int:
    """What a Qwen3.5 layer of either kind saves around its token mixer: two RMSNorms that compute `1 + w` in fp32
    (their fp32 input, its normalised copy, the per-token 1/rms; the result in the compute dtype, which the next
    projections save), and the MLP's gate, silu, up and product."""
    d = text_config.hidden_size
    return 2 * (8 * d + 4) + 2 * cb * d + 4 * cb * text_config.intermediate_size


def gated_attention_layer_activation_bytes(text_config, cb: int) -> int:
    """Qwen3.5's full-attention layer per token: q_proj gives each head's query and its output gate; q and k each
    pass an RMSNorm in fp32 (QK-norm: input and normalised copy, 1/rms per head); the attention kernel's q, k, v,
    output and log-sum-exp; the gate's sigmoid, the gated output and o_proj's input."""
    heads, kv_heads, head_dim = text_config.num_attention_heads, text_config.num_key_value_heads, text_config.head_dim
    attn, kv = heads * head_dim, kv_heads * head_dim
    qk_norms = 8 * attn + 4 * heads + 8 * kv + 4 * kv_heads
    if cb == 4:  # in fp32 the norm's cast is a no-op: it keeps q_proj's whole output (query and gate), not a copy
        qk_norms += 4 * attn
    kernel = 2 * cb * attn + 2 * cb * kv + 4 * heads
    return _zero_centred_norms_and_mlp(text_config, cb) + qk_norms + kernel + 3 * cb * attn


def deltanet_layer_activation_bytes(text_config, cb: int, kernels: bool = False) -> int:
    """Qwen3.5's Gated DeltaNet layer per token. Either way: out_proj's input, beta and the decay's inputs (a float
    per value head each), the gated RMSNorm (its fp32 input, normalised copy, gate and silu, per value dim).

    transformers' torch path (counted against autograd on the CPU by the tests): the causal conv1d's input and
    output (q, k and v: 2 x key heads x key dim + value heads x value dim channels), and the gated delta rule, which
    runs in fp32 with q and k repeated to every value head: q, k, v, beta and the decay whole and in chunks of 64
    tokens, each chunk's 64 x 64 matrices (its attention, decay mask and their products: 20 floats a token per head
    with the chunk cut for the loop), and the recurrent state at each chunk's start (`deltanet_state_bytes`). A
    packed micro-batch runs the rule row by row, each row padded to a multiple of 64 tokens: up to 63 positions a
    row more than counted here.

    `kernels` (read from flash-linear-attention 0.5.2's and causal-conv1d 1.6.1's sources; only a GPU measures
    it): causal-conv1d keeps its input alone (the silu is recomputed); fla keeps l2-normalised q and k in the
    compute dtype at the key heads (it repeats nothing) with a fp32 1/norm a head, v, the decay's chunk sums in
    fp32 and each chunk's solved 64 x 64 matrix in the compute dtype, and recomputes the recurrent states in
    backward rather than keeping them."""
    t = text_config
    value_heads, key_heads = t.linear_num_value_heads, t.linear_num_key_heads
    key_dim, value_dim = t.linear_key_head_dim, t.linear_value_head_dim
    conv_channels = 2 * key_heads * key_dim + value_heads * value_dim
    values = value_heads * value_dim
    either = cb * values + (cb + 8) * value_heads + 2 * cb * values + 12 * values + 4 * value_heads
    if kernels:
        rule = key_heads * (2 * cb * key_dim + 8) + value_heads * (cb * value_dim + 4 + cb * LINEAR_ATTENTION_CHUNK)
        return _zero_centred_norms_and_mlp(t, cb) + either + cb * conv_channels + rule
    rule = (32 * value_heads * key_dim + 12 * values + 20 * value_heads * LINEAR_ATTENTION_CHUNK + 24 * value_heads
            + deltanet_state_bytes(t))
    if cb == 4:  # in fp32 the rule's casts are no-ops, and two more chunked copies of q and k stay apart
        rule += 16 * value_heads * key_dim
    return _zero_centred_norms_and_mlp(t, cb) + either + 2 * cb * conv_channels + rule


def deltanet_state_bytes(text_config) -> int:
    """Per token, the recurrent state a Gated DeltaNet layer keeps for backward: a value heads x key dim x value dim
    fp32 matrix at the start of every 64-token chunk (the state at the start of the first, zero, too)."""
    t = text_config
    state = 4 * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim
    return state // LINEAR_ATTENTION_CHUNK


def vision_block_activation_bytes(vision_config, compute_bytes: int) -> int:
    """The same per patch for one vision block: full-head q, k, v from one qkv projection."""
    d, heads = vision_config.hidden_size, vision_config.num_heads
    cb = compute_bytes
    return 2 * (4 * d + 2 * cb * d) + 3 * cb * d + 2 * cb * d + 4 * heads + 4 * cb * vision_config.intermediate_size
