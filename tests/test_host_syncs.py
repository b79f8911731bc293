"""No op of ftloop's own that waits for the device inside a micro-batch (issue 24, point 2, ftloop's part): the
loss's positions and a packed batch's layout come from the loader's collate, computed on the host. Counted with a
dispatch mode over the forward and backward of a micro-batch on CPU: the ops that sync on CUDA (`nonzero`, boolean
masks, `_local_scalar_dense`) whose caller is in ftloop/. (transformers' own rope index and vision code still sync;
the note of issue 24 counts them.)"""

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

import ftloop
from datautil import SYSTEM, noise_frames
from ftloop.data.batches import SFTDataset, make_collate, make_packed_collate
from ftloop.data.layouts import load_rows
from ftloop.data.rows import Row
from ftloop.loss import supervised_loss
from ftloop.model import VisionLanguageSFT

FTLOOP = os.path.dirname(ftloop.__file__)
SYNCING = {"_local_scalar_dense", "nonzero", "item", "masked_select"}


class FtloopSyncs(TorchDispatchMode):
    """Syncing ops whose nearest caller outside torch is ftloop's code (the collate's host work left out)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name in ("index", "index_put_", "index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if name in SYNCING or masked:
            frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
                      and not f.filename.endswith("test_host_syncs.py")]
            if frames and frames[-1].filename.startswith(FTLOOP) and frames[-1].name != "collate":
                self.seen.append(f"{name} at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def samples(tiny_bundle, tokenizer, image_processor, tmp_path_factory):
    rows = load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"], [])
    with_image = next(r for r in rows if r.images)
    text_only = next(r for r in rows if not r.images)
    video = Row([dict(m, content=m["content"].replace("<image>", "<video>")) for m in with_image.messages],
                videos=[noise_frames(tmp_path_factory.mktemp("frames"), 3)[::-1]],  # 56x84 first: its own grid
                video_fps=[1.0], number=9)  # 2 s a group
    dataset = SFTDataset([with_image, text_only, video], tokenizer, image_processor, 4096, SYSTEM)
    return [dataset[i] for i in range(3)]


def ftloop_caller() -> str | None:
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
              and not f.filename.endswith("test_host_syncs.py")]
    if frames and frames[-1].filename.startswith(FTLOOP) and frames[-1].name != "collate":
        return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"
    return None


@pytest.mark.parametrize("packed", [False, True])
def test_a_micro_batch_waits_for_the_device_nowhere_in_ftloop(tiny_bundle, tokenizer, samples, packed, monkeypatch):
    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"])
    config = model.config
    if packed:
        batch = make_packed_collate(tokenizer.pad_token_id, config.image_token_id, config.video_token_id)(
            [samples[:2], samples[2:]])
    else:
        batch = make_collate(tokenizer.pad_token_id, config.image_token_id, config.video_token_id)(samples)
    scorer = VisionLanguageSFT(model)  # built at start-up, on the host
    reads = []  # .tolist() and .item() are no dispatched ops: watched by themselves
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _original=original, _name=method: (
            reads.append((_name, ftloop_caller())) or _original(self, *a)))
    with FtloopSyncs() as syncs:
        loss, count = scorer(**batch)
        loss.backward()
    assert syncs.seen == [] and count > 0
    assert [read for read in reads if read[1] is not None] == []  # transformers' own are left (README)


def test_the_loss_at_the_collates_positions_equals_the_masked_one(tiny_bundle, tokenizer, samples):
    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"])
    batch = make_collate(tokenizer.pad_token_id, model.config.image_token_id, model.config.video_token_id)(samples)
    hidden = torch.randn(*batch["input_ids"].shape, model.config.text_config.hidden_size)
    for chunk in (0, 5):
        masked = supervised_loss(hidden, batch["labels"], model.lm_head, chunk)
        indexed = supervised_loss(hidden, batch["labels"], model.lm_head, chunk, batch["supervised_index"])
        assert torch.equal(masked[0], indexed[0]) and int(masked[1]) == int(indexed[1]) > 0


ROPE = ("get_rope_index", "get_vision_position_ids")  # transformers' code that the collate's positions replace
VISION_LAYOUT_CODE = ("get_vision_position_ids", "get_vision_window_index", "get_vision_cu_seqlens")  # and layout


class RopeSyncs(TorchDispatchMode):
    """Syncing ops anywhere inside transformers' rope index."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING | {"index"} and any(
                frame.name in ROPE + VISION_LAYOUT_CODE for frame in traceback.extract_stack()):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True])
