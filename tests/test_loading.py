"""Loading: the weights every rank ends up with are exactly the checkpoint's (rank 0 reading and broadcasting,
or every rank reading), tied weights stay tied, no rank (rank 0 included) ever holds a full copy of the model,
and the memory plan's parameters + gradients + optimizer state are what a rank really holds."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from safetensors.torch import load_file

from scripts.support import widen

from launch import REPO, check, forked_python_m, forked_torchrun, torchrun, train_flags

WORKER = os.path.join(REPO, "tests", "load_worker.py")
MEMORY_WORKER = os.path.join(REPO, "tests", "memory_worker.py")
MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks straight from mmap: freed memory leaves the RSS


@pytest.fixture(scope="module")
def larger_tied_model(tiny_bundle, tmp_path_factory):
    """~70M parameters (280 MB in fp32) with tied input/output embeddings, like Qwen2.5-VL-3B."""
    folder = tmp_path_factory.mktemp("larger_model")
    config = widen(AutoConfig.from_pretrained(tiny_bundle["model_dir"]), 512, 20)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    for name in os.listdir(tiny_bundle["model_dir"]):
        if not name.endswith((".safetensors", ".json")) or name in ("tokenizer_config.json", "tokenizer.json",
                                                                       "preprocessor_config.json"):
            shutil.copy(os.path.join(tiny_bundle["model_dir"], name), folder)
    bytes_fp32 = sum(p.numel() for p in model.parameters()) * 4
    return folder, {k: v.clone() for k, v in model.state_dict().items()}, bytes_fp32


@pytest.mark.parametrize("reader, nproc", [("rank0", 3), ("every-rank", 2)])
def test_every_rank_gets_the_checkpoint_and_only_its_shard(larger_tied_model, tiny_bundle, tmp_path, reader, nproc):
    folder, reference, model_bytes = larger_tied_model
    prefix = str(tmp_path / "load")
    flags = train_flags(tiny_bundle, tmp_path / "out", "--model-name-or-path", str(folder), "--max-steps", "1",
                        "--load-weights-on", reader)
    check(torchrun(nproc, [WORKER, prefix, "--", *flags], timeout=300, **MMAP))

    # Gathered from the ranks' shards: exactly the checkpoint, tied lm_head included.
    state = torch.load(f"{prefix}.state.pt")
    assert set(reference) <= set(state)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], state["model.language_model.embed_tokens.weight"])

    growth = {}
    for rank in range(nproc):
        with open(f"{prefix}.rank{rank}.json") as f:
            r = json.load(f)
        growth[rank] = (r["peak_mib"] - r["before_mib"]) * 2**20
    for rank in range(nproc):  # its share of the model, one unit in flight and the run's own objects; no copy
        assert growth[rank] < 1 / nproc * model_bytes + 0.25 * model_bytes, (rank, growth[rank] / model_bytes)


def test_weights_cross_as_stored_and_are_cast_on_the_device(tiny_bundle, tmp_path):
    """A bf16 folder into fp32 masters: rank 0 broadcasts the stored bf16 (2 bytes a value, not the 4 of an fp32
    copy cast on its host), and every rank holds the values cast exactly."""
    folder = tmp_path / "bf16"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_bundle["model_dir"]).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in os.listdir(tiny_bundle["model_dir"]):
        if not name.endswith(".safetensors") and name not in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tiny_bundle["model_dir"], name), folder)
    prefix = str(tmp_path / "load")
    flags = train_flags(tiny_bundle, tmp_path / "out", "--model-name-or-path", str(folder), "--max-steps", "1",
                        "--param-dtype", "fp32")
    check(forked_torchrun(2, [WORKER, prefix, "--", *flags], timeout=300))
    stored = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    with open(f"{prefix}.rank1.json") as f:
        received = json.load(f)["broadcast_bytes"]
    assert stored <= received <= stored * 1.01, (received, stored)  # the values, plus a few small objects
    state = torch.load(f"{prefix}.state.pt")
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor.float()), name


def wide_folder(tiny_bundle, folder, layers: int) -> int:
    """A random Qwen2.5-VL of width 1024 and `layers` decoder layers (one layer: 11.8M parameters, 47 MB in
    fp32), saved in bf16 as hub checkpoints are; returns its parameter count."""
    config = widen(AutoConfig.from_pretrained(tiny_bundle["model_dir"]), 1024, layers)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200MB")
    for name in os.listdir(tiny_bundle["model_dir"]):
        if not name.endswith(".safetensors") and name not in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tiny_bundle["model_dir"], name), folder)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def memory_by_size(tiny_bundle, tmp_path_factory):
    """Per-rank memory records of a 2-process load and step, for models of 6 and 20 layers of one width."""
    out = tmp_path_factory.mktemp("memory")
    records = {}
    for layers in (6, 20):
        folder = out / f"model-{layers}"
        params = wide_folder(tiny_bundle, folder, layers)
        flags = train_flags(tiny_bundle, out / f"run-{layers}", "--model-name-or-path", str(folder), "--max-steps",
                            "1", "--no-bf16", "--max-seq-length", "128")
        check(torchrun(2, [MEMORY_WORKER, str(out / f"m{layers}"), "--", *flags], timeout=300, **MMAP))
        records[layers] = (params, [json.load(open(out / f"m{layers}.rank{r}.json")) for r in range(2)])
        shutil.rmtree(folder)
    return records


def test_rank0_load_memory_does_not_grow_with_the_model(memory_by_size):
    (small, small_ranks), (large, large_ranks) = memory_by_size[6], memory_by_size[20]
    assert large > 3 * small
    # What loading adds on rank 0 beyond its own shard (half the fp32 model at 2 ranks): about one unit.
    extra = {n: ranks[0]["load_peak_mib"] * 2**20 - n * 4 / 2 for n, ranks in ((small, small_ranks),
                                                                             (large, large_ranks))}
    assert abs(extra[large] - extra[small]) < 0.1 * large * 4, extra


def test_a_save_and_a_resume_make_the_same_collectives_at_any_depth(memory_by_size):
    """A checkpoint's shards are written and read as they lie (no unit gathered, nothing per parameter sent): the
    collectives of one save and of one resume do not grow with the model's depth."""
    (_, small_ranks), (_, large_ranks) = memory_by_size[6], memory_by_size[20]
    for kind in ("save_collectives", "load_collectives"):
        for rank in range(2):
            few, many = small_ranks[rank]["checkpoint"][kind], large_ranks[rank]["checkpoint"][kind]
            assert few == many, (kind, rank, few, many)
            assert sum(many.values()) <= 10, (kind, many)


