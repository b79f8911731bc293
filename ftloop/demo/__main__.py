"""`python -m ftloop.demo`: build the demo bundle, fine-tune it with torchrun, check what it learned.

The bundle is a tiny random-weight Qwen2.5-VL (`--family qwen3-vl`: Qwen3-VL; `--family qwen3.5`: Qwen3.5) with a
locally trained tokenizer and a few hundred drawn shapes; the question asks for the shape's colour, so the answer
needs the image. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from ftloop.demo.bundle import build_demo_bundle
from ftloop.demo.models import FAMILIES
from ftloop.demo.evaluate import evaluate_export

# The demo's training flags. fp32 compute (--no-bf16): CPUs without bf16 matrix units run bf16 matmuls
# several times slower than fp32; on GPUs keep the bf16 default. A model that starts from random weights
# needs larger steps than a fine-tune of a pretrained one.
DEMO_FLAGS = [
    "--num-train-epochs", "12", "--per-device-train-batch-size", "8", "--per-device-eval-batch-size", "16",
    "--learning-rate", "1e-3", "--warmup-ratio", "0.02", "--logging-steps", "10", "--eval-steps", "25",
    "--save-steps", "0", "--eval-on-start", "--no-bf16", "--no-gradient-checkpointing", "--report-to", "none",
]


def train_command(bundle: dict, output_dir: str, nproc: int, extra: list[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        os.environ.get("MASTER_PORT", "29511"), "-m", "ftloop.train",
        "--model-name-or-path", bundle["model_dir"], "--train-data", bundle["train_json"],
        "--eval-data", bundle["eval_json"], "--image-folder", bundle["image_folder"],
        "--output-dir", output_dir, *DEMO_FLAGS, *extra,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_run", help="where the bundle and the run are written")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="training processes")
    parser.add_argument("--family", default="qwen2.5-vl", choices=FAMILIES, help="the tiny model's family")
    parser.add_argument("train_flags", nargs="*", metavar="-- FLAG",
                        help="more ftloop.train flags after --, e.g. -- --lora-rank 16 --learning-rate 5e-3")
    args = parser.parse_args()

    start = time.perf_counter()
    bundle_dir, output_dir = os.path.join(args.workdir, "bundle"), os.path.join(args.workdir, "run")
    print(f"demo: building the bundle in {bundle_dir}", flush=True)
    # Colour questions only: a 4-token image from a random vision tower learns colour within the demo's
    # minutes; shapes need more (the test bundle keeps asking both).
    bundle = build_demo_bundle(bundle_dir, shape_share=0.0, family=args.family)
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run each time: metrics.jsonl is appended to
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = train_command(bundle, output_dir, args.nproc_per_node, args.train_flags)
    print("demo: " + " ".join(command[1:]), flush=True)
    if subprocess.run(command, env=env).returncode != 0:
        raise SystemExit("demo: training failed (see above)")

    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        evals = [r for r in map(json.loads, f) if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    print(f"demo: eval loss {evals[0]['eval_loss']:.3f} at step {evals[0]['step']} -> "
          f"{evals[-1]['eval_loss']:.3f} at step {evals[-1]['step']} (best {best['eval_loss']:.3f} at step "
          f"{best['step']}, the weights exported as final)", flush=True)
    accuracy = evaluate_export(os.path.join(output_dir, "final"), bundle["eval_json"], bundle["image_folder"])
    print(f"demo: accuracy on held-out images {accuracy:.1%}; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
