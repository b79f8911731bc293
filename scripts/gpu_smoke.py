"""GPU check: a random-weight model with Qwen2.5-VL-3B's real dimensions, 20 steps with ftloop.train, at
gradient accumulation 1 and 4, beside the memory plan.

    python scripts/gpu_smoke.py [--workdir /tmp/ftloop-gpu] [--steps 20] [--nproc 1] [--size 3b|tiny]
                                [--accumulation 1 4]

Builds the folder locally (nothing is downloaded: the tokenizer is the demo's, the weights random), draws
448x448 images (256 image tokens each), trains with gradient checkpointing and bf16, and prints per run the
step time, tokens/s and peak memory (torch.cuda.max_memory_allocated, from metrics.jsonl) next to the peak
`ftloop.plan` gives for the same flags (without its reserve for the CUDA context, which the allocator does not
count). `--size tiny` runs the same pipeline on the demo model (a quick check that the script works, e.g. on a
CPU, where the peak is the process's RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

# Qwen2.5-VL-3B-Instruct's config.json (text and vision dimensions).
QWEN25_VL_3B = {
    "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
}


def build_3b_folder(demo_model_dir: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(demo_model_dir)  # keeps the demo tokenizer's special-token ids
    for key, value in QWEN25_VL_3B["text"].items():
        setattr(config.text_config, key, value)
    config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    for key, value in QWEN25_VL_3B["vision"].items():
        setattr(config.vision_config, key, value)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in os.listdir(demo_model_dir):
        if name not in ("config.json", "generation_config.json") and not name.endswith(".safetensors"):
            shutil.copy(os.path.join(demo_model_dir, name), out)
    print(f"gpu_smoke: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/ftloop-gpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--size", choices=["3b", "tiny"], default="3b")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    from ftloop.demo.bundle import build_demo_bundle

    image_size = 448 if args.size == "3b" else 56
    bundle = build_demo_bundle(os.path.join(args.workdir, "bundle"), num_train=64 * args.nproc, num_eval=8,
                               image_size=image_size, shape_share=0.0)
    model_dir = bundle["model_dir"]
    if args.size == "3b":
        model_dir = os.path.join(args.workdir, "qwen2.5-vl-3b-random")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            build_3b_folder(bundle["model_dir"], model_dir)
    import torch

    from ftloop.plan import GIB, RESERVE_BYTES, parse

    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    for accumulation in args.accumulation:
        out = os.path.join(args.workdir, f"run-acc{accumulation}")
        shutil.rmtree(out, ignore_errors=True)
        flags = ["--model-name-or-path", model_dir, "--train-data", bundle["train_json"], "--image-folder",
                 bundle["image_folder"], "--output-dir", out, "--max-steps", str(args.steps),
                 "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", str(accumulation),
                 "--max-seq-length", "1024", "--logging-steps", "5", "--eval-steps", "1000000", "--save-steps", "0",
                 "--report-to", "none", "--learning-rate", "1e-5"]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.nproc), "-m", "ftloop.train", *flags]
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"gpu_smoke: training failed (accumulation {accumulation})")
        _, plan = parse([*flags, "--nproc-per-node", str(args.nproc), "--gpu-memory-gib", str(gpu_gib)]).plan()
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
        steady = records[1:] or records  # the first window holds warm-up and compilation
        step_time = sum(r["step_time_s"] for r in steady) / len(steady)
        tokens = sum(r["tokens_per_s"] for r in steady) / len(steady)
        print(f"gpu_smoke: {args.size}, {args.nproc} process(es), accumulation {accumulation}: step {step_time:.3f} s, "
              f"{tokens:.0f} tokens/s, peak memory {max(r['peak_mem_gib'] for r in records):.1f} GiB (plan "
              f"{(plan.peak_bytes - RESERVE_BYTES) / GIB:.1f} GiB + {RESERVE_BYTES / GIB:.0f} GiB reserve), loss "
              f"{records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
