"""VisionLanguageSFT's single vision pass gives the loss of a plain Hugging Face forward (which runs the
vision tower once for images and once more for videos), for Qwen2.5-VL, Qwen2-VL and Qwen3-VL (whose DeepStack
features the one pass carries too)."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from datautil import SYSTEM, noise_frames, vl_row
from ftloop.data.encode import ChatFormat
from ftloop.data.batches import SFTDataset, make_collate
from ftloop.data.media import load_image_processor
from ftloop.model import VisionLanguageSFT


def qwen2_vl(bundle_config) -> Qwen2VLForConditionalGeneration:
    """A tiny random Qwen2-VL sharing the bundle's token ids (as test_train_e2e builds one)."""
    text = bundle_config.text_config
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **{k: getattr(bundle_config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id")})
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def qwen25(tiny_bundle):
    return AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"], dtype=torch.float32).eval()


def make_samples(folder, tokenizer, image_processor, chat) -> dict:
    frames = noise_frames(folder)
    row = vl_row
    rows = {"images+videos": row([frames[0], frames[7]], [frames[1:4], frames[4:6]]),
            "videos": row(videos=[frames[2:7]], reply="it moves left"),
            "images": row([frames[6]], reply="blue"),
            "text": row(reply="nine")}
    dataset = SFTDataset(list(rows.values()), tokenizer, image_processor, 4096, chat)
    return {name: dataset[i] for i, name in enumerate(rows)}


def qwen3_case(bundle, tokenizer, folder) -> tuple:
    """The tiny Qwen3-VL and its samples: its own processor, and each video as timestamped frame groups."""
    model = AutoModelForImageTextToText.from_pretrained(bundle["model_dir"], dtype=torch.float32).eval()
    chat = ChatFormat("", timestamped_videos=True)
    return model, make_samples(folder, tokenizer, load_image_processor(bundle["model_dir"]), chat), tokenizer


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tokenizer, image_processor):
    return make_samples(tmp_path_factory.mktemp("forward_frames"), tokenizer, image_processor, SYSTEM)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def case(request, qwen25, samples, tokenizer, qwen3_bundle, qwen35_bundle, tmp_path_factory):
    """(model, its samples, tokenizer): Qwen2-VL shares Qwen2.5-VL's processor; Qwen3-VL has its own, and
    writes each video as timestamped frame groups; so does Qwen3.5 (Qwen3-VL's processor and tower without
    DeepStack, a hybrid decoder)."""
    if request.param == "qwen3_vl":
        return qwen3_case(qwen3_bundle, tokenizer, tmp_path_factory.mktemp("qwen3_frames"))
    if request.param == "qwen3_5":
        return qwen3_case(qwen35_bundle, tokenizer, tmp_path_factory.mktemp("qwen35_frames"))
    return (qwen25 if request.param == "qwen2_5_vl" else qwen2_vl(qwen25.config)), samples, tokenizer


BATCHES = {"images+videos": ["images+videos", "text", "images"], "images only": ["images", "text"],
           "videos only": ["videos", "text"], "text only": ["text"], "one of each": ["videos", "images"]}


@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_one_vision_pass_gives_the_hf_loss(case, batch_name):
    model, samples, tokenizer = case
    collate = make_collate(tokenizer.pad_token_id, model.config.image_token_id, model.config.video_token_id)
    batch = collate([samples[name] for name in BATCHES[batch_name]])
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            loss_sum, count = VisionLanguageSFT(model)(**batch)
            ours = float(loss_sum / count)
            ours_calls = len(calls)
            hf_batch = dict(batch) if model.config.model_type == "qwen2_5_vl" else \
                {k: v for k, v in batch.items() if k != "second_per_grid_ts"}  # Qwen2.5-VL's input alone
            reference = float(model(**hf_batch).loss)
    finally:
        hook.remove()
    assert ours_calls == 1  # exactly one vision pass, whatever the batch holds...
    hf_calls = len(calls) - ours_calls  # ...where the HF model runs one per modality present
    assert hf_calls == ("pixel_values" in batch) + ("pixel_values_videos" in batch)
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_video_time_positions_reach_the_model(qwen25, samples, tokenizer):
    """second_per_grid_ts (temporal_patch_size / fps) spaces the frame groups in Qwen2.5-VL's rope."""
    model = qwen25
    batch = make_collate(tokenizer.pad_token_id, model.config.image_token_id, model.config.video_token_id)(
        [samples["videos"]])
    scorer = VisionLanguageSFT(model)
    with torch.no_grad():
        default = [float(x) for x in scorer(**batch)]
        slower = dict(batch, second_per_grid_ts=batch["second_per_grid_ts"] * 4)
        changed = float(scorer(**slower)[0])
        assert changed == pytest.approx(float(model(**slower).loss) * default[1], rel=1e-6)
    assert abs(changed - default[0]) > 1e-4
