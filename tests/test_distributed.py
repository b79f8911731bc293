"""Multi-process behaviour on gloo: gradients independent of the batch split, dtypes, no desync."""

import hashlib
import json
import os
import subprocess

import pytest
import torch

from launch import FAULTY_TRAIN, REPO, check, env, forked_torchrun, free_port, image_and_text_rows, torchrun
from launch import train_flags

WORKER = os.path.join(REPO, "tests", "grad_worker.py")


def step_gradients(bundle, tmp_path, nproc: int, micro_batch: int, accumulation: int, *extra: str,
                   flat: bool = False, clip: bool = False) -> dict:
    tag = hashlib.md5(" ".join(extra).encode()).hexdigest()[:8]
    out = tmp_path / f"grads-{nproc}x{accumulation}x{micro_batch}-{tag}{'-flat' * flat}.pt"
    flags = train_flags(bundle, tmp_path / "unused", "--max-steps", "1", *([] if flat else ["--use-orig-params"]),
                        "--per-device-train-batch-size", str(micro_batch),
                        "--gradient-accumulation-steps", str(accumulation), *extra)
    check(forked_torchrun(nproc, [WORKER, str(out), *["--clip"] * clip, "--", *flags]))
    return torch.load(out)


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in a)


def unequal_rows(bundle, tmp_path) -> str:
    """The tiny data set with replies of 1 to 11 words: the rows of a step carry unequal supervised tokens."""
    rows = json.loads(open(bundle["train_json"]).read())[:8]
    answers = ["red", "a red circle", "the shape is a small blue square", "green", "yes, there are two shapes in "
               "the picture", "no", "a pointed triangle on a plain light background", "purple"]
    for row, answer in zip(rows, answers):
        row["conversations"][1]["value"] = answer
    data = tmp_path / "unequal.json"
    data.write_text(json.dumps(rows))
    return str(data)


@pytest.fixture(scope="module")
def one_by_four(tiny_bundle, tmp_path_factory):
    """The flags of a step of the 4 unequal rows (fp32, flat parameters), and that step on 1 rank x 1 micro-batch
    of 4."""
    folder = tmp_path_factory.mktemp("unequal")
    args = ("--no-bf16", "--train-data", unequal_rows(tiny_bundle, folder), "--image-folder",
            tiny_bundle["image_folder"])
    return args, step_gradients(tiny_bundle, folder, 1, 4, 1, *args, flat=True)


@pytest.mark.parametrize("strategy, groups", [("FULL_SHARD", [2]), ("NO_SHARD", [1])])
def test_the_gradient_does_not_depend_on_how_the_global_batch_is_split(tiny_bundle, tmp_path, one_by_four, strategy,
                                                                       groups):
    """The same 4 rows in one optimizer step, laid out as 1 rank x 1 micro-batch of 4 and 2 ranks x 2 micro-batches
    of 1 (flat parameters): one loss and one gradient, because the loss is the step's token sum divided by the
    step's supervised tokens on all ranks. (Original parameters at 1 and 2 ranks: test_vision_mixing; 4 ranks:
    test_sharded_adafactor.) On 2 ranks, under FULL_SHARD and NO_SHARD, each of which reaches FSDP and the
    optimizer (whose tensors are whole on every rank under NO_SHARD; SHARD_GRAD_OP: the frozen-units test below):
    FULL_SHARD reduce-scatters each micro-batch's gradient into the sharded gradient as it is computed; NO_SHARD
    runs the first micro-batch's backward in `no_sync` and all-reduces the sum after the last.

    Mutation checks (tried): with the HF Trainer's normalisation, a mean per micro-batch divided by the number of
    micro-batches (`micro_loss / supervised_tokens(batch) / len(micro_batches)` in accumulate_gradients), this
    test fails: the largest relative difference of a parameter's gradient, 2x2 against 1x4 (a mean per row in
    both), is 0.577, where the bound is 1e-5. With the strategy flag ignored (always FULL_SHARD), or `no_sync` on
    the last micro-batch too (NO_SHARD never all-reduces), it fails.
    """
    args, one_by_four = one_by_four
    two_by_two = step_gradients(tiny_bundle, tmp_path, 2, 1, 2, *args, "--sharding-strategy", strategy, flat=True)
    assert two_by_two["sharding"] == {"strategy": strategy, "optimizer_groups": groups}
    # The micro-batches carry different numbers of supervised tokens, so a mean per micro-batch (or per rank)
    # would give another gradient: the comparison below can tell the two apart.
    counts = two_by_two["micro_batch_targets"]
    assert len(counts) == 2 and counts[0] != counts[1]
    assert two_by_two["loss"] == pytest.approx(one_by_four["loss"], rel=1e-6)
    assert max_relative_difference(two_by_two["grads"], one_by_four["grads"]) < 1e-5
    if strategy != "NO_SHARD":
        assert not two_by_two["unsharded_grad_between_micro_batches"]  # no no_sync: no full gradient is kept
    # Vision-tower gradients are part of the comparison, and not trivially zero.
    visual = [k for k in one_by_four["grads"] if ".visual." in k]
    assert visual and all(one_by_four["grads"][k].abs().sum() > 0 for k in visual)


