"""Resuming a packed run (--packing): exactly at the same layout, within summation order at another, and
refused when the batching or the rows' lengths changed. Uses test_resume's run and its helpers."""

import json
import shutil

import pytest
import torch

from ftloop.errors import ConfigError
from launch import check, forked_python_m, forked_torchrun, logged_losses
from test_resume import final_weights, flags, resumable


def test_packed_runs_resume_exactly_and_at_another_world_size(tiny_bundle, tmp_path):
    """--packing (two rows a sequence here, 2 steps an epoch): the checkpoint of step 3, mid-epoch, resumed on 2
    processes gives bit-identical losses and weights; on 1 process with 4 micro-batches a step, the same packs
    in the same steps, so the same losses and weights up to summation order (the bounds of the world-size test
    above). No dropout: its masks are drawn per rank (the exact resume of the generators is tested above)."""
    packed = ["--packing", "--max-seq-length", "80"]
    reference = tmp_path / "reference"
    check(forked_torchrun(2, ["-m", "ftloop.train", *flags(tiny_bundle, reference, *packed, "--save-steps", "3")]))
    records = [json.loads(line) for line in open(reference / "metrics.jsonl")]
    assert all(r["padding_ratio"] < 0.1 and r["rank_tokens_max_over_mean"] < 1.1 for r in records if "loss" in r)
    expected, expected_weights = logged_losses(reference), final_weights(reference)
    for nproc, accumulation in ((2, "2"), (1, "4")):
        out = tmp_path / f"{nproc}_processes"
        out.mkdir()
        shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
        args = flags(tiny_bundle, out, *packed, "--gradient-accumulation-steps", accumulation,
                     "--resume-from-checkpoint", "auto", "--save-steps", "0")
        result = check(forked_torchrun(2, ["-m", "ftloop.train", *args]) if nproc == 2
                       else forked_python_m("ftloop.train", args))
        assert "at step 3 (epoch 1, packed sequence 4)" in result.stdout
        got, weights = logged_losses(out), final_weights(out)
        assert sorted(got) == [4, 5, 6, 7, 8]
        if nproc == 2:
            assert got == {s: expected[s] for s in got}
            assert all(torch.equal(expected_weights[k], w) for k, w in weights.items())
        else:
            assert max(abs(got[s] - expected[s]) / abs(expected[s]) for s in got) < 1e-5
            assert max(float((expected_weights[k] - w).abs().max()) for k, w in weights.items()) < 5e-5
    for other in ([], [*packed, "--length-group-steps", "2"]):
        with pytest.raises(ConfigError, match="the batching changed"):
            resumable(tiny_bundle, tmp_path / "refused", str(reference / "checkpoint-3"), *other)
    # `resumable` measures every row as 1 token: the same flags, other lengths (the packs would differ).
    with pytest.raises(ConfigError, match="the rows' token lengths changed"):
        resumable(tiny_bundle, tmp_path / "refused", str(reference / "checkpoint-3"), *packed)
