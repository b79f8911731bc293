"""GPU check for one 15-minute slot: ftloop.train on a random-weight model of Qwen2.5-VL-3B's dimensions, each run's
measured memory beside the memory plan (ftloop.plan) for the same flags.

    python scripts/gpu_smoke.py --size 3b      # in the repository root, one H100/H200: about 8-10 minutes
    python scripts/gpu_smoke.py --size tiny    # the demo model on the CPU: the same runs and table, 45-70 s on 2
                                               # cores, mostly 4 ftloop.train start-ups (tests/test_gpu_smoke.py)

Every step that touches the device runs in a child process; this one never starts CUDA (checked at the end), so
it holds no GPU memory while the children train:
  1. the demo bundle (tokenizer, images of 448x448: 256 image tokens each) and, in a child, a random bf16 folder
     of Qwen2.5-VL-3B's dimensions (3.75B parameters; nothing is downloaded);
  2. rows of one image and a long reply cut at --max-seq-length 2048 (--truncation right): every position after
     the image is supervised, so the logits and activations are the plan's (it assumes every position supervised);
  3. a child that starts the process group as ftloop.train does and reads torch.cuda.mem_get_info() (free, total);
  4. runs of 10 steps, logging every 5: sdpa, and flash_attention_2 when it imports, at gradient accumulation 1
     and 4 (per-device batch 2); a run that saves checkpoint-5, and one that resumes from it in a new folder;
  5. one table: step time and tokens/s (after the first window), the allocator's allocated and reserved peaks
     (metrics.jsonl), the plan's peak without its reserve, the reserve, its main terms, reserved / plan peak, a
     verdict per run, and the save/resume window (steps 6-10) of the three runs that share it;
  6. two steps of the sdpa run under torch.profiler (scripts/profile_step.py): the optimizer's time and kernel
     launches, the vision tower's launches, the host's waits for the device per step, and MFU.
Each run is planned before it starts, against a fresh --output-dir, as ftloop.train checks it (against the memory
free after start-up: the reserve is then the 5% fragmentation). Exit 1 when a run fails or, on CUDA, a measured
peak is above the plan. On the CPU the peaks are the process's RSS, which the plan does not model: shown, not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # ftloop from this checkout
GIB = 2**30

# Qwen2.5-VL-3B-Instruct's config.json (text and vision dimensions).
QWEN25_VL_3B = {
    "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
}
# every: logging steps, the save's step, and half of each run's steps (the second window is the steady one)
SIZES = {"3b": dict(image_size=448, seq=2048, rows=32, batch=2, accumulation=(1, 4), every=5, workers=2, unit="GiB"),
         "tiny": dict(image_size=56, seq=256, rows=8, batch=2, accumulation=(1, 2), every=1, workers=0, unit="MiB")}
TERMS = {"sharded parameters": "params", "gradients": "grads", "optimizer state": "optim", "largest unit": "largest",
         "root unit": "root", "activations": "activ", "logits": "logits"}
PROBE = """import json, torch
from ftloop.config import flash_attention_imports
from ftloop.distributed import init_distributed, leave
world = init_distributed()
cuda = world.device.type == "cuda"
free, total = torch.cuda.mem_get_info(world.device) if cuda else (None, None)
print(json.dumps(dict(free=free, total=total, device=torch.cuda.get_device_name(world.device) if cuda else "cpu",
                      flash=cuda and flash_attention_imports())))
leave(0)"""


def build_3b_folder(demo_model_dir: str, out: str) -> None:
    """Run in a child (`--build-3b`): its GPU memory goes when it exits."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(demo_model_dir)  # keeps the demo tokenizer's special-token ids
    for key, value in QWEN25_VL_3B["text"].items():
        setattr(config.text_config, key, value)
    config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    for key, value in QWEN25_VL_3B["vision"].items():
        setattr(config.vision_config, key, value)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out + ".tmp")
    for name in os.listdir(demo_model_dir):
        if name not in ("config.json", "generation_config.json") and not name.endswith(".safetensors"):
            shutil.copy(os.path.join(demo_model_dir, name), out + ".tmp")
    os.rename(out + ".tmp", out)  # a folder that is there is whole
    print(f"gpu_smoke: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {out}", flush=True)


def write_rows(bundle: dict, path: str, n: int, seq: int) -> None:
    """LLaVA rows: one of the bundle's images and a reply of `seq` random words, longer than --max-seq-length in
    tokens, so that --truncation right cuts every row to exactly --max-seq-length."""
    from ftloop.demo.bundle import GENERAL_TEXT

    rng, words = random.Random(0), GENERAL_TEXT.split()
    images = sorted(os.path.join(root, f) for root, _, files in os.walk(bundle["image_folder"]) for f in files)
    rows = [{"image": images[i % len(images)], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture in detail."},
        {"from": "gpt", "value": " ".join(rng.choice(words) for _ in range(seq))}]} for i in range(n)]
    with open(path, "w") as f:
        json.dump(rows, f)