def global_norm(grads: dict) -> float:
    return float(torch.cat([g.flatten() for g in grads.values()]).norm())


def test_bf16_mixed_precision_dtypes_and_clipping_to_max_grad_norm(tiny_bundle, tmp_path):
    step = step_gradients(tiny_bundle, tmp_path, 2, 1, 1, "--max-grad-norm", "0.01", clip=True)  # --bf16: default
    facts = step["dtypes"]
    assert facts["master"] == ["torch.float32"]  # sharded masters stay fp32
    assert facts["grad"] == ["torch.float32"]  # reduced gradients land in the master dtype
    assert facts["matmul_input"] == ["torch.bfloat16"]  # the matmuls run in bf16
    assert facts["reduce_scatter"] == ["torch.float32"]  # every rank's bf16 gradient summed in fp32 (seen)
    # (--reduce-dtype bf16: test_frozen_units_get_no_gradient_and_text_only_ranks_do_not_hang)
    # Clipped over both ranks' shards to exactly --max-grad-norm; the norm returned (logged) is the one before.
    assert step["grad_norm"] > 0.1
    assert global_norm(step["grads"]) == pytest.approx(0.01, rel=1e-4)


def test_fp32_run_has_fp32_matmuls_and_max_grad_norm_0_does_not_clip(tiny_bundle, tmp_path):
    step = step_gradients(tiny_bundle, tmp_path, 1, 1, 1, "--no-bf16", "--max-grad-norm", "0", clip=True)
    assert step["dtypes"]["matmul_input"] == ["torch.float32"]
    assert step["grad_norm"] > 0.1  # would have been clipped by any small --max-grad-norm
    assert global_norm(step["grads"]) == pytest.approx(step["grad_norm"], rel=1e-5)


