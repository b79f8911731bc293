"""Does a LoRA fine-tune learn, and what does it cost? `python scripts/bench_lora.py`.

The fine-tune of scripts/bench_bf16_masters.py (the demo model first trained on colour questions and exported
in bf16, then fine-tuned on shape questions, 2 CPU processes, gloo, no download), run two ways with the same
data, seed and steps: the whole model (fp32 masters), and rank-R LoRA adapters on every decoder projection
(the base frozen in bf16, fp32 adapters). Both train in bf16 compute, as on GPUs. It prints each run's eval
loss before and after, the held-out accuracy of its exported `final` folder (greedy decoding with plain
transformers; the LoRA run's is the merged export), its tokens/s and rank 0's peak resident memory (ru_maxrss).
About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench_bf16_masters import REPO, colours_then_shapes, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--full-learning-rate", type=float, default=1e-4)
    parser.add_argument("--lora-learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    from ftloop.demo.evaluate import evaluate_export

    runs = {"whole model": ["--learning-rate", str(args.full_learning_rate)],
            f"LoRA rank {args.lora_rank}": ["--learning-rate", str(args.lora_learning_rate), "--lora-rank",
                                            str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank)]}
    with tempfile.TemporaryDirectory() as tmp:
        pretrained, shapes = colours_then_shapes(tmp, args.nproc, args.pretrain_steps)
        before = evaluate_export(pretrained, shapes["eval_json"], shapes["image_folder"], show=0)
        print(f"pretrained on colours: shape accuracy {before:.1%}", flush=True)
        results = {}
        for name, flags in runs.items():
            out = os.path.join(tmp, name.replace(" ", "-"))
            records = train(pretrained, shapes, out, args.nproc,
                            ["--max-steps", str(args.steps), "--eval-on-start", "--eval-steps", str(args.steps),
                             "--logging-steps", "10", "--no-gradient-checkpointing", "--warmup-ratio", "0.05",
                             *flags])
            evals = [r["eval_loss"] for r in records if "eval_loss" in r]
            speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
            speed = speed[1:] or speed  # the first window warms up
            peak = max(r.get("peak_allocated_gib", 0) for r in records)
            accuracy = evaluate_export(os.path.join(out, "final"), shapes["eval_json"], shapes["image_folder"], show=0)
            results[name] = (evals[0], evals[-1], accuracy, sum(speed) / len(speed), peak)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"\nshape questions, {args.steps} steps of {8 * args.nproc} rows, bf16 compute, {args.nproc} processes")
    print(f"{'trains':<16} {'eval loss':>17} {'accuracy':>9} {'tokens/s':>9} {'rank-0 RSS GiB':>15}")
    for name, (start, end, accuracy, speed, peak) in results.items():
        print(f"{name:<16} {start:>8.3f} -> {end:<6.3f} {accuracy:>9.1%} {speed:>9.0f} {peak:>15.2f}")


if __name__ == "__main__":
    main()
