"""Reading a checkpoint one tensor at a time: names matched through transformers' renaming (both key layouts),
missing and unexpected tensors refused in one line, buffers computed as from_pretrained computes them."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

from ftloop.distributed import World
from ftloop.errors import ConfigError
from ftloop.fsdp.load import UnitMaterializer
from ftloop.hf_folder import INDEX_FILE, SINGLE_FILE, FolderWeights
from launch import forked_torchrun, train_flags


def meta_model(folder, dtype=torch.float32):
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)


def materialize(folder, dtype=torch.float32):
    """The skeleton filled module by module, as FSDP's param_init_fn would (one process, no FSDP)."""
    model = meta_model(folder, dtype)
    fill = UnitMaterializer(model, FolderWeights(folder, model), World.single())
    for module in model.modules():
        fill(module)
    return model


def test_the_load_counts_every_tensor_it_reads_on_its_bar(tiny_bundle):
    """The load's progress bar (rank 0) advances once per tensor read: as many as the folder holds."""
    from safetensors import safe_open

    folder = tiny_bundle["model_dir"]
    model = meta_model(folder)
    fill = UnitMaterializer(model, FolderWeights(folder, model), World.single())
    for module in model.modules():
        fill(module)
    with safe_open(os.path.join(folder, SINGLE_FILE), "pt") as f:
        assert fill.progress.n == len(list(f.keys())) > 0
    fill.progress.close()

def copy_folder(src, dst, tensors: dict | None = None, filename=SINGLE_FILE):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    if tensors is not None:
        save_file(tensors, os.path.join(dst, filename), metadata={"format": "pt"})
    return dst


def test_every_tensor_and_buffer_equals_from_pretrained(tiny_bundle):
    folder = tiny_bundle["model_dir"]
    for dtype in (torch.float32, torch.bfloat16):
        ours = materialize(folder, dtype)
        theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        want = dict(theirs.named_parameters()) | dict(theirs.named_buffers())
        got = dict(ours.named_parameters()) | dict(ours.named_buffers())
        assert got.keys() == want.keys() and any("inv_freq" in k for k in got)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_both_key_layouts_and_a_sharded_index(tiny_bundle, tmp_path):
    """Hub checkpoints say model.layers.* / visual.*; transformers' own save may say model.language_model.*."""
    folder = tiny_bundle["model_dir"]
    saved = load_file(os.path.join(folder, SINGLE_FILE))
    assert any(k.startswith("model.layers.") for k in saved) and any(k.startswith("visual.") for k in saved)
    reference = materialize(folder).state_dict()
    in_model_names = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).state_dict())
    new_layout = copy_folder(folder, tmp_path / "new", in_model_names)
    for name, tensor in materialize(new_layout).state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    # Two files and an index, as sharded hub checkpoints come.
    sharded = copy_folder(folder, tmp_path / "sharded")
    keys = sorted(saved)
    halves = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for file, names in halves.items():
        save_file({k: saved[k] for k in names}, os.path.join(sharded, file), metadata={"format": "pt"})
    with open(os.path.join(sharded, INDEX_FILE), "w") as f:
        import json
        json.dump({"metadata": {}, "weight_map": {k: file for file, names in halves.items() for k in names}}, f)
    for name, tensor in materialize(sharded).state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_tied_embeddings_read_once_for_both_names(tiny_bundle, tmp_path):
    config = AutoConfig.from_pretrained(tiny_bundle["model_dir"])
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    folder = copy_folder(tiny_bundle["model_dir"], tmp_path / "tied")
    model.save_pretrained(folder)
    assert "lm_head.weight" not in load_file(os.path.join(folder, SINGLE_FILE))
    loaded = materialize(folder)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_missing_and_unexpected_tensors_are_one_clear_error(tiny_bundle, tmp_path):
    folder = tiny_bundle["model_dir"]
    saved = load_file(os.path.join(folder, SINGLE_FILE))
    dropped = "model.layers.1.mlp.down_proj.weight"
    missing = copy_folder(folder, tmp_path / "missing", {k: v for k, v in saved.items() if k != dropped})
    with pytest.raises(ConfigError, match=r"1 of the model's tensors are not in its safetensors files "
                                          r"\(model\.language_model\.layers\.1\.mlp\.down_proj\.weight\)"):
        FolderWeights(str(missing), meta_model(folder))
    extra = copy_folder(folder, tmp_path / "extra", {**saved, "model.layers.9.extra.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"1 tensors in the files belong to no parameter .*model\.layers\.9\.extra"):
        FolderWeights(str(extra), meta_model(folder))
    no_weights = copy_folder(folder, tmp_path / "none")
    with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
        FolderWeights(str(no_weights), meta_model(folder))
    # The run says it before anything else, rank 0 having read the headers for both ranks: one line, exit 2.
    result = forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
        tiny_bundle, tmp_path / "out", "--model-name-or-path", str(missing), "--max-steps", "1")], timeout=120)
    assert result.returncode != 0 and "[rank1]: Traceback" not in result.stderr  # no rank left waiting: no hang
    errors = [line for line in result.stderr.splitlines() if line.startswith("ftloop: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"ftloop: error: --model-name-or-path {missing}: 1 of")


def test_a_buffer_nobody_computes_is_an_error_not_garbage(tiny_bundle):
    model = meta_model(tiny_bundle["model_dir"])
    model.model.visual.register_buffer("mystery", torch.empty(3, device="meta"), persistent=False)
    fill = UnitMaterializer(model, FolderWeights(tiny_bundle["model_dir"], model), World.single())
    with pytest.raises(ValueError, match="model.visual.mystery: a buffer that is neither in the checkpoint"):
        for module in model.modules():
            fill(module)


def test_a_wrong_shape_or_a_truncated_file_is_found_from_the_headers(tiny_bundle, tmp_path):
    """On every rank, before any tensor is read (rank 0 alone finding it mid-load would leave the others
    waiting in a broadcast)."""
    folder = tiny_bundle["model_dir"]
    saved = load_file(os.path.join(folder, SINGLE_FILE))
    name = "model.norm.weight"
    bad = copy_folder(folder, tmp_path / "bad", {**saved, name: torch.ones(saved[name].numel() + 1)})
    with pytest.raises(ConfigError, match=r"1 tensors have another shape than config.json describes \(model\.norm"
                                          r"\.weight is \(65,\), the model's model\.language_model\.norm\.weight"):
        FolderWeights(str(bad), meta_model(folder))
    cut = copy_folder(folder, tmp_path / "cut")
    data = open(os.path.join(folder, SINGLE_FILE), "rb").read()
    open(os.path.join(cut, SINGLE_FILE), "wb").write(data[:-100])
    with pytest.raises(ConfigError, match="a truncated file"):
        FolderWeights(str(cut), meta_model(folder))
    open(os.path.join(cut, SINGLE_FILE), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        FolderWeights(str(cut), meta_model(folder))