def test_a_save_and_a_resume_hold_at_most_one_unit_more(memory_by_size):
    """Nothing is unsharded or cloned for the whole shard: a save or a resume adds at most about one FSDP unit to a
    rank's memory (on a GPU, to its device memory too: the same code reads and writes the same views)."""
    for params, ranks in memory_by_size.values():
        for record in ranks:
            c = record["checkpoint"]
            for kind in ("save_peak_mib", "load_peak_mib"):
                assert c[kind] < c["largest_unit_mib"] + 16, (params, kind, c)


def test_plan_persistent_memory_agrees_with_what_a_rank_holds(memory_by_size):
    for params, ranks in memory_by_size.values():
        for record in ranks:  # sharded fp32 parameters + fp32 gradients + Adafactor's state
            assert record["after_step_mib"] == pytest.approx(record["plan_persistent_mib"], rel=0.15), (params, record)


def test_an_improving_eval_adds_no_copy_of_the_model(larger_tied_model, tiny_bundle, tmp_path):
    """The best weights stay on disk (`best`, streamed out one unit at a time); memory is not a second model."""
    folder, _, model_bytes = larger_tied_model
    out = tmp_path / "run"
    check(forked_python_m("ftloop.train", train_flags(
        tiny_bundle, out, "--model-name-or-path", str(folder), "--eval-data", tiny_bundle["eval_json"], "--no-bf16",
        "--max-steps", "3", "--eval-steps", "1", "--logging-steps", "1", "--learning-rate", "1e-4",
        "--max-shard-size", "20MB", "--per-device-eval-batch-size", "4"), timeout=300, extra_env=MMAP))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    peak = {r["step"]: r["peak_allocated_gib"] * 2**30 for r in records if "peak_allocated_gib" in r}
    improved = [r["step"] for r in records if "eval_loss" in r and r["best_step"] == r["step"]]
    assert improved and improved[0] == 1  # logged at step 1 before its eval; every later peak includes it
    print("GROWTH", (peak[3] - peak[1]) / model_bytes)
    # a second copy of the model would add 1.0 x its bytes; the host allocator's noise in the peak RSS measured
    # here was -0.61 to 0.28 x in six runs (the 0.25 this test first allowed failed one full-suite run)
    assert peak[3] - peak[1] < 0.5 * model_bytes, (peak, model_bytes)


def test_best_weights_of_step_0_come_back_from_the_model_folder(tiny_bundle, tmp_path):
    out = tmp_path / "run"
    # Two processes: rank 0 reads each unit's tensors and broadcasts them, every rank writes back its shard.
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
        tiny_bundle, out, "--eval-data", tiny_bundle["eval_json"], "--eval-on-start", "--max-steps", "2",
        "--eval-steps", "1", "--learning-rate", "1.0", "--per-device-train-batch-size", "2")]))
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "eval_loss" in line]
    assert evals[-1]["best_step"] == 0 and "loaded the best weights back (step 0" in result.stdout
    source = load_file(os.path.join(tiny_bundle["model_dir"], "model.safetensors"))
    final = load_file(os.path.join(out, "final", "model.safetensors"))
    assert final.keys() == source.keys()
    for name, tensor in source.items():  # the untrained weights, in --save-dtype (bf16)
        assert torch.equal(final[name], tensor.to(torch.bfloat16)), name
