"""Rank 0's host memory during export, streamed vs gathering the full state dict: `python scripts/bench_export.py`.

Builds random Qwen2.5-VL folders of one width and several depths (no download), loads each through ftloop's
FSDP path under `torchrun --nproc_per_node 2` (gloo, CPU), then on rank 0 measures the peak RSS growth of
  - streamed: ftloop's export_model (one FSDP unit gathered at a time, one pending shard), and
  - full: the previous export, FSDP FULL_STATE_DICT to rank 0, cast, save_pretrained,
both to bf16 with the same --max-shard-size; then the peak RSS growth of `python -m ftloop.export`'s work on a
checkpoint of the same weights (one process). One table row per depth: the streamed and command columns
should stay flat (about one shard plus one unit; one shard as loaded, in fp32) while the full one grows with
the model. About three minutes for the default 8, 16 and 32 layers.

The peak is the kernel's VmHWM, reset before each export through /proc/self/clear_refs (a sampling thread
reading the RSS every millisecond where that reset is not allowed). Large allocations go straight to mmap
(MALLOC_MMAP_THRESHOLD_), so that freed memory leaves the RSS and the peak measures live data.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


class PeakRSS:
    """Peak RSS growth (MiB) over a `with` block."""

    def __enter__(self):
        self.before, self.sampled, self.stop = rss_kib(), 0, threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.thread = None
        except OSError:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.sampled = max(self.sampled, rss_kib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.thread is None:
            with open("/proc/self/status") as f:
                peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
        else:
            self.stop.set()
            self.thread.join()
            peak = max(self.sampled, rss_kib())
        self.growth_mib = (peak - self.before) / 1024


def build_folder(folder: str, layers: int, hidden: int, dtype: torch.dtype = torch.float32,
                 max_shard_size: str = "5GB") -> int:
    """A random Qwen2.5-VL with `layers` decoder layers of width `hidden` and the test bundle's tiny vision
    tower, saved in `dtype`; returns its parameter count."""
    from pathlib import Path

    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ftloop.demo.bundle import build_tokenizer
    from ftloop.demo.models import build_config, build_image_processor, save_image_processor
    from scripts.support import widen

    hf_logging.disable_progress_bar()
    tok = build_tokenizer()
    config = widen(build_config(tok, "test"), hidden, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tok.save_pretrained(folder)
    save_image_processor(build_image_processor(56), Path(folder))
    return sum(p.numel() for p in model.parameters())


def worker(folder: str, out: str, max_shard_size: str) -> None:
    """Under torchrun: load `folder` through ftloop's FSDP path, export both ways, rank 0 prints the result."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

    from ftloop.config import FSDPArgs, ModelArgs
    from ftloop.distributed import init_distributed
    from ftloop.fsdp.checkpoint import COMPLETE_MARKER, MODEL_FILES
    from ftloop.export import export_model
    from ftloop.fsdp.internals import unit_parameters
    from ftloop.fsdp.load import UnitMaterializer
    from ftloop.fsdp.wrap import wrap_fsdp
    from ftloop.hf_folder import FolderWeights, ModelFiles, meta_skeleton
    from ftloop.model import VisionLanguageSFT, build_meta_model, unit_roots
    from scripts.support import full_state_dict

    d = init_distributed()
    args = ModelArgs(model_name_or_path=folder)
    files = ModelFiles.load(folder)
    hf_config = files.hf_config
    meta = build_meta_model(hf_config, args)
    materialize = UnitMaterializer(meta, FolderWeights(folder, meta), d)
    model = wrap_fsdp(VisionLanguageSFT(meta), unit_roots(meta), FSDPArgs(), materialize, d)

    # Once unmeasured: the first export imports and caches what any export needs (tokenizer saving, ...).
    export_model(model, os.path.join(out, "warmup"), files, "bf16", max_shard_size, d)
    with PeakRSS() as streamed:
        stats = export_model(model, os.path.join(out, "streamed"), files, "bf16", max_shard_size, d)
    with PeakRSS() as full:
        state = full_state_dict(model)
        if d.is_main:
            state = {name: tensor.to(torch.bfloat16) for name, tensor in state.items()}
            skeleton = meta_skeleton(copy.deepcopy(hf_config), torch.bfloat16)
            skeleton.save_pretrained(os.path.join(out, "full"), state_dict=state, max_shard_size=max_shard_size)
        del state
    # A checkpoint of the same weights, as ftloop.train writes it, for `python -m ftloop.export`.
    checkpoint = os.path.join(out, "checkpoint")
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        dcp.save({"model": model.state_dict()}, checkpoint_id=checkpoint)
    if d.is_main:
        files.save(os.path.join(checkpoint, MODEL_FILES))
        open(os.path.join(checkpoint, COMPLETE_MARKER), "w").close()
    dist.barrier()
    # The largest unit the streamed export gathered, in the save dtype (bf16): the other half of its bound.
    shapes = meta_skeleton(hf_config, torch.bfloat16).state_dict()
    largest_unit = max(sum(shapes[name.removeprefix("hf.")].numel() * 2 for name, _, _ in entries
                           if name.removeprefix("hf.") in shapes) for _, entries in unit_parameters(model))
    if d.is_main:
        print("RESULT " + json.dumps({"streamed_mib": streamed.growth_mib, "full_mib": full.growth_mib,
                                      "files": len(stats.files), "largest_unit_mb": largest_unit / 1e6,
                                      "peak_shard_mb": stats.peak_shard_bytes / 1e6}), flush=True)
    dist.destroy_process_group()


