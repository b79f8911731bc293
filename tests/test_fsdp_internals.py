"""ftloop.fsdp.internals reads FSDP1's private state (flat parameters, their shard metadata, ShardedTensor), which
torch may change in any release. This test pins the torch version those reads were written for, and checks each
accessor against the model it wraps on 2 processes: a torch upgrade fails here, in one place, first."""

import json
import os

import torch

from launch import REPO, check, forked_torchrun

WRITTEN_FOR = "2.13"  # the torch these accessors were checked against


def test_the_torch_version_is_the_one_the_accessors_were_written_for():
    assert torch.__version__.startswith(WRITTEN_FOR + "."), (
        f"torch {torch.__version__}: ftloop/fsdp/internals.py reads FSDP1's private state as torch {WRITTEN_FOR} "
        "has it; check every accessor against this torch's torch/distributed/fsdp, then move WRITTEN_FOR")


def test_every_accessor_tells_the_truth_about_the_wrapped_model(tmp_path):
    out = tmp_path / "found.json"
    check(forked_torchrun(2, [os.path.join(REPO, "tests", "internals_worker.py"), str(out)]))
    found = json.loads(out.read_text())
    assert len(found) == 4 and all(problems == [] for problems in found.values()), found
