"""An optimizer step of O(FSDP units) kernels (issue 24, point 1): the aten ops one ShardedAdafactor step dispatches
(each a kernel launch on CUDA, or a few) on 2 ranks, counted by a dispatch mode over FSDP1 models of 2 and 4 units
holding 6, 12 or 24 parameters each. Before the flat tables (ftloop.optim.tables) the count was ~60 ops per
parameter: 889 / 1,523 / 2,895 at 2 units of 6 / 12 / 24 parameters."""

import json

import pytest

from launch import REPO, check, forked_torchrun

PER_UNIT = 60  # ops a unit (of one chunk) adds to a step, whatever it holds (measured: 56 with momentum and decay)


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    out = tmp_path_factory.mktemp("ops") / "ops.json"
    shapes = ["2,1", "4,1", "2,2", "4,2", "2,4"]  # units, blocks of 6 parameters per unit
    check(forked_torchrun(2, [f"{REPO}/tests/optimizer_ops_worker.py", str(out), *shapes]))
    return {tuple(map(int, k.split(","))): v for k, v in json.loads(out.read_text()).items()}


def test_a_step_costs_the_same_whatever_a_unit_holds(ops):
    """2 or 4 units of 6, 12 or 24 parameters: the count depends on the units alone."""
    assert ops[2, 1] == ops[2, 2] == ops[2, 4], ops
    assert ops[4, 1] == ops[4, 2], ops


def test_each_unit_adds_a_small_constant(ops):
    per_unit = (ops[4, 1] - ops[2, 1]) / 2
    assert 0 < per_unit <= PER_UNIT, ops
