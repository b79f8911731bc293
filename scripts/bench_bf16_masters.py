"""Do bf16 master weights still learn at a fine-tuning learning rate? `python scripts/bench_bf16_masters.py`.

A fine-tune, the way users run one, on CPU (gloo), no download: the demo model is first trained on colour
questions (fp32, lr 1e-3) and exported in bf16, as hub checkpoints come; that export is then fine-tuned on
shape questions at --learning-rate 1e-5 (Adafactor, bf16 compute, the same data, seed and steps) four ways:
fp32 masters, and bf16 masters with --bf16-master-rounding nearest, stochastic and kahan. At 1e-5 an update is
far below half a bf16 step of most weights, so plain rounding drops nearly all of them. It prints each run's
eval loss before and after, and its share of the fp32 run's improvement. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"fp32 masters": ["--param-dtype", "fp32"],
            "bf16, nearest": ["--param-dtype", "bf16", "--bf16-master-rounding", "nearest"],
            "bf16, stochastic": ["--param-dtype", "bf16", "--bf16-master-rounding", "stochastic"],
            "bf16, kahan": ["--param-dtype", "bf16", "--bf16-master-rounding", "kahan"]}


def train(model: str, bundle: dict, out: str, nproc: int, flags: list[str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "ftloop.train", "--model-name-or-path", model, "--train-data", bundle["train_json"],
               "--eval-data", bundle["eval_json"], "--image-folder", bundle["image_folder"], "--output-dir", out,
               "--report-to", "none", "--save-steps", "0", "--dataloader-num-workers", "0",
               "--per-device-train-batch-size", "8", "--per-device-eval-batch-size", "16", *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def colours_then_shapes(tmp: str, nproc: int, pretrain_steps: int) -> tuple[str, dict]:
    """(the demo model trained on colour questions (fp32, lr 1e-3) and exported in bf16, like a hub checkpoint;
    the bundle of shape questions it is then fine-tuned on)."""
    from ftloop.demo.bundle import build_demo_bundle

    colours = build_demo_bundle(os.path.join(tmp, "colours"), shape_share=0.0)
    shapes = build_demo_bundle(os.path.join(tmp, "shapes"), shape_share=1.0, seed=1)
    train(colours["model_dir"], colours, os.path.join(tmp, "pretrain"), nproc,
          ["--max-steps", str(pretrain_steps), "--learning-rate", "1e-3", "--no-bf16", "--eval-steps",
           str(pretrain_steps), "--no-gradient-checkpointing", "--no-load-best-model-at-end"])
    return os.path.join(tmp, "pretrain", "final"), shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="the fine-tunes' --seed (data order, rounding noise)")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    with tempfile.TemporaryDirectory() as tmp:
        pretrained, shapes = colours_then_shapes(tmp, args.nproc, args.pretrain_steps)
        results = {}
        for name, flags in VARIANTS.items():
            records = train(pretrained, shapes, os.path.join(tmp, name.replace(" ", "").replace(",", "-")),
                            args.nproc, ["--max-steps", str(args.steps), "--learning-rate", str(args.learning_rate),
                                         "--eval-on-start", "--eval-steps", str(args.steps), "--logging-steps",
                                         str(args.steps), "--no-gradient-checkpointing", "--seed", str(args.seed),
                                         *flags])
            evals = [r["eval_loss"] for r in records if "eval_loss" in r]
            results[name] = (evals[0], evals[-1])
            print(f"{name}: eval loss {evals[0]:.4f} -> {evals[-1]:.4f}", flush=True)
    start, fp32 = results["fp32 masters"]
    print(f"\nfine-tune at lr {args.learning_rate:g}, {args.steps} steps of {8 * args.nproc} rows, bf16 compute")
    print(f"{'masters':<18} {'eval loss':>9} {'vs fp32':>8} {'of fp32 gain':>12}")
    for name, (before, after) in results.items():
        print(f"{name:<18} {after:>9.4f} {after / fp32 - 1:>+8.2%} {(before - after) / (start - fp32):>12.1%}")


if __name__ == "__main__":
    main()
