"""--packing: a packed micro-batch gives the loss and the gradients of the same rows unpacked (Qwen2.5-VL,
Qwen2-VL, Qwen3-VL and Qwen3.5, whose Gated DeltaNet layers carry a state from token to token; images, videos,
text-only and multi-turn rows), and packs hold every row once within the budget."""

import random

import pytest
import torch
from transformers import AutoModelForImageTextToText

from datautil import SYSTEM, noise_frames, vl_row
from ftloop.loss import IGNORE_INDEX
from ftloop.data.encode import ChatFormat
from ftloop.data.batches import SFTDataset, make_collate
from ftloop.data.batches import make_packed_collate
from ftloop.data.sampler import pack_rows
from ftloop.data.media import load_image_processor
from ftloop.model import VisionLanguageSFT
from test_vision_forward import qwen2_vl


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family, tiny_bundle, qwen3_bundle, qwen35_bundle):
    folder = {"qwen3_vl": qwen3_bundle, "qwen3_5": qwen35_bundle}.get(family, tiny_bundle)["model_dir"]
    loaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    chosen = qwen2_vl(loaded.config) if family == "qwen2_vl" else loaded
    chosen.config._attn_implementation = "sdpa"
    return VisionLanguageSFT(chosen.train())


@pytest.fixture(scope="module")
def samples(family, tmp_path_factory, tokenizer, image_processor, qwen3_bundle, qwen35_bundle):
    frames = noise_frames(tmp_path_factory.mktemp("packing_frames"))
    row = vl_row
    rows = [row([frames[0], frames[7]], [frames[1:4]]), row(videos=[frames[2:7]], reply="it moves left"),
            row(reply="nine"), row([frames[6]], reply="blue", turns=3), row(reply="a longer answer here", turns=2),
            row([frames[5]], [frames[3:5]], reply="both")]
    if family in ("qwen3_vl", "qwen3_5"):  # their own patch grid, and timestamped video frame groups
        bundle = qwen3_bundle if family == "qwen3_vl" else qwen35_bundle
        image_processor, chat = load_image_processor(bundle["model_dir"]), ChatFormat("", True)
    else:
        chat = SYSTEM
    dataset = SFTDataset(rows, tokenizer, image_processor, 4096, chat)
    return [dataset[i] for i in range(len(rows))]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, count = model(**batch)
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss_sum.detach()), int(count), grads


