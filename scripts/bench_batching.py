"""Batching on a mixed set: held-out loss, throughput, padding and rank balance of ftloop's batching choices.

    python scripts/bench_batching.py [--workdir bench_batching] [--steps 300] [--nproc 2]

Builds the demo bundle's mixed variant (one-word answers, captions of one to six sentences, text-only rows),
then trains the same tiny Qwen2.5-VL from the same weights with each batching choice on `--nproc` CPU
processes (gloo), and prints one table. The held-out loss is ftloop's evaluation (token-weighted
cross-entropy over the assistant replies of the held-out rows) at the last step; the rates are medians over
the logged windows after the first (which holds start-up). Every run sees the same rows (the epochs of
`--steps` unpacked steps): packing holds more rows per step, so it runs fewer, larger steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from ftloop.demo.bundle import build_demo_bundle

RUNS = {  # name -> extra flags
    "random": ["--no-group-by-length"],
    "grouped": [],  # the default: grouped within each step
    "grouped-50": ["--length-group-steps", "50"],
    "packed": ["--packing", "--per-device-train-batch-size", "1"],  # sequences of --max-seq-length 2048
    "packed-512": ["--packing", "--per-device-train-batch-size", "1", "--max-seq-length", "512"],
    # About the rows of an unpacked micro-batch of 4 in each sequence: about as many steps as unpacked runs.
    "packed-256": ["--packing", "--per-device-train-batch-size", "1", "--max-seq-length", "256"],
}


def train(bundle: dict, out: str, nproc: int, flags: list[str]) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "ftloop.train", "--model-name-or-path", bundle["model_dir"], "--train-data",
               bundle["train_json"], "--eval-data", bundle["eval_json"], "--image-folder", bundle["image_folder"],
               "--output-dir", out, "--report-to", "none", "--save-steps", "0", "--no-bf16",
               "--no-gradient-checkpointing", "--learning-rate", "1e-3", "--logging-steps", "10", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(flags)} failed:\n{done.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def summary(records: list[dict]) -> dict:
    train = [r for r in records if "loss" in r][1:]
    evals = [r for r in records if "eval_loss" in r]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in train)

    return {"eval_loss": evals[-1]["eval_loss"], "steps": evals[-1]["step"], "tokens_per_s": median("tokens_per_s"),
            "padding": median("padding_ratio"), "rank_balance": median("rank_tokens_max_over_mean"),
            "data_wait_share": median("data_wait_s") / median("step_time_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_batching")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the unpacked runs")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="--per-device-train-batch-size of unpacked runs")
    parser.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS),
                        help="runs to do (default: all): random is --no-group-by-length, grouped the default, "
                             "grouped-50 --length-group-steps 50, packed --packing (sequences of 2048 tokens), "
                             "packed-512 and packed-256 --packing --max-seq-length 512 or 256")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="--seed of each repeat (data order): "
                        "the table gives the mean held-out loss over them, and its spread")
    args = parser.parse_args()
    bundle = build_demo_bundle(os.path.join(args.workdir, "bundle"), num_train=480, num_eval=96,
                               caption_share=0.4)
    epochs = args.steps * args.nproc * args.batch / 480  # the same rows seen by every run
    results = {}
    for name in args.only:
        runs = []
        for seed in args.seeds:
            flags = ["--per-device-train-batch-size", str(args.batch), "--num-train-epochs", str(epochs),
                     "--eval-steps", "100000", "--seed", str(seed)] + RUNS[name]
            out = os.path.join(args.workdir, f"{name}-seed{seed}")
            runs.append(summary(train(bundle, out, args.nproc, flags)))
            print(f"bench: {name} seed {seed}: {runs[-1]}", flush=True)
        losses = [r["eval_loss"] for r in runs]
        results[name] = {**{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                         "eval_loss": statistics.mean(losses), "spread": max(losses) - min(losses)}
    print("\n| run | held-out loss (spread) | steps | tokens/s | padding | rank max/mean | data wait |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['eval_loss']:.4f} ({r['spread']:.4f}) | {r['steps']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['padding']:.3f} | {r['rank_balance']:.3f} | {r['data_wait_share']:.1%} |")


if __name__ == "__main__":
    main()