def command(checkpoint: str, out: str, max_shard_size: str) -> None:
    """`python -m ftloop.export`'s work in this process, after its imports and one warm-up run."""
    from ftloop.export import export_checkpoint

    export_checkpoint(checkpoint, out + "-warmup", "bf16", max_shard_size)
    with PeakRSS() as peak:
        export_checkpoint(checkpoint, out, "bf16", max_shard_size)
    print("RESULT " + json.dumps({"command_mib": peak.growth_mib}), flush=True)


def run_result(command_line: list[str], env: dict) -> dict:
    result = subprocess.run(command_line, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        sys.exit(f"{command_line} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--hidden", type=int, default=512, help="text width (multiple of 64)")
    parser.add_argument("--max-shard-size", default="10MB")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--command", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.max_shard_size)
        return
    if args.command:
        command(*args.command, args.max_shard_size)
        return

    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            folder, out = os.path.join(tmp, f"model-{layers}"), os.path.join(tmp, f"out-{layers}")
            size_mb = build_folder(folder, layers, args.hidden) * 2 / 1e6  # in bf16
            started = time.perf_counter()
            result = run_result([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", __file__, "--max-shard-size", args.max_shard_size, "--worker", folder, out], env)
            result.update(run_result([sys.executable, __file__, "--max-shard-size", args.max_shard_size, "--command",
                                      os.path.join(out, "checkpoint"), os.path.join(out, "command")], env))
            rows.append((layers, size_mb, result, time.perf_counter() - started))
            shutil.rmtree(folder)
            shutil.rmtree(out)

    print(f"rank 0 peak RSS growth during export (bf16, --max-shard-size {args.max_shard_size}, 2 processes, gloo)")
    print("(and of `python -m ftloop.export` on a checkpoint of the same weights, one process)")
    print(f"{'layers':>6} {'model MB':>9} {'shards':>6} {'largest unit MB':>15} {'streamed MB':>11} "
          f"{'full gather MB':>14} {'command MB':>10} {'run s':>6}")
    for layers, size_mb, r, seconds in rows:
        print(f"{layers:>6} {size_mb:>9.1f} {r['files']:>6} {r['largest_unit_mb']:>15.1f} "
              f"{r['streamed_mib']:>11.1f} {r['full_mib']:>14.1f} {r['command_mib']:>10.1f} {seconds:>6.1f}")


if __name__ == "__main__":
    main()
