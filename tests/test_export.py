"""Streamed export: the same HF folder as gathering the full state dict and calling save_pretrained, one shard
plus one unit of memory on rank 0, and `python -m ftloop.export` giving the same folder from a checkpoint."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from ftloop.config import parse_size
from ftloop.errors import ConfigError
from ftloop.export import main as export_main
from ftloop.fsdp.checkpoint import COMPLETE_MARKER
from launch import REPO, check, forked_python_m, forked_torchrun, python_m, train_flags

WORKER = os.path.join(REPO, "tests", "export_worker.py")
SHARD = "100KB"  # export_worker.SHARD: several shards for the tiny model
RUNS = {"untied-flat": (False, []), "tied-flat": (True, []), "tied-orig-params": (True, ["--use-orig-params"])}
WEIGHTS = ("model.safetensors.index.json",)


@pytest.fixture(scope="module")
def tied_model(tiny_bundle, tmp_path_factory):
    """The tiny bundle's model with input and output embeddings tied (as Qwen2.5-VL-3B has them)."""
    folder = tmp_path_factory.mktemp("tied_model")
    config = AutoConfig.from_pretrained(tiny_bundle["model_dir"])
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        shutil.copy(os.path.join(tiny_bundle["model_dir"], name), folder)
    return str(folder)


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tiny_bundle, tied_model, tmp_path_factory):
    """One export_worker run (2 processes, gloo): its output folder, whether the embeddings are tied, and the
    model folder it started from."""
    tied, flags = RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    model = tied_model if tied else tiny_bundle["model_dir"]
    check(forked_torchrun(2, [WORKER, str(out), "--", *train_flags(tiny_bundle, out / "run", "--model-name-or-path",
                                                                   model, *flags)]))
    return out, tied, model


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for key in f.keys():
                    assert key not in out, f"{key} is in two files"
                    out[key] = f.get_tensor(key)
    return out


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def assert_same_other_files(expected_dir, actual_dir) -> None:
    """Config, generation config, tokenizer, chat template, image processor: same files, same content."""
    def others(folder):
        return sorted(n for n in os.listdir(folder) if not n.endswith(".safetensors") and n not in WEIGHTS)
    assert others(actual_dir) == others(expected_dir)
    for name in others(expected_dir):
        if name.endswith(".json"):
            assert json.load(open(actual_dir / name)) == json.load(open(expected_dir / name)), name
        else:
            assert open(actual_dir / name).read() == open(expected_dir / name).read(), name


def assert_valid_index(folder, max_bytes: int) -> int:
    """The index names every tensor once, in the file that holds it; returns the number of shards."""
    index = json.load(open(folder / "model.safetensors.index.json"))
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for name in files:
        with safe_open(os.path.join(folder, name), "pt") as f:
            keys = list(f.keys())
            sizes = [f.get_tensor(k).nbytes for k in keys]
        assert sorted(k for k, v in index["weight_map"].items() if v == name) == sorted(keys)
        assert sum(sizes) <= max_bytes or len(keys) == 1, name  # only a tensor too big alone may pass the limit
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    return len(files)


@pytest.mark.parametrize("save_dtype", ["fp32", "bf16"])
def test_streamed_export_equals_the_full_state_dict_export(run, save_dtype):
    out, tied, source = run
    reference, streamed = out / f"reference-{save_dtype}", out / f"streamed-{save_dtype}"
    expected = tensors(reference)
    if tied:  # FSDP's full state dict holds lm_head as a copy, so save_pretrained saw no tie and wrote it too
        assert torch.equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert_same_tensors(expected, tensors(streamed))
    assert {t.dtype for t in expected.values()} == {torch.float32 if save_dtype == "fp32" else torch.bfloat16}
    # The names save_pretrained gives the model itself (a tied lm_head left out).
    assert sorted(tensors(source)) == sorted(expected) and ("lm_head.weight" in expected) is not tied
    assert_same_other_files(reference, streamed)
    assert json.load(open(streamed / "config.json"))["use_cache"] is True
    assert assert_valid_index(streamed, parse_size(SHARD)) > 2
    reference_index = json.load(open(reference / "model.safetensors.index.json"))
    streamed_index = json.load(open(streamed / "model.safetensors.index.json"))
    tied_bytes = expected["model.embed_tokens.weight"].nbytes if tied else 0
    assert streamed_index["metadata"]["total_size"] == reference_index["metadata"]["total_size"] - tied_bytes
    assert streamed_index["metadata"]["total_parameters"] == reference_index["metadata"]["total_parameters"]
    assert not [n for n in os.listdir(out) if ".tmp-" in n or ".old-" in n]


def test_streamed_export_loads_with_from_pretrained(run):
    out, tied, _ = run
    folder = out / "streamed-fp32"
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    written = tensors(folder)
    state = model.state_dict()
    assert torch.equal(state["model.language_model.embed_tokens.weight"], written["model.embed_tokens.weight"])
    assert torch.equal(state["lm_head.weight"],
                       written["model.embed_tokens.weight"] if tied else written["lm_head.weight"])
    assert torch.equal(state["model.visual.merger.mlp.0.weight"], written["visual.merger.mlp.0.weight"])


