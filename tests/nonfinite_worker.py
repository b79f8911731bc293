"""Run under torchrun (2 ranks, gloo) by tests/test_model_folder.py: NaN in the weights read stops every rank with
the reading rank's line, whoever reads them, and leaves no rank waiting in a collective.

Usage: torchrun --nproc_per_node 2 tests/nonfinite_worker.py CLEAN_FOLDER NAN_FOLDER OUT_PREFIX
Each rank writes OUT_PREFIX.rank<R>.json: {scenario: the ConfigError line it raised, or None}, after a last
collective that every rank reaches only if none was left behind.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoConfig

from ftloop.config import FSDPArgs
from ftloop.distributed import init_distributed, leave
from ftloop.errors import ConfigError
from ftloop.fsdp.load import UnitMaterializer, load_weights_into
from ftloop.fsdp.wrap import wrap_fsdp
from ftloop.hf_folder import FolderWeights, meta_skeleton
from ftloop.model import WRAPPER_PREFIX, VisionLanguageSFT, unit_roots


def wrapped(folder_of_rank, world, every_rank_reads: bool):
    """The tiny model wrapped by FSDP and filled from the folder each reading rank is given."""
    skeleton = meta_skeleton(AutoConfig.from_pretrained(folder_of_rank[0]), torch.float32)
    reads = every_rank_reads or world.is_main
    weights = FolderWeights(folder_of_rank[world.rank], skeleton) if reads else None
    fill = UnitMaterializer(skeleton, weights, world, every_rank_reads)
    return wrap_fsdp(VisionLanguageSFT(skeleton), unit_roots(skeleton), FSDPArgs(), fill, world)


def outcome(attempt) -> str | None:
    try:
        attempt()
    except ConfigError as err:
        return str(err)
    return None


def main() -> None:
    clean, nan, prefix = sys.argv[1:4]
    world = init_distributed(timeout_s=60)  # a rank left waiting fails the run instead of hanging it
    found = {
        # rank 0 reads and broadcasts: every rank checks the values it received
        "rank0": outcome(lambda: wrapped([nan, nan], world, every_rank_reads=False)),
        # every rank reads, and only rank 1's copy is damaged: the ranks agree
        "one_copy": outcome(lambda: wrapped([clean, nan], world, every_rank_reads=True)),
    }
    model = wrapped([clean, clean], world, every_rank_reads=False)
    # the best weights read back at the end (policies.Evaluator.restore_best): rank 0 reads, every rank checks
    skeleton = meta_skeleton(AutoConfig.from_pretrained(nan), torch.float32)
    weights = FolderWeights(nan, skeleton) if world.is_main else None
    found["restore"] = outcome(lambda: load_weights_into(model, weights, world, prefix=WRAPPER_PREFIX))
    dist.barrier()
    with open(f"{prefix}.rank{world.rank}.json", "w") as f:
        json.dump(found, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