def assert_same(packed, unpacked):
    assert packed[1] == unpacked[1]  # the same supervised tokens
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    assert packed[2].keys() == unpacked[2].keys()
    for name, grad in unpacked[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("one_sequence", [False, True], ids=["as packed", "in one sequence"])
@pytest.mark.parametrize("layout", [[[0, 1, 2, 3, 4, 5]], [[3, 0], [2, 5, 1], [4]]], ids=["one pack", "three packs"])
def test_a_packed_micro_batch_has_the_loss_and_gradients_of_its_rows_unpacked(model, samples, tokenizer, layout,
                                                                             one_sequence):
    """Every row kind at once: two images and a video, a video of five frames, text only, multi-turn with an
    image, multi-turn text, an image and a video; one sequence, or three of unequal length (padding); and the
    three laid out as one sequence, as for flash-attention (whose varlen path takes a batch of one)."""
    model.packs_in_one_sequence = one_sequence
    config = model.hf.config
    ids = (tokenizer.pad_token_id, config.image_token_id, config.video_token_id)
    rows = [i for pack in layout for i in pack]  # the packed order of images and videos
    unpacked = loss_and_grads(model, make_collate(*ids)([samples[i] for i in rows]))
    batch = make_packed_collate(*ids)([[samples[i] for i in pack] for pack in layout])
    assert batch["input_ids"].shape[0] == len(layout)
    assert_same(loss_and_grads(model, batch), unpacked)
    model.packs_in_one_sequence = False


def test_labels_never_cross_rows(model, samples, tokenizer):
    """Rows supervised on every token: packed, a row's last token must not learn to predict the next row's
    first token (unpacked it has no target)."""
    config = model.hf.config
    ids = (tokenizer.pad_token_id, config.image_token_id, config.video_token_id)
    every = [dict(s, labels=torch.where(s["input_ids"] == config.image_token_id, IGNORE_INDEX, s["input_ids"]))
             for s in (samples[2], samples[4])]
    assert_same(loss_and_grads(model, make_packed_collate(*ids)([every])),
                loss_and_grads(model, make_collate(*ids)(every)))


def test_packs_hold_every_row_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(20, 60), rng.randint(300, 900)]) for _ in range(5000)]
    order = list(range(5000))
    rng.shuffle(order)
    packs = pack_rows(order, lengths, 1024, window=1000)
    assert sorted(i for p in packs for i in p) == list(range(5000))
    fill = [sum(lengths[i] for i in p) for p in packs]
    assert max(fill) <= 1024
    assert sum(fill) / (len(packs) * 1024) > 0.93  # best-fit decreasing leaves little room (0.945 here)
    # Rows stay within their window of the permutation.
    window_of = {row: k // 1000 for k, row in enumerate(order)}
    assert all(len({window_of[i] for i in p}) == 1 for p in packs)
    assert pack_rows(order, lengths, 1024, window=1000) == packs


@pytest.mark.parametrize("family", ["qwen3_5"], indirect=True)
@pytest.mark.parametrize("layout", [[[0, 1, 2, 3, 4, 5]], [[3, 0], [2, 5, 1], [4]]], ids=["one pack", "three packs"])
def test_with_the_kernels_qwen3_5_packs_tell_them_where_rows_start(model, samples, tokenizer, layout, monkeypatch):
    """On GPUs with flash-linear-attention and causal-conv1d, a packed micro-batch runs each DeltaNet layer once, as
    one sequence told its rows' offsets (`cu_seq_lens_q`, which transformers hands fla as `cu_seqlens`) and each
    position's row (`seq_idx`, for causal-conv1d). Here stand-ins with those kernels' contracts (read from their
    sources: fla takes a batch of one sequence with int64 offsets from 0 to its length; causal-conv1d an int32
    batch x length index over channel-last input) run transformers' torch functions row by row."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    torch_rule, torch_conv = qwen3_5.torch_chunk_gated_delta_rule, qwen3_5.causal_conv1d_fn
    calls = []

    def fla_rule(query, key, value, g, beta, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
        kwargs.pop("seq_idx", None)  # not fla's: transformers' wrapper drops what the kernel does not take
        if cu_seqlens is None:
            return torch_rule(query, key, value, g=g, beta=beta, **kwargs)
        assert query.shape[0] == 1 and cu_seqlens.dtype == torch.int64 and cu_seqlens.device == query.device
        assert torch.equal(cu_seqlens_cpu, cu_seqlens.cpu())  # the host's copy, which newer fla reads instead
        bounds = cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == query.shape[1] and bounds == sorted(bounds)
        calls.append("fla")
        return torch.cat([torch_rule(query[:, a:b], key[:, a:b], value[:, a:b], g=g[:, a:b], beta=beta[:, a:b],
                                     **kwargs)[0] for a, b in zip(bounds, bounds[1:])], dim=1), None

    def conv1d(x, weight, bias=None, activation=None, seq_idx=None, **kwargs):  # kwargs: not causal-conv1d's
        if seq_idx is None:
            return torch_conv(x, weight, bias, activation=activation)
        assert seq_idx.dtype == torch.int32 and seq_idx.shape == (x.shape[0], x.shape[2]) and x.stride(1) == 1
        calls.append("conv")
        rows = torch.unique_consecutive(seq_idx[0], return_counts=True)[1].tolist()
        return torch.cat([torch_conv(part, weight, bias, activation=activation) for part in x.split(rows, dim=2)],
                         dim=2)

    monkeypatch.setattr(qwen3_5, "torch_chunk_gated_delta_rule", fla_rule)
    monkeypatch.setattr(qwen3_5, "causal_conv1d_fn", conv1d)
    monkeypatch.setattr(model, "linear_kernels", True)
    config = model.hf.config
    ids = (tokenizer.pad_token_id, config.image_token_id, config.video_token_id)
    rows = [i for pack in layout for i in pack]
    unpacked = loss_and_grads(model, make_collate(*ids)([samples[i] for i in rows]))
    assert calls == []
    packed = loss_and_grads(model, make_packed_collate(*ids)([[samples[i] for i in pack] for pack in layout]))
    assert calls == ["conv", "fla"] * len(model.linear_attention)  # one call of each per layer
    assert_same(packed, unpacked)