def test_one_shard_is_model_safetensors_without_index(run):
    out = run[0]
    names = os.listdir(out / "single")
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert sum(n.endswith(".safetensors") for n in names) == 1
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in tensors(out / "streamed-fp32").items()},
                        tensors(out / "single"))


@pytest.mark.parametrize("save_dtype", ["fp32", "bf16"])
def test_rank0_holds_at_most_one_shard_plus_one_unit(run, save_dtype):
    out = run[0]
    stats = json.load(open(out / f"stats-{save_dtype}.json"))
    written = tensors(out / f"streamed-{save_dtype}")
    max_bytes, largest_tensor = parse_size(SHARD), max(t.nbytes for t in written.values())
    assert stats["total_bytes"] == sum(t.nbytes for t in written.values())
    assert stats["peak_shard_bytes"] <= max(max_bytes, largest_tensor)  # one shard, or one tensor alone
    assert stats["peak_shard_bytes"] < stats["total_bytes"] / 2  # it never gathered the model


def test_cli_on_a_checkpoint_gives_the_live_export(run, tmp_path):
    out = run[0]
    checkpoint = out / "checkpoint"
    result = check(forked_python_m("ftloop.export", [str(checkpoint), str(tmp_path / "bf16"), "--max-shard-size",
                                                     SHARD]))
    assert f"exported {checkpoint} to {tmp_path / 'bf16'}" in result.stdout
    assert_same_tensors(tensors(out / "streamed-bf16"), tensors(tmp_path / "bf16"))  # bf16 is the default
    assert_same_other_files(out / "streamed-bf16", tmp_path / "bf16")
    assert assert_valid_index(tmp_path / "bf16", parse_size(SHARD)) > 2

    export_main([str(checkpoint), str(tmp_path / "fp32"), "--save-dtype", "fp32"])
    assert os.path.isfile(tmp_path / "fp32" / "model.safetensors")  # 5GB by default: one file
    assert_same_tensors(tensors(out / "streamed-fp32"), tensors(tmp_path / "fp32"))
    assert_same_other_files(out / "streamed-fp32", tmp_path / "fp32")


def error_line(capsys, argv) -> str:
    """The refusal `python -m ftloop.export` makes for argv: one line (ftloop.cli says it, exit 2)."""
    with pytest.raises(ConfigError) as refused:
        export_main(argv)
    assert "\n" not in str(refused.value)
    return str(refused.value)


@pytest.mark.parametrize("run", ["untied-flat"], indirect=True)
def test_cli_errors_are_one_line(run, tmp_path, capsys):
    good = run[0] / "checkpoint"
    out = str(tmp_path / "out")
    result = python_m("ftloop.export", [str(tmp_path / "missing"), out])  # as users run it
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"ftloop: error: {tmp_path / 'missing'}: not a folder; give a checkpoint-<step> folder"], result.stderr
    assert "not a folder" in error_line(capsys, [str(tmp_path / "missing"), out])
    (tmp_path / "empty").mkdir()
    assert "no torch.distributed.checkpoint metadata" in error_line(capsys, [str(tmp_path / "empty"), out])

    def broken(name, remove):
        copy = tmp_path / name
        shutil.copytree(good, copy)
        path = copy / remove
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return str(copy)

    assert "no .complete marker" in error_line(capsys, [broken("writing", COMPLETE_MARKER), out])
    assert "no .metadata" in error_line(capsys, [broken("no-metadata", ".metadata"), out])
    assert re.search(r": damaged: hf/\S+ is missing \(and \d+ more\); export an earlier checkpoint$",
                     error_line(capsys, [broken("no-hf", "hf"), out]))  # its SHA256SUMS lists them
    assert "would replace the checkpoint" in error_line(capsys, [str(good), str(good)])
    assert "would replace the checkpoint" in error_line(capsys, [str(good), str(run[0])])
    assert "--max-shard-size" in error_line(capsys, [str(good), out, "--max-shard-size", "lots"])
    assert not os.path.exists(out)


def test_a_host_copy_is_cast_where_the_tensor_is_and_never_aliases_it():
    """ftloop.export.host_copy: the values in the save dtype, contiguous, in memory of their own (on CPU the copy
    and the cast are the same thing; that the cast runs on the GPU before the copy, into pinned memory, only a GPU
    shows: scripts/gpu_smoke.py)."""
    from ftloop.export import host_copy

    master = torch.randn(6, 4).t()  # not contiguous
    saved = host_copy(master, torch.bfloat16)
    assert saved.dtype == torch.bfloat16 and saved.is_contiguous() and torch.equal(saved, master.to(torch.bfloat16))
    contiguous = torch.randn(4, 6)
    same = host_copy(contiguous, torch.float32)
    contiguous.zero_()
    assert same.abs().sum() > 0  # a copy, not a view of the master
