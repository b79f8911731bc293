"""Run under torchrun by tests/test_export.py: export one model the old way and the streamed way.

Usage: torchrun ... tests/export_worker.py OUT -- <ftloop.train flags>
Loads the model through ftloop's FSDP path, moves every weight off the source checkpoint's values (each rank
its own shard), then writes under OUT:
  reference-<dtype>/  the previous export: FSDP FULL_STATE_DICT on rank 0, save_pretrained on a skeleton
  streamed-<dtype>/   export_model (max shard size SHARD), and stats-<dtype>.json with its ExportStats
  single/             export_model in bf16 with the default 5GB: one model.safetensors
  checkpoint/         save_checkpoint of the same weights (hf/ written by ModelFiles.save)
"""

import copy
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForImageTextToText, GenerationConfig

from ftloop.config import parse_args
from ftloop.distributed import init_distributed, leave
from ftloop.fsdp.checkpoint import save_checkpoint
from ftloop.export import export_model
from ftloop.hf_folder import ModelFiles
from ftloop.model import DTYPES
from ftloop.optim.build import build_optimizer
from ftloop.train import prepare
from scripts.support import full_state_dict

SHARD = "100KB"


def reference_export(state, out_dir, hf_config, tokenizer, image_processor, save_dtype, max_shard_size, source_dir):
    """What ftloop exported before streaming (rank 0, the whole state dict in memory)."""
    dtype = DTYPES[save_dtype]
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(copy.deepcopy(hf_config), dtype=dtype)
    skeleton.config.use_cache = True
    try:
        skeleton.generation_config = GenerationConfig.from_pretrained(source_dir)
    except OSError:
        pass
    skeleton.save_pretrained(out_dir, state_dict=state, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)


def main() -> None:
    out, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    cfg = parse_args(flags)
    d = init_distributed()
    s = prepare(cfg, d)
    model, source = s.model, cfg.model.model_name_or_path
    files = ModelFiles(s.hf_config, s.tokenizer, s.image_processor, source)
    generator = torch.Generator().manual_seed(1000 + d.rank)
    with torch.no_grad():  # trained weights differ from the checkpoint's, differently on each rank's shard
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.01)

    for save_dtype in ("fp32", "bf16"):
        state = full_state_dict(model)
        if d.rank == 0:
            reference_export(state, os.path.join(out, f"reference-{save_dtype}"), s.hf_config, s.tokenizer,
                             s.image_processor, save_dtype, SHARD, source)
        del state
        stats = export_model(model, os.path.join(out, f"streamed-{save_dtype}"), files, save_dtype, SHARD, d)
        if d.rank == 0:
            with open(os.path.join(out, f"stats-{save_dtype}.json"), "w") as f:
                json.dump(dataclasses.asdict(stats), f)
        else:
            assert stats is None
    export_model(model, os.path.join(out, "single"), files, "bf16", "5GB", d)

    optimizer = build_optimizer(model, cfg.optim, d.device)
    save_checkpoint(model, optimizer, os.path.join(out, "checkpoint"), {"step": 1}, cfg.to_dict(),
                    files.save, d)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