def test_the_collate_s_positions_are_the_model_s_and_spare_its_reads(tiny_bundle, tokenizer, samples, packed):
    """Positions computed on the host by the model's own rope index equal those the model computes on the device
    (and so the loss); with them and the vision layout, the forward reads nothing in transformers' rope index or
    the vision tower's layout code (23 syncing ops per micro-batch of these 3 rows before, on the demo model)."""
    import pickle

    from ftloop.data.positions import HostRopeIndex

    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"])
    config = model.config
    make = make_packed_collate if packed else make_collate
    rows = [samples[:2], samples[2:]] if packed else samples
    rope = pickle.loads(pickle.dumps(HostRopeIndex(config)))  # as the loader's workers get it
    plain = make(tokenizer.pad_token_id, config.image_token_id, config.video_token_id)(rows)
    placed = make(tokenizer.pad_token_id, config.image_token_id, config.video_token_id, rope)(rows)
    if packed:
        from ftloop.data.positions import packed_positions

        wanted = packed_positions(plain["input_ids"], plain["mm_token_type_ids"], plain["segment_mask"],
                                  plain["segment_index"], plain["image_grid_thw"], plain["video_grid_thw"],
                                  model.model.get_rope_index, second_per_grid_ts=plain["second_per_grid_ts"])
    else:
        wanted, _ = model.model.get_rope_index(plain["input_ids"], plain["mm_token_type_ids"],
                                               plain["image_grid_thw"], plain["video_grid_thw"],
                                               second_per_grid_ts=plain["second_per_grid_ts"],
                                               attention_mask=plain["attention_mask"])
    assert torch.equal(placed["position_ids"], wanted)
    scorer = VisionLanguageSFT(model)
    with torch.no_grad():
        with RopeSyncs() as syncs:
            loss, count = scorer(**placed)
        reference, _ = scorer(**plain)
    assert syncs.count == 0 and torch.equal(loss, reference)



def test_qwen3_vl_takes_the_collate_s_positions_and_vision_layout_as_its_own(qwen3_bundle):
    """Qwen3-VL (16-pixel patches, interleaved mRoPE, no windows): the collate's positions and vision layout give
    the loss the model gives on its own, and the tower computes none of its layout."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from ftloop.data.encode import ChatFormat
    from ftloop.data.positions import HostRopeIndex

    tokenizer = AutoTokenizer.from_pretrained(qwen3_bundle["model_dir"])
    processor = AutoImageProcessor.from_pretrained(qwen3_bundle["model_dir"])
    model = AutoModelForImageTextToText.from_pretrained(qwen3_bundle["model_dir"])
    config = model.config
    rows = load_rows(qwen3_bundle["train_json"], qwen3_bundle["image_folder"], [])[:3]
    samples = [SFTDataset(rows, tokenizer, processor, 4096, ChatFormat("", True))[i] for i in range(3)]
    plain = make_collate(tokenizer.pad_token_id, config.image_token_id, config.video_token_id)(samples)
    placed = make_collate(tokenizer.pad_token_id, config.image_token_id, config.video_token_id,
                          HostRopeIndex(config))(samples)
    assert "vision_cu_seqlens" in placed and "vision_window_index" not in placed

    class LayoutSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(frame.name in VISION_LAYOUT_CODE + ROPE for frame in traceback.extract_stack()):
                LayoutSyncs.count += 1
            return func(*args, **(kwargs or {}))

    scorer = VisionLanguageSFT(model)
    with torch.no_grad():
        with LayoutSyncs():
            loss, _ = scorer(**placed)
        reference, _ = scorer(**plain)
    assert LayoutSyncs.count == 0 and torch.equal(loss, reference)


def test_a_text_only_micro_batch_s_blank_image_reads_nothing_either(tiny_bundle, tokenizer, samples):
    """The blank image every rank runs through the tower on a text-only micro-batch has its layout made once, on
    the host (ftloop.model.VisionLanguageSFT.blank_layout)."""
    from ftloop.data.positions import HostRopeIndex

    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"])
    config = model.config
    text_only = make_collate(tokenizer.pad_token_id, config.image_token_id, config.video_token_id,
                             HostRopeIndex(config))([samples[1]])
    assert "pixel_values" not in text_only
    scorer = VisionLanguageSFT(model)
    with torch.no_grad(), RopeSyncs() as syncs:
        loss, count = scorer(**text_only)
    assert syncs.count == 0 and count > 0
