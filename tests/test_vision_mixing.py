"""Two gloo processes whose micro-batches mix images, videos and text differently: no hang (one vision pass
per micro-batch on every rank), and the gradients of a single process that sees the same rows."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from launch import REPO, check, forked_torchrun, train_flags
from test_distributed import max_relative_difference

WORKER = os.path.join(REPO, "tests", "mix_worker.py")


def rows_for(folder) -> dict:
    frames = []
    for k in range(6):
        pixels = np.random.default_rng(k).integers(0, 256, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
        frames.append(str(folder / f"{k}.png"))

    def row(images=(), videos=(), reply="a red circle"):
        content = "".join("<image>" for _ in images) + "".join("<video>" for _ in videos) + "\nWhat is it?"
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": reply}],
                "images": list(images), "videos": [list(v) for v in videos]}

    text = row(reply="nine, since four plus five is nine")
    # name: [rank 0's micro-batch, rank 1's micro-batch]; one process takes both as accumulation steps.
    return {"images vs text": [[row([frames[0]])], [text]],
            "videos vs images": [[row(videos=[frames[1:4]], reply="it turns")], [row([frames[4], frames[5]])]],
            "videos+images vs text": [[row([frames[2]], [frames[3:6]], reply="both blue")], [text]]}


def step(bundle, tmp_path, scenarios, nproc: int) -> dict:
    out = tmp_path / f"mix-{nproc}.pt"
    flags = train_flags(bundle, tmp_path / "unused", "--max-steps", "1", "--use-orig-params", "--no-bf16",
                        "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", str(2 // nproc))
    # A rank waiting in an all-gather the other never starts would hang: the timeout fails the test instead.
    check(forked_torchrun(nproc, [WORKER, str(scenarios), str(out), "--", *flags], timeout=150))
    return torch.load(out)


@pytest.mark.parametrize("bundle_name", ["tiny_bundle", "qwen3_bundle", "qwen35_bundle"],
                         ids=["qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_mixed_vision_inputs_across_ranks_match_one_process(request, tmp_path, bundle_name):
    """Qwen3-VL's DeepStack features go through the one vision pass too (its mergers get gradients, and the
    blank image of a text-only rank gives them zero); Qwen3.5's tower (no DeepStack) and hybrid decoder likewise
    (its DeltaNet layer's A_log has a gradient in every scenario)."""
    bundle = request.getfixturevalue(bundle_name)
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps(rows_for(tmp_path)))
    one, two = step(bundle, tmp_path, scenarios, 1), step(bundle, tmp_path, scenarios, 2)
    assert one.keys() == two.keys() == set(json.loads(scenarios.read_text()))
    for name in one:
        assert two[name]["loss"] == pytest.approx(one[name]["loss"], rel=1e-6), name
        assert max_relative_difference(two[name]["grads"], one[name]["grads"]) < 1e-5, name
        parts = ([".visual.blocks."] + [".visual.deepstack_merger_list."] * (bundle_name == "qwen3_bundle")
                 + [".linear_attn.A_log"] * (bundle_name == "qwen35_bundle"))
        for part in parts:
            visual = [k for k in one[name]["grads"] if part in k]
            assert visual and any(one[name]["grads"][k].abs().sum() > 0 for k in visual), (name, part)
    # The scenarios differ (the comparison is not of one step three times).
    assert len({round(r["loss"], 6) for r in one.values()}) == 3
