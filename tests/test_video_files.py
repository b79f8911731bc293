"""Video files (ftloop.data.video): decoded with PyAV, sampled and sized by qwen-vl-utils' rule (written out in
videoutil), their pixels, tokens and time positions for Qwen2.5-VL and Qwen3-VL, and every kind of bad file as one
line naming the row."""

import dataclasses
import json
import math
import os
import shutil
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from datautil import SYSTEM, one_line_error, write_json
from ftloop.config import VideoArgs
from ftloop.data.batches import SFTDataset, make_collate
from ftloop.data.check import Measuring, report, shown
from ftloop.data.encode import ChatFormat, video_block
from ftloop.data.layouts import load_rows
from ftloop.data.media import decoded_video_patches, group_times, video_inputs, video_patches
from ftloop.data.rows import Row
from ftloop.data.video import decode_video
from ftloop.distributed import World
from ftloop.errors import DataError
from videoutil import (frame_index, make_video, qwen_indices, qwen_max_pixels, qwen_nframes, qwen_video_layout)

# (name, frames, fps, (width, height), codec, suffix): two codecs, odd and even sizes, integer and fractional
# rates, one second to one minute
VIDEOS = {
    "h264 1 s 30 fps": (30, 30, (66, 46), "libx264", ".mp4"),
    "mpeg4 odd size 2.4 s 25 fps": (60, 25, (65, 47), "mpeg4", ".avi"),
    "h264 1 min 29.97 fps": (1798, Fraction(30000, 1001), (32, 24), "libx264", ".mkv"),
    "mpeg4 1 min 10 fps": (600, 10, (33, 17), "mpeg4", ".mov"),
    "vp9 3 s 7.5 fps": (22, Fraction(15, 2), (48, 48), "libvpx-vp9", ".webm"),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {name: make_video(folder / (name.replace(" ", "_") + suffix), frames, fps, size, codec)
            for name, (frames, fps, size, codec, suffix) in VIDEOS.items()}


@pytest.mark.parametrize("name", VIDEOS)
@pytest.mark.parametrize("factor", [28, 32])  # Qwen2/2.5-VL's patch 14 x merge 2, Qwen3-VL's 16 x 2
def test_frames_are_sampled_and_sized_by_qwen_vl_utils_rule(videos, name, factor):
    frames, fps, (width, height), _, _ = VIDEOS[name]
    decoded = decode_video(videos[name], VideoArgs(), factor, 2, "row 1")
    count = qwen_nframes(frames, float(fps))
    indices = qwen_indices(frames, count)
    assert decoded.total_frames == frames
    assert [frame_index(np.asarray(f)) for f in decoded.frames] == [i % 1000 for i in indices]  # those frames
    exact = VIDEOS[name][4] in (".mp4", ".mov", ".avi")  # .mkv and .webm store times in milliseconds
    assert decoded.times == pytest.approx([i / fps for i in indices], abs=1e-9 if exact else 6e-4)  # constant rate
    assert decoded.seconds_per_frame == pytest.approx(frames / (count * fps), rel=1e-12 if exact else 1e-4)
    want = smart_resize(height, width, factor=factor, min_pixels=128 * factor * factor,
                        max_pixels=qwen_max_pixels(count, factor))
    assert {f.size for f in decoded.frames} == {(want[1], want[0])}


def test_the_flags_change_the_sampling_and_the_sizes(videos, tmp_path):
    path, (frames, fps, (width, height), _, _) = videos["h264 1 min 29.97 fps"], VIDEOS["h264 1 min 29.97 fps"]
    flags = VideoArgs(video_fps=1.0, video_min_frames=3, video_max_frames=41, video_min_pixels=28 * 28 * 4,
                      video_max_pixels=28 * 28 * 9, video_total_pixels=28 * 28 * 100)
    decoded = decode_video(path, flags, 28, 2, "row 1")
    count = qwen_nframes(frames, float(fps), fps=1.0, min_frames=3, max_frames=41)
    assert count == len(decoded.frames) == 40  # 60 s at 1 fps, at most 41: 40, even
    assert [frame_index(np.asarray(f)) for f in decoded.frames] == [i % 1000 for i in qwen_indices(frames, count)]
    high = qwen_max_pixels(count, 28, 28 * 28 * 4, 28 * 28 * 9, 28 * 28 * 100)
    want = smart_resize(height, width, factor=28, min_pixels=28 * 28 * 4, max_pixels=high)
    assert decoded.frames[0].size == (want[1], want[0])
    # a row's own rate wins over --video-fps, as an element's `fps` does in qwen-vl-utils
    assert len(decode_video(path, flags, 28, 2, "row 1", fps=0.5).frames) == qwen_nframes(frames, float(fps), 0.5, 3,
                                                                                           41) == 28  # 29.99
    # a short video gives what it has, an even count; an odd least count is rounded up
    short = decode_video(videos["h264 1 s 30 fps"], VideoArgs(video_min_frames=40), 28, 2, "row 1")
    assert len(short.frames) == 30
    at_least_5 = decode_video(videos["h264 1 s 30 fps"], VideoArgs(video_min_frames=5), 28, 2, "row 1")
    assert len(at_least_5.frames) == qwen_nframes(30, 30, min_frames=5) == 6
    # the whole video's budget: 4 frames share 2 x 15,680 pixels, so each is cut to about 7,840
    big = make_video(tmp_path / "big.mp4", 10, 10, (200, 150))
    budget = VideoArgs(video_min_pixels=28 * 28 * 2, video_total_pixels=28 * 28 * 20)
    frame = decode_video(big, budget, 28, 2, "row 1").frames[0]
    want = smart_resize(150, 200, factor=28, min_pixels=28 * 28 * 2,
                        max_pixels=qwen_max_pixels(4, 28, 28 * 28 * 2, None, 28 * 28 * 20))
    assert frame.size == (want[1], want[0]) == (84, 56)


def test_a_variable_frame_rate_video_takes_its_frames_real_times(tmp_path):
    durations = [20, 60] * 15  # ms: 30 frames over 1.2 s, the average rate 25 fps, no two neighbours alike
    path = make_video(tmp_path / "vfr.mp4", 30, 25, (64, 48), "libx264", durations_ms=durations)
    decoded = decode_video(path, VideoArgs(), 28, 2, "row 1")
    starts = np.cumsum([0] + durations[:-1]) / 1000
    video_fps = 29 / starts[-1]  # frames - 1 over the span of their timestamps
    indices = qwen_indices(30, qwen_nframes(30, video_fps))
    assert [frame_index(np.asarray(f)) for f in decoded.frames] == indices
    assert decoded.times == pytest.approx([starts[i] for i in indices], abs=1e-9)  # not index / average rate
    assert decoded.times != pytest.approx([i / 25 for i in indices], abs=1e-3)


def test_decoded_pixels_are_the_image_processors_in_qwens_video_layout(tiny_bundle, tmp_path):
    processor = AutoImageProcessor.from_pretrained(tiny_bundle["model_dir"], min_pixels=28 * 28, max_pixels=10 ** 6)
    video = make_video(tmp_path / "noise.avi", 12, 5, (65, 47), "mpeg4", textured=True)
    decoded = decode_video(video, VideoArgs(video_min_pixels=56 * 84), 28, 2, "r")
    pixels, grid = decoded_video_patches(decoded.frames, processor)
    # the image processor on each frame (the frames already sized: it keeps them), in Qwen's patchify layout
    each = [processor(images=[f], return_tensors="pt")["pixel_values"] for f in decoded.frames]
    h, w = decoded.frames[0].height // 14, decoded.frames[0].width // 14
    normalised = torch.stack([p.reshape(h // 2, w // 2, 2, 2, 3, 2, 14, 14)[..., 0, :, :]  # one temporal copy
                              .permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * 14, w * 14) for p in each])
    want, want_grid = qwen_video_layout(normalised, processor)
    assert grid == want_grid == [len(decoded.frames) // 2, h, w]
    torch.testing.assert_close(pixels, want, rtol=0, atol=1e-6)
    # and the image processor's own video path on the same frames
    slow, slow_grid = video_patches(decoded.frames, processor, "r")
    assert slow_grid == grid
    torch.testing.assert_close(pixels, slow, rtol=0, atol=1e-6)


def test_decoded_pixels_equal_transformers_qwen2vl_video_processor(tiny_bundle, tmp_path):
    """Against the reference itself, where torchvision can be imported (not beside torch 2.13's CPU build: CI skips
    this; it was run in a torch 2.14.1 + torchvision 0.29.1 environment, README: Videos)."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_bundle["model_dir"])
    decoded = decode_video(make_video(tmp_path / "noise.mp4", 30, 10, (66, 46), textured=True), VideoArgs(), 28, 2,
                           "r")
    reference = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2,
                                      image_mean=processor.image_mean, image_std=processor.image_std)
    clip = np.stack([np.asarray(f) for f in decoded.frames])  # (T, H, W, C)
    out = reference(videos=[clip], do_resize=False, do_sample_frames=False, return_tensors="pt")
    pixels, grid = decoded_video_patches(decoded.frames, processor)
    assert out["video_grid_thw"].tolist() == [grid]
    torch.testing.assert_close(pixels, out["pixel_values_videos"], rtol=0, atol=1e-5)


# ---- tokens and positions -----------------------------------------------------------------------------------

SMALL = VideoArgs(video_min_pixels=56 * 56, video_max_pixels=56 * 84)  # few tokens a frame: quick tests


def video_row(path, fps=None) -> Row:
    return Row([{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "red"}],
               videos=[path], video_fps=[fps] if fps else None, number=1)


@pytest.mark.parametrize("name", ["h264 1 s 30 fps", "h264 1 min 29.97 fps"])
def test_qwen2_5_vl_tokens_and_time_positions_of_a_video_file(videos, tiny_bundle, tokenizer, image_processor, name):
    frames, fps, _, _, _ = VIDEOS[name]
    sample = SFTDataset([video_row(videos[name])], tokenizer, image_processor, 10 ** 5, SYSTEM, "t.json", SMALL)[0]
    count = qwen_nframes(frames, float(fps))
    t, h, w = sample["video_grid_thw"][0].tolist()
    assert t == count // 2
    pads = int((sample["input_ids"] == tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
    assert pads == t * h * w // 4  # one token per merged 2 x 2 patch
    seconds = float(sample["second_per_grid_ts"][0])  # temporal_patch_size / sample_fps, sample_fps = n / total x fps
    # (.mkv keeps times in milliseconds: the 1 min clip's rate is read as 29.96998 for 29.97003)
    assert seconds == pytest.approx(2 / (count / frames * float(fps)), rel=1e-6 if name.endswith("30 fps") else 1e-5)
    config = AutoConfig.from_pretrained(tiny_bundle["model_dir"])
    model = Qwen2_5_VLForConditionalGeneration(config)
    batch = make_collate(tokenizer.pad_token_id, config.image_token_id, config.video_token_id)([sample])
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], None,
                                              batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"],
                                              attention_mask=batch["attention_mask"])
    video = positions[0, 0][batch["input_ids"][0] == config.video_token_id].view(t, -1)
    tokens_per_second = config.vision_config.tokens_per_second
    step = [int(g * seconds * tokens_per_second) for g in range(t)]  # each group at its time: Qwen2.5-VL's rope
    assert (video - video[0, 0]).tolist() == [[s] * (h * w // 4) for s in step]
    if name.startswith("h264 1 min"):
        assert step[:3] == [0, 2, 4]  # 2 frames a second, 2 tokens a second: one group a second


def test_qwen3_vl_writes_each_frame_groups_time_as_its_processor_does(videos, qwen3_bundle):
    frames, fps, _, _, _ = VIDEOS["mpeg4 1 min 10 fps"]
    tokenizer = AutoTokenizer.from_pretrained(qwen3_bundle["model_dir"])
    processor = AutoImageProcessor.from_pretrained(qwen3_bundle["model_dir"])
    sample = SFTDataset([video_row(videos["mpeg4 1 min 10 fps"])], tokenizer, processor, 10 ** 5, ChatFormat("", True),
                        "t.json", SMALL)[0]
    t, h, w = sample["video_grid_thw"][0].tolist()
    indices = qwen_indices(frames, qwen_nframes(frames, float(fps)))
    # transformers' Qwen3VLProcessor.replace_video_token with qwen-vl-utils' metadata (fps, frames_indices)
    reference = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    reference.vision_start_token, reference.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    reference.video_token = "<|video_pad|>"
    reference.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    expected = reference.replace_video_token({"video_grid_thw": torch.tensor([[t, h, w]]),
                                              "video_metadata": [SimpleNamespace(fps=float(fps),
                                                                                 frames_indices=indices)]}, 0)
    assert t == len(indices) // 2 == 60 and expected.count(" seconds>") == 60
    assert expected in tokenizer.decode(sample["input_ids"])


def test_a_row_s_fps_and_the_video_flags_reach_the_tokens(videos, tokenizer, image_processor):
    path = videos["h264 1 min 29.97 fps"]
    grids = {}
    for label, fps, flags in (("default", None, SMALL), ("row fps 1", 1.0, SMALL),
                              ("max 8 frames", None, dataclasses.replace(SMALL, video_max_frames=8))):
        sample = SFTDataset([video_row(path, fps)], tokenizer, image_processor, 10 ** 5, SYSTEM, "t.json", flags)[0]
        grids[label] = sample["video_grid_thw"][0, 0].item()
    # 59.99 s x 2 fps = 119.99 frames: 118 (even, rounded down); x 1 fps: 58; at most 8: 8 (4 groups of 2)
    assert grids == {"default": 59, "row fps 1": 29, "max 8 frames": 4}


# ---- the check, the layouts, the cache ------------------------------------------------------------------------

def test_the_check_reports_frames_and_tokens_per_video(videos, tokenizer, image_processor, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(videos["h264 1 s 30 fps"], folder / "a.mp4")
    shutil.copy(videos["mpeg4 odd size 2.4 s 25 fps"], folder / "b.avi")
    write_json(folder / "train.json", [
        {"messages": [{"role": "user", "content": "<video>Why?"}, {"role": "assistant", "content": "x"}],
         "videos": ["a.mp4"]},
        {"messages": [{"role": "user", "content": "<video><video>Both?"}, {"role": "assistant", "content": "y"}],
         "videos": ["a.mp4", "b.avi"]}])
    found = report(str(folder / "train.json"), Measuring(tokenizer, image_processor, SYSTEM, video=SMALL),
                   World.single())
    assert found.errors == [] and found.videos == 3
    # 4 frames each (1 s and 2.4 s at 2 fps: at least 4), 2 groups of 4 x 4 patches merged 2 x 2: 8 tokens
    assert found.video_frames == [4, 4, 4] and found.video_tokens == [8, 8, 8]
    assert "per video: 4-4 frames, 8-8 tokens" in found.summary()
    [first] = load_rows(str(folder / "train.json"), "", [])[:1]  # and --show prints each video so
    assert "<|vision_start|><video 4 frames, 8 tokens><|vision_end|>Why?" in shown(
        first, Measuring(tokenizer, image_processor, SYSTEM, video=SMALL), "train.json: row 1")


def test_video_files_in_every_layout(videos, tmp_path):
    shutil.copy(videos["h264 1 s 30 fps"], tmp_path / "a.mp4")
    shutil.copy(videos["mpeg4 odd size 2.4 s 25 fps"], tmp_path / "b.avi")
    (tmp_path / "f").mkdir()
    for k in range(2):
        Image.new("RGB", (28, 28)).save(tmp_path / "f" / f"{k}.png")
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.avi")
    reply = {"role": "assistant", "content": "x"}
    rows = [
        {"conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}], "video": "a.mp4"},
        {"conversations": [{"from": "human", "value": "<video><video>"}, {"from": "gpt", "value": "x"}],
         "video": ["a.mp4", "b.avi"]},
        {"conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}],
         "video": ["f/0.png", "f/1.png"]},  # one video's frames, as before
        {"messages": [{"role": "user", "content": "<video><video>"}, reply],
         "videos": ["b.avi", ["f/0.png", "f/1.png"]]},  # a file and a frame list
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "file://" + a}]}, reply]},
        {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "b.avi"}}]}, reply]},
        {"messages": [{"role": "user", "content": [{"type": "video_url", "value": "a.mp4"}]}, reply]},  # LF v1
        # LLaMA-Factory's default sharegpt layout: conversations with a top-level `videos`
        {"conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}], "videos": ["b.avi"]},
    ]
    for number, row in enumerate(rows, start=1):
        write_json(tmp_path / "d.json", [row])
        errors: list[str] = []
        [read] = load_rows(str(tmp_path / "d.json"), "", errors)
        assert not errors, (number, errors)
        expected = {1: [a], 2: [a, b], 3: [[str(tmp_path / "f/0.png"), str(tmp_path / "f/1.png")]],
                    4: [b, [str(tmp_path / "f/0.png"), str(tmp_path / "f/1.png")]], 5: [a],
                    6: [b], 7: [a], 8: [b]}[number]
        assert read.videos == expected, number


def test_a_data_uri_video_decodes_from_memory(videos, tokenizer, image_processor, tmp_path):
    import base64

    with open(videos["h264 1 s 30 fps"], "rb") as f:
        uri = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
    write_json(tmp_path / "d.json", [{"messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "x"}]}])
    [row] = load_rows(str(tmp_path / "d.json"), "", [])
    from_file = SFTDataset([video_row(videos["h264 1 s 30 fps"])], tokenizer, image_processor, 4096, SYSTEM,
                           "t.json", SMALL)[0]
    from_uri = SFTDataset([row], tokenizer, image_processor, 4096, SYSTEM, "t.json", SMALL)[0]
    assert torch.equal(from_uri["pixel_values_videos"], from_file["pixel_values_videos"])


def bad_files(folder, good: str) -> dict:
    """(path, what its one line says) of each kind of video that cannot be trained on."""
    files = {}
    with av.open(str(folder / "sound.mkv"), "w") as out:  # an audio stream and no video stream
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    files["no video stream"] = (str(folder / "sound.mkv"), "has no video stream")
    with av.open(str(folder / "empty.avi"), "w") as out:  # a video stream, no frame in it
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 32, 32
        out.start_encoding()
    files["zero frames"] = (str(folder / "empty.avi"), "has 0 frames")
    files["one frame"] = (make_video(folder / "one.mp4", 1, 10), "has 1 frame; a video needs at least 2")
    with open(good, "rb") as f:
        data = f.read()
    (folder / "cut.mp4").write_bytes(data[:len(data) // 2])  # the index (moov) at the end is gone
    files["truncated"] = (str(folder / "cut.mp4"), "cannot decode video")
    streamed = make_video(folder / "streamed.mp4", 60, 30, index_first=True)  # its index says 60 frames
    with open(streamed, "rb") as f:
        data = f.read()
    (folder / "cut_streamed.mp4").write_bytes(data[:len(data) * 9 // 10])
    files["truncated, index first"] = (str(folder / "cut_streamed.mp4"), "(truncated or damaged)")
    (folder / "notes.mp4").write_text("these are my notes, not a video\n")
    files["not a video"] = (str(folder / "notes.mp4"), "cannot decode video")
    files["missing"] = (str(folder / "gone.mp4"), "video not found")
    return files


def test_each_kind_of_bad_video_file_is_one_line_naming_the_row(videos, tokenizer, image_processor, tmp_path):
    for kind, (path, says) in bad_files(tmp_path, videos["h264 1 s 30 fps"]).items():
        row = dataclasses.replace(video_row(path), number=7)
        problem = Measuring(tokenizer, image_processor, SYSTEM, video=SMALL)(row, "train.json")
        assert isinstance(problem, str) and problem.startswith("train.json: row 7: ") and says in problem, \
            (kind, problem)
        assert "\n" not in problem, kind
        with pytest.raises(DataError) as excinfo:  # and the same line where training reads it
            SFTDataset([row], tokenizer, image_processor, 4096, SYSTEM, "train.json", SMALL)[0]
        one_line_error(excinfo, "train.json: row 7", says)


def test_a_video_file_frame_list_and_both_in_one_row_collate(videos, tokenizer, image_processor, tmp_path):
    frames = []
    for k in range(3):
        Image.new("RGB", (56, 56), (k * 80, 0, 0)).save(tmp_path / f"{k}.png")
        frames.append(str(tmp_path / f"{k}.png"))
    row = Row([{"role": "user", "content": "<video><video>Compare."}, {"role": "assistant", "content": "red"}],
              videos=[videos["h264 1 s 30 fps"], frames], number=1)
    out, times = video_inputs(row.videos, image_processor, SMALL, "r")
    assert out["video_grid_thw"][:, 0].tolist() == [2, 2]  # 4 sampled frames; 3 frames padded to 4
    assert out["second_per_grid_ts"].tolist() == pytest.approx([2 * 30 / (4 * 30), 2 / 2.0])
    assert times == [group_times([0, 10 / 30, 19 / 30, 29 / 30], 2), [0.25, 1.0]]
    assert video_block(4, times[0]).count(" seconds>") == 2


def test_the_check_cache_knows_each_video_file_and_the_video_flags(videos, tokenizer, image_processor, tmp_path,
                                                                   monkeypatch):
    from ftloop.data.check import checked_rows

    shutil.copy(videos["h264 1 s 30 fps"], tmp_path / "a.mp4")
    write_json(tmp_path / "train.json", [{"messages": [{"role": "user", "content": "<video>Why?"},
                                                       {"role": "assistant", "content": "x"}], "videos": ["a.mp4"]}])
    calls, measure = [], Measuring.__call__
    monkeypatch.setattr(Measuring, "__call__", lambda self, row, source: calls.append(row.number) or
                        measure(self, row, source))

    def check(flags=SMALL):
        rows = load_rows(str(tmp_path / "train.json"), "", [])
        before = len(calls)
        checked = checked_rows(str(tmp_path / "train.json"), rows, [], Measuring(tokenizer, image_processor, SYSTEM,
                               video=flags), False, World.single(), str(tmp_path / "out"))
        return len(calls) > before, checked.lengths

    measured, lengths = check()
    assert measured and check() == (False, lengths)  # the same video, the same flags: read back
    shutil.copy(videos["h264 1 min 29.97 fps"], tmp_path / "a.mp4")  # another video under the same name
    measured, longer = check()
    assert measured and longer[0] > lengths[0]
    assert check(dataclasses.replace(SMALL, video_fps=1.0))[0]  # a video flag: measured again


def test_a_run_trains_on_video_files_with_the_video_flags(videos, tiny_bundle, tokenizer, image_processor, tmp_path):
    """2 processes, one step over all 4 rows (2 each): the tokens it counts are the rows' as the flags sample them."""
    from launch import check as succeeded, forked_torchrun, train_flags

    names = ["h264 1 min 29.97 fps", "mpeg4 odd size 2.4 s 25 fps", "h264 1 s 30 fps", "mpeg4 1 min 10 fps"]
    rows = [{"messages": [{"role": "user", "content": "<video>What colour?"},
                          {"role": "assistant", "content": f"colour {k}"}], "videos": [videos[name]]}
            for k, name in enumerate(names)]
    write_json(tmp_path / "train.json", rows)
    flags = dataclasses.replace(SMALL, video_max_frames=8)
    out = tmp_path / "out"
    succeeded(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
        tiny_bundle, out, "--train-data", str(tmp_path / "train.json"), "--image-folder", "", "--max-steps", "1",
        "--per-device-train-batch-size", "2", "--video-max-frames", "8", "--video-min-pixels", str(56 * 56),
        "--video-max-pixels", str(56 * 84))]))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    [step] = [r for r in records if "loss" in r]
    read = load_rows(str(tmp_path / "train.json"), "", [])
    dataset = SFTDataset(read, tokenizer, image_processor, 2048, SYSTEM, "train.json", flags)
    assert step["tokens_seen"] == sum(len(dataset[i]["input_ids"]) for i in range(4))
    assert math.isfinite(step["loss"]) and step["data_wait_s"] >= 0