def test_text_only_batch_on_one_rank_does_not_desync(tiny_bundle, tmp_path):
    # Every training step and every eval batch has one rank with an image and one without.
    data = image_and_text_rows(tiny_bundle, tmp_path)
    out = tmp_path / "run"
    # Started the way users start it, through the launcher script (which passes the flags to torchrun).
    launcher = os.path.join(REPO, "scripts", "train_shell.sh")
    flags = train_flags(tiny_bundle, out, "--train-data", str(data), "--eval-data", str(data), "--max-steps", "3",
                        "--eval-steps", "2", "--logging-steps", "1", "--per-device-train-batch-size", "1")
    check(subprocess.run(["sh", launcher, *flags], cwd=REPO, capture_output=True, text=True, timeout=180,
                         env={**env(), "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 3]


@pytest.mark.parametrize("bundle_name, flags, trains, facts", [
    ("qwen3_bundle", ["--freeze-vision-tower", "--sharding-strategy", "SHARD_GRAD_OP"],
     lambda unit: ".visual." not in f".{unit}." or "merger" in unit,
     {"sharding": {"strategy": "SHARD_GRAD_OP", "optimizer_groups": [2]}}),
    ("tiny_bundle", ["--lora-rank", "4", "--reduce-dtype", "bf16"], lambda unit: ".lora_" in unit,
     {"dtypes": {"reduce_scatter": ["torch.bfloat16"], "grad": ["torch.float32"]}}),
    ("qwen35_bundle", ["--freeze-vision-tower", "--sharding-strategy", "HYBRID_SHARD"],
     lambda unit: ".visual." not in f".{unit}." or "merger" in unit,
     {"sharding": {"strategy": "HYBRID_SHARD", "optimizer_groups": [2]}}),
], ids=["qwen3-vl, frozen vision tower, SHARD_GRAD_OP", "lora, --reduce-dtype bf16",
        "qwen3.5, frozen vision tower, HYBRID_SHARD"])
def test_frozen_units_get_no_gradient_and_text_only_ranks_do_not_hang(request, tmp_path, bundle_name, flags,
                                                                     trains, facts):
    """After a real step's backward (2 processes, flat parameters), exactly the trainable units hold a gradient:
    FSDP allocates and reduce-scatters none for a frozen unit. One row with an image and one without, one per
    rank: the text-only rank runs the frozen tower on the blank image, and the trainable merger's gradient
    there is zero, yet reduce-scattered with the other rank's. The frozen tower on Qwen3-VL, whose DeepStack
    mergers are units of their own here too: the blank image's DeepStack features must reach the loss, or that
    rank never reduces them (a hang); LoRA (on Qwen2.5-VL) freezes the whole visual part. The memory plan counts
    the same units, of the same sizes (its adapters nested in their layers), as FSDP made. Two flags ride along,
    observed: --sharding-strategy SHARD_GRAD_OP reaches FSDP and the optimizer; --reduce-dtype bf16 makes the
    gradients' reduce-scatters run in bf16 (they land in the fp32 masters)."""
    tiny_bundle = request.getfixturevalue(bundle_name)
    data = image_and_text_rows(tiny_bundle, tmp_path)
    step = step_gradients(tiny_bundle, tmp_path, 2, 1, 1, "--train-data", data, *flags, flat=True)
    assert sorted(step["images_per_rank"]) == [False, True]
    assert step["planned_units"] == step["wrapped_units"]  # the memory plan counts the units FSDP made
    for key, expected in facts.items():
        assert {fact: step[key][fact] for fact in expected} == expected
    units = step["unit_grads"]
    assert any(not trains(unit) for unit in units) and any(trains(unit) for unit in units)
    for unit, (requires_grad, has_grad) in units.items():
        assert requires_grad == has_grad == trains(unit.removeprefix("hf.")), unit


LR_WORKER = os.path.join(REPO, "tests", "lr_worker.py")


@pytest.mark.parametrize("optim, bundle_name", [("adafactor", "tiny_bundle"), ("adamw", "tiny_bundle"),
                                                ("adafactor", "qwen35_bundle")], ids=["adafactor", "adamw", "qwen3.5"])
def test_each_part_moves_by_its_own_learning_rate(request, tmp_path, optim, bundle_name):
    """One step of the FSDP model from a gradient of 0.5 everywhere (2 processes, flat shards; AdamW on original
    parameters, as it needs for per-part rates): every element of the vision tower moves by --vision-lr, of
    the merger by --merger-lr (its rule wins over the tower's), of the language model and lm_head by
    --learning-rate (on Qwen3.5 the DeltaNet layers' A_log and dt_bias too)."""
    tiny_bundle = request.getfixturevalue(bundle_name)
    out = tmp_path / "moved.pt"
    extra = ["--use-orig-params"] if optim == "adamw" else []
    check(forked_torchrun(2, [LR_WORKER, str(out), "--", *train_flags(
        tiny_bundle, tmp_path / "run", "--optim", optim, "--learning-rate", "1e-3", "--vision-lr", "2e-4",
        "--merger-lr", "5e-3", "--no-bf16", *extra)]))
    moved = torch.load(out)
    expected = {"model.visual.merger.": 5e-3, "model.visual.": 2e-4, "model.language_model.": 1e-3, "lm_head.": 1e-3}
    seen = set()
    for name, delta in moved.items():
        part = next(prefix for prefix in expected if name.startswith(prefix))
        seen.add(part)
        # atol: the fp32 rounding of a weight near 1 (a norm's) after the step, 6e-8 at most; rates differ by 2.5x+.
        torch.testing.assert_close(delta, torch.full_like(delta, expected[part]), rtol=0, atol=1e-7, msg=name)
    assert seen == set(expected) - ({"lm_head."} if "lm_head.weight" not in moved else set())


def test_memory_peaks_are_the_fullest_rank_s_and_reset_every_logging_window(tiny_bundle, tmp_path):
    """Rank 1 alone fills and frees 300 MiB in step 2: only step 2's record carries it, as both peaks."""
    out = tmp_path / "run"
    check(torchrun(2, [FAULTY_TRAIN, "--fault-touch-mib-at-step", "2:1:300", *train_flags(
        tiny_bundle, out, "--max-steps", "3", "--logging-steps", "1")], MALLOC_MMAP_THRESHOLD_="65536"))
    records = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    for kind in ("peak_allocated_gib", "peak_reserved_gib"):
        peaks = [records[step][kind] * 1024 for step in (1, 2, 3)]
        assert peaks[1] - peaks[2] > 250 and peaks[1] - peaks[0] > 200, (kind, peaks)
