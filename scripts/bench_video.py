"""Decoding video files: the time one video costs a loader worker, and what a run's `data_wait_s` shows.

    python scripts/bench_video.py [--workdir bench_video] [--files A.mp4 B.avi ...] [--train]

Encodes test videos with PyAV (h264 at 640x360 and 1280x720, 30 fps, 10 s and 60 s; moving stripes under noise,
at the bit rates of common files: 1.5 Mbit/s at 360p, 4 Mbit/s at 720p), adds any `--files`, and times, per video,
as a loader worker runs it (torch on one thread; FFmpeg's own decoding threads as ftloop sets them):

- decode: ftloop.data.video.decode_video (count the packets, decode up to the last sampled frame, convert and
  resize the sampled ones), with Qwen2.5-VL's defaults (2 fps, 4..768 frames, qwen-vl-utils' pixel budgets);
- patches: ftloop.data.media.decoded_video_patches (normalise and lay out), and the same frames through the image
  processor (`video_patches`), the slower path decoded videos no longer take.

Each is the median of --repeats runs. With --train it also trains the demo's tiny model for a few steps on rows of
the 640x360 videos (2 CPU processes, one loader worker each) and prints each logged step's data_wait_s and
step_time_s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import torch

from ftloop.config import VideoArgs
from ftloop.data.media import decoded_video_patches, video_patches
from ftloop.data.video import decode_video
from ftloop.demo.bundle import build_demo_bundle

SIZES = {  # name -> ((width, height), seconds, bits per second)
    "640x360 10 s": ((640, 360), 10, 1_500_000), "640x360 60 s": ((640, 360), 60, 1_500_000),
    "1280x720 60 s": ((1280, 720), 60, 4_000_000)}


def encode(path: str, size: tuple[int, int], seconds: int, bit_rate: int, fps: int = 30) -> str:
    import av

    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bit_rate
        stream.options = {"maxrate": str(bit_rate), "bufsize": str(2 * bit_rate)}
        for k in range(seconds * fps):  # moving stripes and noise: motion and texture to encode
            base = ((x + 4 * k) // 16 + (y + 2 * k) // 16) % 2 * 160
            noise = np.random.default_rng(k).integers(0, 64, (height, width), dtype=np.uint8)
            pixels = np.stack([base + noise, (base // 2 + noise), 255 - base - noise // 2], -1).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return path


def seconds_of(path: str) -> float:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base) if stream.duration else float(container.duration / 1e6)


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def train(bundle: dict, workdir: str, videos: list[str]) -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": "<video>What moves?"},
                          {"role": "assistant", "content": "stripes"}], "videos": [path]} for path in videos]
    data = os.path.join(workdir, "video_rows.json")
    with open(data, "w") as f:
        json.dump(rows * 4, f)
    out = os.path.join(workdir, "run")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "ftloop.train", "--model-name-or-path", bundle["model_dir"], "--train-data", data,
                    "--output-dir", out, "--report-to", "none", "--save-steps", "0", "--max-steps", "6",
                    "--logging-steps", "1", "--per-device-train-batch-size", "1", "--max-seq-length", "16384",
                    "--dataloader-num-workers", "1"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="bench_video")
    parser.add_argument("--files", nargs="*", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker's share
    os.makedirs(args.workdir, exist_ok=True)
    bundle = build_demo_bundle(os.path.join(args.workdir, "bundle"), num_train=8, num_eval=4, image_size=56, seed=0,
                               model_size="test")
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(bundle["model_dir"], min_pixels=28 * 28, max_pixels=16384 * 28 * 28)
    videos = {}
    for name, (size, seconds, bit_rate) in SIZES.items():
        path = os.path.join(args.workdir, name.replace(" ", "_") + ".mp4")
        if not os.path.exists(path):
            encode(path, size, seconds, bit_rate)
        videos[name] = path
    videos.update({os.path.basename(path): path for path in args.files})
    print(f"{'video':<24} {'length':>7} {'Mbit/s':>6} {'frames':>7} {'frame size':>10} {'decode':>8} {'per s':>8} "
          f"{'patches':>8} {'processor':>9}")
    for name, path in videos.items():
        length = seconds_of(path)
        decode_s, decoded = timed(lambda: decode_video(path, VideoArgs(), 28, 2, name), args.repeats)
        patches_s, _ = timed(lambda: decoded_video_patches(decoded.frames, processor), args.repeats)
        processor_s, _ = timed(lambda: video_patches(decoded.frames, processor, name), 1)
        width, height = decoded.frames[0].size
        rate = os.path.getsize(path) * 8 / length / 1e6
        print(f"{name:<24} {length:>6.1f}s {rate:>6.1f} {len(decoded.frames):>7} {width:>4}x{height:<5} {decode_s:>7.3f}s "
              f"{decode_s / length * 1000:>6.1f}ms {patches_s:>7.3f}s {processor_s:>8.3f}s")
    if args.train:
        for record in train(bundle, args.workdir, [videos["640x360 10 s"], videos["640x360 60 s"]]):
            print(f"step {record['step']}: data_wait_s {record['data_wait_s']:.3f}  step_time_s "
                  f"{record['step_time_s']:.3f}")


if __name__ == "__main__":
    main()
