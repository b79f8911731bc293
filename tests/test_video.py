"""Video frames through Qwen's video layout (ftloop.data.media), video samples and their collation."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from datautil import SYSTEM, one_line_error, save_rgb
from videoutil import qwen_video_layout
from ftloop.config import VideoArgs
from ftloop.loss import IGNORE_INDEX
from ftloop.data.batches import SFTDataset, make_collate
from ftloop.errors import DataError
from ftloop.data.media import DEFAULT_FPS, video_inputs, video_patches
from ftloop.data.rows import Row


def noise_frame(path, seed, size=(56, 56)):
    """A frame of random pixels: every patch differs, so a wrong layout cannot go unnoticed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def rgb(path) -> Image.Image:
    return Image.open(path).convert("RGB")


def normalized(path, processor) -> np.ndarray:
    """A frame already at a size smart_resize keeps (a multiple of 28, inside the pixel limits), rescaled
    and normalised with the processor's own settings: (C, H, W)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) * np.float32(processor.rescale_factor)
    mean, std = (np.asarray(v, dtype=np.float32) for v in (processor.image_mean, processor.image_std))
    return ((pixels - mean) / std).transpose(2, 0, 1)


def test_video_of_one_repeated_frame_equals_the_image(tmp_path, image_processor):
    frame = noise_frame(tmp_path / "f.png", 0, size=(70, 45))  # resized by the processor
    pixels, grid = video_patches([rgb(frame)] * image_processor.temporal_patch_size, image_processor, "row 1")
    image = image_processor(images=[Image.open(frame).convert("RGB")], return_tensors="pt")
    assert [grid] == image["image_grid_thw"].tolist()
    assert torch.equal(pixels, image["pixel_values"])  # exactly: same patches, same order, same values


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4])
def test_distinct_frames_follow_qwens_video_layout(tmp_path, image_processor, num_frames):
    frames = [noise_frame(tmp_path / f"{k}.png", k) for k in range(num_frames)]
    pixels, grid = video_patches([rgb(f) for f in frames], image_processor, "row 1")
    want, want_grid = qwen_video_layout(torch.from_numpy(np.stack([normalized(f, image_processor) for f in frames])),
                                        image_processor)
    assert grid == want_grid == [-(-num_frames // 2), 4, 4]  # frames padded up to a multiple of 2
    torch.testing.assert_close(pixels, want, rtol=0, atol=1e-5)


def test_frames_of_another_size_take_the_first_frames_size(tmp_path, image_processor):
    frames = [noise_frame(tmp_path / "a.png", 1), noise_frame(tmp_path / "b.png", 2, size=(112, 84))]
    pixels, grid = video_patches([rgb(f) for f in frames], image_processor, "row 1")
    assert grid == [1, 4, 4] and pixels.shape == (16, 3 * 2 * 14 * 14)


def test_video_inputs_grids_and_seconds(tmp_path, image_processor):
    frames = [noise_frame(tmp_path / f"{k}.png", k) for k in range(5)]
    out, times = video_inputs([frames[:3], frames], image_processor, VideoArgs(), "row 1", fps=[None, 4.0])
    assert out["video_grid_thw"].tolist() == [[2, 4, 4], [3, 4, 4]]
    assert out["pixel_values_videos"].shape[0] == 2 * 16 + 3 * 16
    assert out["second_per_grid_ts"].tolist() == [2 / DEFAULT_FPS, 2 / 4.0]  # temporal_patch_size / fps
    # Qwen3-VL's timestamps: each group's first and last frame averaged (the last frame repeated to fill a group),
    # as transformers' Qwen3VLProcessor._calculate_timestamps computes them.
    assert times == [[0.25, 1.0], [0.125, 0.625, 1.0]]


def test_video_errors_name_the_row(tmp_path, image_processor):
    frame = save_rgb(tmp_path / "a.png")
    with pytest.raises(DataError) as excinfo:
        video_inputs([[frame, str(tmp_path / "gone.png")]], image_processor, VideoArgs(), "train.json: row 4")
    one_line_error(excinfo, "train.json: row 4", "gone.png")
    with pytest.raises(DataError) as excinfo:
        video_inputs([[]], image_processor, VideoArgs(), "train.json: row 5")
    one_line_error(excinfo, "train.json: row 5", "no frames")
    with pytest.raises(DataError) as excinfo:
        video_inputs([[frame]], image_processor, VideoArgs(), "train.json: row 6", fps=[0])
    one_line_error(excinfo, "train.json: row 6", "fps")


# ------------------------------------------------------------------------------------------------ samples


def row(images=(), videos=(), reply="red", fps=None) -> Row:
    content = "".join("<image>" for _ in images) + "".join("<video>" for _ in videos) + "\nWhat happens?"
    return Row([{"role": "user", "content": content}, {"role": "assistant", "content": reply}], list(images),
               [list(v) for v in videos], fps)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    return [noise_frame(folder / f"{k}.png", k) for k in range(6)]


@pytest.fixture(scope="module")
def pads(tokenizer):
    return tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_end|>"])


def test_sample_with_image_and_videos(tokenizer, image_processor, frames, pads):
    image_pad, video_pad, _ = pads
    s = SFTDataset([row([frames[0]], [frames[1:4], frames[4:6]])], tokenizer, image_processor, 4096, SYSTEM)[0]
    assert set(s) == {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                      "second_per_grid_ts", "input_ids", "labels"}
    assert s["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]
    assert int((s["input_ids"] == video_pad).sum()) == (32 + 16) // 4
    assert int((s["input_ids"] == image_pad).sum()) == 16 // 4
    assert s["pixel_values_videos"].shape == (48, 1176)
    assert s["second_per_grid_ts"].tolist() == [1.0, 1.0]
    assert not (s["labels"] == video_pad).any() and (s["labels"] != IGNORE_INDEX).any()


def test_video_only_row_and_truncation_never_cuts_a_video(tokenizer, image_processor, frames, pads):
    r = row(videos=[frames[:4]], reply="the quick brown fox jumps over the lazy dog " * 4)
    full = SFTDataset([r], tokenizer, image_processor, 4096, SYSTEM)[0]
    assert "pixel_values" not in full and full["video_grid_thw"].tolist() == [[2, 4, 4]]
    vision_end = full["input_ids"].tolist().index(pads[2])
    cut = SFTDataset([r], tokenizer, image_processor, vision_end + 1, SYSTEM)[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][:vision_end + 1])
    with pytest.raises(DataError) as excinfo:
        SFTDataset([dataclasses.replace(r, number=7)], tokenizer, image_processor, vision_end, SYSTEM,
                   source="t.json")[0]
    one_line_error(excinfo, "t.json: row 7", str(vision_end))


def test_collate_concatenates_videos_in_row_order(tokenizer, image_processor, frames, pads):
    image_pad, video_pad, _ = pads
    rows = [row(videos=[frames[:2]], fps=[1.0]), row(), row([frames[2]], [frames[3:6]]), row([frames[1]])]
    samples = [SFTDataset(rows, tokenizer, image_processor, 4096, SYSTEM)[i] for i in range(4)]
    batch = make_collate(tokenizer.pad_token_id, image_pad, video_pad)(samples)
    assert torch.equal(batch["pixel_values_videos"],
                       torch.cat([samples[0]["pixel_values_videos"], samples[2]["pixel_values_videos"]]))
    assert batch["video_grid_thw"].tolist() == [[1, 4, 4], [2, 4, 4]]
    assert batch["second_per_grid_ts"].tolist() == [2.0, 1.0]  # row 1 at 1 fps, row 3 at the default 2
    assert torch.equal(batch["pixel_values"], torch.cat([samples[2]["pixel_values"], samples[3]["pixel_values"]]))
    types = batch["mm_token_type_ids"]
    assert torch.equal(types == 2, batch["input_ids"] == video_pad)
    assert torch.equal(types == 1, batch["input_ids"] == image_pad)
    assert int((types == 2).sum()) == int(batch["video_grid_thw"].prod(-1).sum()) // 4
    text_only = make_collate(tokenizer.pad_token_id, image_pad, video_pad)([samples[1]])
    assert not {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"} & set(text_only)


def test_check_measures_video_rows_as_the_dataset_tokenises_them(tokenizer, image_processor, frames, pads):
    from ftloop.data.check import Measuring

    r = dataclasses.replace(row([frames[0]], [frames[1:6]], reply="a long answer " * 6), number=3)
    sample = SFTDataset([r], tokenizer, image_processor, 4096, SYSTEM)[0]
    # the length, and each video's frames as fed (5, padded to 6) and tokens (3 groups x 4 x 4 patches / 2^2)
    assert Measuring(tokenizer, image_processor, SYSTEM)(r, "t.json") == [len(sample["input_ids"]), [[6, 12]]]
    last_video_end = len(sample["input_ids"]) - 1 - sample["input_ids"].tolist()[::-1].index(pads[2])
    right = Measuring(tokenizer, image_processor, SYSTEM, last_video_end + 1, "right")
    assert right(r, "t.json")[0] > last_video_end  # its text is cut after the video
    problem = Measuring(tokenizer, image_processor, SYSTEM, last_video_end, "right")(r, "t.json")
    assert problem.startswith("t.json: row 3") and f"end at token {last_video_end + 1}" in problem  # not without it
    assert Measuring(tokenizer, image_processor, SYSTEM, last_video_end, "drop")(r, "t.json")[0] > last_video_end
