"""Two nodes simulated on this machine: scripts/slurm/train.sbatch run with SLURM's variables set by hand and a
stand-in `srun` that starts its task once per node, so two torchrun agents (2 processes each) meet through the
c10d rendezvous on localhost and train with HYBRID_SHARD (sharded within a node, replicated across the two)."""

import json
import os
import re
import stat
import subprocess
import time

import pytest

from ftloop.errors import ConfigError
from ftloop.fsdp.wrap import check_node_sizes
from launch import REPO, check, env, forked_torchrun, free_port, logged_losses, train_flags

SBATCH = os.path.join(REPO, "scripts", "slurm", "train.sbatch")

FAKE_SRUN = """#!/bin/bash
# srun's part here: start the task (everything after srun's own --options) once per node, with that node's
# SLURM_NODEID and SLURM_PROCID, wait for all, and fail if any failed.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_SCONTROL = """#!/bin/bash
# `scontrol show hostnames LIST`: the job's nodes, one a line (both are this machine).
[[ "$1 $2" == "show hostnames" && "$3" == "node[01-02]" ]] || { echo "unexpected: $*" >&2; exit 1; }
printf 'localhost\\nlocalhost\\n'
"""

RUN = ["--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--no-bf16", "--save-dtype", "fp32",
       "--learning-rate", "1e-3", "--gradient-accumulation-steps", "1"]


def fake_slurm_bin(folder) -> str:
    folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    return str(folder)


def parameters_said(stdout: str) -> str:
    return re.search(r"~([\d.]+M) parameters", stdout).group(1)


@pytest.fixture(scope="module")
def two_nodes(tiny_bundle, tmp_path_factory):
    """4 steps on 2 simulated nodes x 2 processes, HYBRID_SHARD, a checkpoint at step 2."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    out = tmp / "run"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[01-02]",
             "SLURM_GPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": REPO, "RDZV_PORT": str(free_port()),
             "HF_HOME": str(tmp / "hf-home"), "PATH": fake_slurm_bin(tmp / "bin") + os.pathsep + os.environ["PATH"]}
    started = time.perf_counter()
    result = subprocess.run(["bash", SBATCH, *train_flags(tiny_bundle, out, "--sharding-strategy", "HYBRID_SHARD",
                                                          *RUN)],
                            env={**env(), **slurm}, cwd=REPO, capture_output=True, text=True, timeout=300)
    check(result)
    return out, result, time.perf_counter() - started


def test_the_sbatch_script_reads_slurm_variables(two_nodes):
    out, result, seconds = two_nodes
    assert "ftloop: job 4242, 2 nodes x 2 processes, rendezvous localhost:" in result.stdout
    assert "HF_HOME " + str(out.parent / "hf-home") in result.stdout
    assert "ftloop: 4 process(es)" in result.stdout  # the two agents met: one run of 4 ranks
    print(f"2 nodes x 2 processes, 4 steps with 2 saves and an export: {seconds:.1f}s")


def test_hybrid_shard_over_two_nodes_trains_saves_and_exports(two_nodes):
    out, result, _ = two_nodes
    assert sorted(logged_losses(out)) == [1, 2, 3, 4]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    saves = [r["checkpoint_save_s"] for r in records if "checkpoint_save_s" in r]
    print(f"checkpoint save times: {saves}")
    assert sorted(os.listdir(out)) == [".ftloop", ".ftloop.lock", "checkpoint-2", "final", "metrics.jsonl"]  # the last step: exported
    assert os.path.exists(out / "final" / "model.safetensors")


@pytest.mark.parametrize("strategy", ["HYBRID_SHARD", "FULL_SHARD"])
def test_a_two_node_checkpoint_resumes_on_one_node(tiny_bundle, two_nodes, tmp_path, strategy):
    """The 2-node checkpoint of step 2 continues on one node of 2 processes (2 micro-batches each: the same
    global batch), as HYBRID_SHARD (one replica) or FULL_SHARD: the same losses up to summation order, and the
    parameter count said at start is the same for both strategies."""
    reference, two_node_result, _ = two_nodes
    out = tmp_path / "run"
    out.mkdir()
    os.system(f"cp -r {reference / 'checkpoint-2'} {out}")
    started = time.perf_counter()
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
        tiny_bundle, out, "--sharding-strategy", strategy, *RUN, "--gradient-accumulation-steps", "2",
        "--resume-from-checkpoint", "auto")]))
    load_s = float(re.search(r"at step 2 \(epoch 0, row 8\) in ([\d.]+)s", result.stdout).group(1))
    print(f"resumed onto 1 node, {strategy}: checkpoint loaded in {load_s}s, whole run "
          f"{time.perf_counter() - started:.1f}s")
    expected, got = logged_losses(reference), logged_losses(out)
    assert sorted(got) == [3, 4]
    difference = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in got)
    print(f"largest relative loss difference from the 2-node run: {difference:.2g}")
    assert difference < 1e-5, (got, expected)
    assert parameters_said(result.stdout) == parameters_said(two_node_result.stdout)


def test_hybrid_shard_refuses_layouts_fsdp_would_run_wrongly():
    check_node_sizes([2, 2, 2, 2])  # 2 nodes of 2
    check_node_sizes([1])  # one process: FSDP's own NO_SHARD, nothing to keep in step
    with pytest.raises(ConfigError, match=r"the same number of processes on every node; these nodes run \[2, 4\]"):
        check_node_sizes([4, 4, 4, 4, 2, 2])
    # One process a node: a shard group of one, which FSDP runs as NO_SHARD inside it, with no all-reduce across
    # the nodes: each rank would train a copy of its own.
    with pytest.raises(ConfigError, match="each node runs one process: use FULL_SHARD"):
        check_node_sizes([1, 1])