def child(command: list[str], env: dict) -> int:
    print("gpu_smoke: $", " ".join(command), flush=True)
    return subprocess.run([sys.executable, *command], cwd=REPO, env=env).returncode


def plan_for(flags: list[str], nproc: int, free: int | None):
    """The plan ftloop.train checks before loading: its flags checked first (a --output-dir that holds a run is
    refused), then against the memory free after start-up."""
    from ftloop.plan import parse, plan_memory

    command = parse([*flags, "--nproc-per-node", str(nproc)])
    command.check()
    skeleton, _ = command.plan()
    return plan_memory(skeleton, command.run, nproc, nproc, free, measured_free=True)


def measure(out: str) -> dict:
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    windows = [r for r in records if "loss" in r]
    steady = windows[1:] or windows  # the first window holds the start-up and warm-up
    return dict(windows={r["step"]: r for r in windows},
                step_s=sum(r["step_time_s"] for r in steady) / len(steady),
                tokens_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
                allocated=max(r["peak_allocated_gib"] for r in windows),
                reserved=max(r["peak_reserved_gib"] for r in windows),
                save_s=next((r["checkpoint_save_s"] for r in records if "checkpoint_save_s" in r), None))


def summary(results: dict, unit_name: str, every: int, cuda: bool) -> list[str]:
    """Print the table, a verdict per run and the save/resume window; return the runs that failed."""
    unit = GIB if unit_name == "GiB" else 2**20
    print(f"memory in {unit_name}" + ("" if cuda else " (on the CPU: peak RSS, which the plan does not model)") +
          "; plan: its peak without the reserve; res/plan: measured reserved / plan peak")
    print(f"{'run':<12}{'attn':>6}{'acc':>4}{'step_s':>8}{'tok/s':>9}" + "".join(
        f"{h:>9}" for h in ["alloc", "reserv", "plan", "reserve", *TERMS.values(), "res/plan"]))
    verdicts, failed = [], []
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<12} FAILED: {r['error']}")
            failed.append(name)
            continue
        plan, terms = r["plan"], dict(r["plan"].terms())
        allocated, reserved = r["allocated"] * GIB, r["reserved"] * GIB
        figures = [allocated, reserved, plan.peak_bytes - plan.reserve.nbytes, plan.reserve.nbytes,
                   *(terms[t].nbytes for t in TERMS)]
        print(f"{name:<12}{r['attention'].split('_')[0]:>6}{r['accumulation']:>4}{r['step_s']:>8.3f}"
              f"{r['tokens_s']:>9.0f}" + "".join(f"{x / unit:>9.2f}" for x in figures) +
              f"{reserved / plan.peak_bytes:>9.2f}")
        # Reserved against the whole plan; allocated against it without the reserve (the allocator's slack).
        over = max(reserved - plan.peak_bytes, allocated - plan.peak_bytes + plan.reserve.nbytes)
        verdict = "plan covers the measured peak" if over <= 0 else f"PLAN TOO LOW by {over / GIB:.2f} GiB"
        verdicts.append(f"{name}: {verdict}" + ("" if cuda else " (CPU RSS: not judged)"))
        if over > 0 and cuda:
            failed.append(name)
    print("\n".join(verdicts))
    window = []  # the same steps in the three runs that share them
    labels = {"sdpa-acc1": "uninterrupted", "save": "holding the save", "resume": "first after the resume"}
    for key, label in labels.items():
        if "error" not in results[key]:
            w = results[key]["windows"][2 * every]
            peaks = f"{w['peak_allocated_gib'] * GIB / unit:.2f}/{w['peak_reserved_gib'] * GIB / unit:.2f}"
            window.append(f"{label} {peaks} {unit_name} loss {w['loss']:.4f}")
    if results["save"].get("save_s") is not None:
        window.append(f"checkpoint_save_s {results['save']['save_s']:.2f}")
    print(f"save/resume, window of steps {every + 1}-{2 * every} (sdpa, accumulation 1): " + "; ".join(window))
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="3b")
    parser.add_argument("--workdir", default="/tmp/ftloop-gpu-smoke")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument("--build-3b", nargs=2, metavar=("DEMO_MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_3b:
        return build_3b_folder(*args.build_3b)
    S, nproc = SIZES[args.size], args.nproc
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.size == "tiny":
        env.setdefault("OMP_NUM_THREADS", "1")
    # The GPU's memory after start-up, read while this process builds the bundle on the CPU (before the 3B build).
    probe = subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    from ftloop.demo.bundle import build_demo_bundle

    bundle = build_demo_bundle(os.path.join(args.workdir, "bundle"), num_train=16, num_eval=0,
                               image_size=S["image_size"], seed=0, model_size="demo" if args.size == "3b" else "test",
                               shape_share=0.0)
    output = probe.communicate()[0]
    if probe.returncode:
        raise SystemExit(f"gpu_smoke: the mem_get_info child failed (exit {probe.returncode})")
    device = json.loads(output.strip().splitlines()[-1])
    cuda = device["free"] is not None
    model_dir = bundle["model_dir"]
    if args.size == "3b":
        model_dir = os.path.join(args.workdir, "qwen2.5-vl-3b-random")
        if not os.path.isdir(model_dir) and child([__file__, "--build-3b", bundle["model_dir"], model_dir], env):
            raise SystemExit("gpu_smoke: building the 3B-dimension folder failed")
    data = os.path.join(args.workdir, "rows.json")
    write_rows(bundle, data, S["rows"] * nproc, S["seq"])

    every = S["every"]
    attentions = ["sdpa"] + (["flash_attention_2"] if device["flash"] else [])
    runs = [(f"{a.split('_')[0]}-acc{acc}", a, acc, 0, "") for a in attentions for acc in S["accumulation"]]
    runs += [("save", "sdpa", 1, every, ""), ("resume", "sdpa", 1, 0, f"save/checkpoint-{every}")]
    runs_dir = os.path.join(args.workdir, "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)
    results = {}
    for name, attention, accumulation, save_steps, resume in runs:
        out = os.path.join(runs_dir, name)
        flags = ["--model-name-or-path", model_dir, "--train-data", data, "--output-dir", out,
                 "--attn-implementation", attention, "--max-steps", str(2 * every),
                 "--per-device-train-batch-size", str(S["batch"]), "--gradient-accumulation-steps", str(accumulation),
                 "--max-seq-length", str(S["seq"]), "--truncation", "right", "--logging-steps", str(every),
                 "--save-steps", str(save_steps), "--report-to", "none", "--dataloader-num-workers", str(S["workers"])]
        flags += ["--resume-from-checkpoint", os.path.join(runs_dir, resume)] if resume else []
        flags += ["--no-bf16"] if not cuda else []  # the CPU computes bf16 several times slower than fp32
        result = results[name] = dict(attention=attention, accumulation=accumulation)
        if resume and "error" in results["save"]:
            result["error"] = "skipped: the save run failed"
            continue
        try:  # before the run, as ftloop.train plans: its --output-dir is new
            result["plan"] = plan_for(flags, nproc, device["free"])
        except (Exception, SystemExit) as error:
            result["error"] = f"plan refused: {'its flags (above)' if isinstance(error, SystemExit) else error}"
            continue
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        code = child([*launcher, "-m", "ftloop.train", *flags], env)
        if code:
            result["error"] = f"ftloop.train exit {code}"
            continue
        result.update(measure(out))
        shutil.rmtree(os.path.join(out, "final"), ignore_errors=True)  # 7 GiB each at 3b: the disk holds few
        if resume:
            shutil.rmtree(os.path.join(runs_dir, resume), ignore_errors=True)

    # The profiled steps: the first run's flags (sdpa, accumulation 1) in a folder of their own; MFU needs a peak
    # on the CPU, where any will do (the figure is the mechanism's, not a speed).
    profiled = os.path.join(runs_dir, "profile")
    flags = ["--model-name-or-path", model_dir, "--train-data", data, "--output-dir", profiled,
             "--attn-implementation", "sdpa", "--max-steps", str(2 * every), "--per-device-train-batch-size",
             str(S["batch"]), "--max-seq-length", str(S["seq"]), "--truncation", "right", "--save-steps", "0",
             "--report-to", "none", "--dataloader-num-workers", str(S["workers"])]
    flags += [] if cuda else ["--no-bf16", "--peak-tflops", "1"]
    profile = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "profile_step.py"), *flags], cwd=REPO,
                             env=env, capture_output=True, text=True)
    profile_line = next((line for line in profile.stdout.splitlines() if line.startswith("profile_step: ")), None)

    print(f"\ngpu_smoke summary: {args.size}, {device['device']}, {nproc} process(es); mem_get_info after init: " +
          (f"{device['free'] / GIB:.2f} GiB free of {device['total'] / GIB:.2f} GiB" if cuda else "n/a (no CUDA)"))
    failed = summary(results, S["unit"], every, cuda)
    if profile_line is None:
        failed.append(f"profile_step exit {profile.returncode}: {profile.stderr[-2000:]}")
    else:
        print(profile_line)
    import torch

    if torch.cuda.is_initialized():  # the parent must leave the GPU to the children
        failed.append("the parent process started CUDA")
    if failed:
        raise SystemExit(f"gpu_smoke: FAILED: {', '.join(failed)}")
    print("gpu_smoke: OK")


if __name__ == "__main__":
    main()
