"""A broken model folder is refused in one line before anything loads (issue 22, item 4): missing tokenizer files or
preprocessor_config.json, config.json's special token ids that are not the tokenizer's, an image processor whose
patch / merge / temporal sizes are not the vision config's, a config.json transformers rejects, NaN or inf in the
weights (on every rank arrangement, every rank stopping); a resume with another tokenizer or image processor is
refused; and a run stopped by non-finite steps never names a checkpoint whose steps were all skipped."""

import copy
import json
import os
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2VLConfig

from ftloop.data.check_cache import tokenizer_fingerprint
from ftloop.data.media import load_image_processor
from ftloop.demo.models import build_config, build_image_processor
from ftloop.distributed import World
from ftloop.errors import ConfigError, TrainingError
from ftloop.fsdp.checkpoint import COMPLETE_MARKER, TRAINER_STATE
from ftloop.fsdp.load import nonfinite_count
from ftloop.data.model_folder import (CONFIG_TOKENS, INPUTS, PROCESSOR_SIZES, check_model_folder, check_same_inputs,
                                 input_fingerprints, load_processing, read_config, read_model_folder)
from ftloop.policies import Saver, last_good_checkpoint, skip_nonfinite_step
from ftloop.data.check import main as check_main
from ftloop.train import main as train_main
from launch import REPO, forked_torchrun, train_flags
from test_folder_weights import materialize

NONFINITE_WORKER = os.path.join(REPO, "tests", "nonfinite_worker.py")


def copy_model(bundle, dst, *without: str) -> str:
    shutil.copytree(bundle["model_dir"], dst)
    for name in without:
        os.remove(os.path.join(dst, name))
    return str(dst)


def edit_json(path, change) -> None:
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f)


def refused(match: str, check, *args) -> str:
    with pytest.raises(ConfigError, match=match) as raised:
        check(*args)
    line = str(raised.value)
    assert "\n" not in line
    return line


@pytest.fixture(scope="module")
def families(tiny_bundle, tokenizer, image_processor):
    """(name, config, image processor) of each family, sound, over the tiny bundle's tokenizer: its folder's own
    Qwen2.5-VL, and the demo's Qwen3-VL and a Qwen2-VL config built in process (no folder needed: the check takes the
    loaded objects)."""
    qwen3 = build_config(tokenizer, "test", "qwen3-vl")
    qwen2 = build_config(tokenizer, "test").to_dict()
    qwen2 = Qwen2VLConfig(text_config=qwen2["text_config"], vision_config={"patch_size": 14, "spatial_merge_size": 2,
                                                                          "temporal_patch_size": 2},
                          **{field: qwen2[field] for field in CONFIG_TOKENS})
    return [("qwen2_5_vl", read_config(tiny_bundle["model_dir"]), image_processor),
            ("qwen3_vl", qwen3, build_image_processor(family="qwen3-vl")),
            ("qwen2_vl", qwen2, image_processor)]


def test_a_sound_folder_of_each_family_passes(tiny_bundle, tokenizer, families):
    config, loaded_tokenizer, processor = read_model_folder(tiny_bundle["model_dir"])
    assert config.model_type == "qwen2_5_vl" and len(loaded_tokenizer) == len(tokenizer) and processor.patch_size == 14
    for family, config, processor in families:
        assert config.model_type == family
        check_model_folder("folder", config, tokenizer, processor)


def test_missing_tokenizer_files_and_preprocessor_config_are_one_line(tiny_bundle, tmp_path, families):
    no_tokenizer = copy_model(tiny_bundle, tmp_path / "no-tokenizer", "tokenizer.json", "tokenizer_config.json")
    line = refused("no tokenizer files", load_processing, no_tokenizer)
    assert line.startswith(f"--model-name-or-path {no_tokenizer}: ") and "tokenizer.json" in line
    # What transformers builds from such a folder (or a hub id without them): one token, and the check says so.
    empty = AutoTokenizer.from_pretrained(no_tokenizer)
    assert len(empty) == 1
    _, config, processor = families[0]
    line = refused("image_token_id is 510, which is no token of its tokenizer", check_model_folder, no_tokenizer,
                   config, empty, processor)
    assert "(no tokenizer file: 1 tokens; it has no <|image_pad|>)" in line

    no_processor = copy_model(tiny_bundle, tmp_path / "no-processor", "preprocessor_config.json")
    line = refused("no preprocessor_config.json", load_processing, no_processor)
    assert line.startswith(f"--model-name-or-path {no_processor}: ")

    broken = copy_model(tiny_bundle, tmp_path / "broken-processor")
    with open(os.path.join(broken, "preprocessor_config.json"), "w") as f:
        f.write("{not json")
    refused("cannot load its tokenizer and image processor", load_processing, broken)


def test_config_token_ids_must_be_the_tokenizers_in_every_family(tokenizer, families):
    other = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    for family, config, processor in families:
        for field, token in CONFIG_TOKENS.items():
            wrong = copy.deepcopy(config)
            setattr(wrong, field, other)
            line = refused(f"config.json's {field} is {other}, which its tokenizer", check_model_folder, "folder",
                           wrong, tokenizer, processor)
            own = tokenizer.convert_tokens_to_ids(token)
            assert f"reads as <|vision_pad|>, not {token} (its {token} is id {own})" in line, (family, line)
            setattr(wrong, field, 100_000)
            refused(f"{field} is 100000, which is no token of its tokenizer", check_model_folder, "folder", wrong,
                    tokenizer, processor)


def test_a_tokenizer_with_the_vision_ids_swapped_is_refused(tiny_bundle, tmp_path, families):
    folder = copy_model(tiny_bundle, tmp_path / "swapped")

    def swap(content):
        vocab = content["model"]["vocab"]
        vocab["<|image_pad|>"], vocab["<|video_pad|>"] = vocab["<|video_pad|>"], vocab["<|image_pad|>"]
        for added in content["added_tokens"]:
            added["id"] = vocab.get(added["content"], added["id"])

    edit_json(os.path.join(folder, "tokenizer.json"), swap)
    swapped = AutoTokenizer.from_pretrained(folder)
    _, config, processor = families[0]
    line = refused("image_token_id is 510, which its tokenizer", check_model_folder, folder, config, swapped,
                   processor)
    assert "(tokenizer.json) reads as <|video_pad|>, not <|image_pad|> (its <|image_pad|> is id 511)" in line


def test_chat_tokens_and_the_embedding_size(tokenizer, families):
    _, config, processor = families[0]
    small = copy.deepcopy(config)
    small.text_config.vocab_size = len(tokenizer) - 64
    refused(f"has {len(tokenizer)} tokens, more than config.json's vocab_size {len(tokenizer) - 64}",
            check_model_folder, "folder", small, tokenizer, processor)
    # A config that names no special token (none of the three families'): the tokens are checked alone.
    no_fields = types.SimpleNamespace(vision_config=config.vision_config, get_text_config=config.get_text_config)
    check_model_folder("folder", no_fields, tokenizer, processor)
    renamed = copy.deepcopy(tokenizer)
    renamed.convert_tokens_to_ids = lambda token: None if token == "<|im_start|>" else \
        tokenizer.convert_tokens_to_ids(token)
    refused("has no <|im_start|> token", check_model_folder, "folder", no_fields, renamed, processor)


def test_processor_sizes_must_be_the_vision_configs(families, tokenizer):
    for family, config, processor in families:
        for attribute, field in PROCESSOR_SIZES:
            wrong = copy.deepcopy(processor)
            have = getattr(processor, attribute)
            setattr(wrong, attribute, have + 2)
            line = refused(f"preprocessor_config.json's {attribute} is {have + 2}, config.json's vision_config.{field} "
                           f"{have}:", check_model_folder, "folder", config, tokenizer, wrong)
            assert line.startswith("--model-name-or-path folder: "), (family, line)


def test_config_fields_transformers_rejects_are_one_line(tiny_bundle, tmp_path):
    one_layer = copy_model(tiny_bundle, tmp_path / "one-layer")
    edit_json(os.path.join(one_layer, "config.json"), lambda c: c["text_config"].update(num_hidden_layers=1))
    line = refused("transformers rejects its config.json", read_config, one_layer)
    assert "`num_hidden_layers` (1) must be equal to the number of `layer_types` (2)" in line
    typed = copy_model(tiny_bundle, tmp_path / "typed")
    edit_json(os.path.join(typed, "config.json"), lambda c: c["vision_config"].update(patch_size="14"))
    refused("transformers rejects its config.json .*patch_size", read_config, typed)


def test_training_and_the_data_check_refuse_a_broken_folder_before_any_row(tiny_bundle, tmp_path, monkeypatch):
    """The wiring: ftloop.train (its prepare, in this process as one rank) and `python -m ftloop.data.check` run the
    check right after loading the tokenizer and image processor, before a row is read."""
    folder = copy_model(tiny_bundle, tmp_path / "other-patches")
    edit_json(os.path.join(folder, "preprocessor_config.json"), lambda c: c.update(patch_size=16))
    said = "preprocessor_config.json's patch_size is 16, config.json's vision_config.patch_size 14"
    monkeypatch.setattr("ftloop.train.init_distributed", lambda *_: World.single())
    monkeypatch.setattr("ftloop.train.StopRequest", lambda: None)  # no signal handlers in the test process
    monkeypatch.setattr("ftloop.train.build_loaders", lambda *_: pytest.fail("rows read before the folder's check"))
    refused(said, train_main, train_flags(tiny_bundle, tmp_path / "out", "--model-name-or-path", folder))
    monkeypatch.setattr("ftloop.data.check.report", lambda *_, **__: pytest.fail("rows read before the folder's check"))
    refused(said, check_main, ["--model-name-or-path", folder, "--train-data", tiny_bundle["train_json"],
                               "--image-folder", tiny_bundle["image_folder"], "--workers", "1"])
    no_processor = copy_model(tiny_bundle, tmp_path / "no-processor", "preprocessor_config.json")
    refused("no preprocessor_config.json", train_main, train_flags(tiny_bundle, tmp_path / "out2",
                                                                  "--model-name-or-path", no_processor))


# ---- the inputs a checkpoint was trained with ------------------------------------------------------------------


def test_resume_refuses_another_tokenizer_or_image_processor(tiny_bundle, tmp_path, tokenizer, image_processor):
    saved = json.loads(json.dumps({"step": 4, INPUTS: input_fingerprints(tokenizer, image_processor)}))
    moved = copy_model(tiny_bundle, tmp_path / "moved")  # the same files elsewhere; other pixel limits (flags)
    check_same_inputs("ckpt", saved, AutoTokenizer.from_pretrained(moved), load_image_processor(moved,
                                                                                               max_pixels=4 * 3136))
    check_same_inputs("ckpt", {"step": 4}, tokenizer, build_image_processor(family="qwen3-vl"))  # an older checkpoint

    folder = copy_model(tiny_bundle, tmp_path / "two-ids-swapped")  # same size, same config, same special tokens

    def swap(content):
        vocab = content["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]

    edit_json(os.path.join(folder, "tokenizer.json"), swap)
    line = refused(r"--resume-from-checkpoint ckpt: it was saved with another tokenizer \(512 tokens, vocabulary "
                   r"sha256 \w{12} then; 512 tokens, vocabulary sha256 \w{12} now\); resume with the model folder it "
                   "was trained with", check_same_inputs, "ckpt", saved, AutoTokenizer.from_pretrained(folder),
                   image_processor)
    assert line.endswith("trained with")
    other = copy.deepcopy(image_processor)
    other.image_mean = [0.5, 0.5, 0.5]
    refused(r"another image processor \(image_mean \[0.48145466, 0.4578275, 0.40821073\] then, \[0.5, 0.5, 0.5\] "
            r"now\); resume with", check_same_inputs, "ckpt", saved, tokenizer, other)


def test_a_tokenizer_is_the_same_before_and_after_use(tiny_bundle, tmp_path):
    """A tokenizer.json saved with padding and truncation on: its first call turns them off in the tokenizer, which
    must not make it another tokenizer (for the resume's check and the row check's cache)."""
    folder = copy_model(tiny_bundle, tmp_path / "padded")
    edit_json(os.path.join(folder, "tokenizer.json"), lambda c: c.update(
        padding={"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                 "pad_type_id": 0, "pad_token": "<|endoftext|>"},
        truncation={"direction": "Right", "max_length": 100, "strategy": "LongestFirst", "stride": 0}))
    padded = AutoTokenizer.from_pretrained(folder)
    before = tokenizer_fingerprint(padded)
    padded("some text", add_special_tokens=False, return_offsets_mapping=True)
    assert tokenizer_fingerprint(padded) == before


def test_every_checkpoint_records_the_inputs(tmp_path, monkeypatch, tokenizer, image_processor):
    written = {}
    monkeypatch.setattr("ftloop.policies.save_checkpoint",
                        lambda model, optimizer, path, state, *rest: written.update({path: state}))
    state = types.SimpleNamespace(step=3, best=types.SimpleNamespace(step=None), state_dict=lambda: {"step": 3})
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(output_dir=str(tmp_path), save_grace_s=60.0,
                                                            save_total_limit=0), to_dict=lambda: {})
    logger = types.SimpleNamespace(log=lambda *args: None)
    inputs = input_fingerprints(tokenizer, image_processor)
    Saver(None, None, state, cfg, logger, None, World.single(), resumed=False, inputs=inputs).save()
    assert written == {str(tmp_path / "checkpoint-3"): {"step": 3, INPUTS: inputs}}


# ---- weights ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_folder(tiny_bundle, tmp_path_factory):
    """The tiny bundle with one NaN and one inf in a row of the embedding (the issue's unused row)."""
    folder = copy_model(tiny_bundle, tmp_path_factory.mktemp("nan") / "model")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    key = next(k for k in tensors if "embed_tokens" in k)
    tensors[key][-1, :2] = torch.tensor([float("nan"), float("inf")])
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder, key


def test_nonfinite_count():
    assert nonfinite_count(torch.randn(5, 3)) == 0 and nonfinite_count(torch.arange(4)) == 0
    assert nonfinite_count(torch.full((4,), 3e38)) == 0  # finite, though its sum is not
    values = torch.randn(10).to(torch.bfloat16)
    values[[1, 4, 7]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.bfloat16)
    assert nonfinite_count(values) == 3


def test_nan_in_the_weights_is_one_line_naming_tensor_and_file(nan_folder):
    folder, key = nan_folder
    for dtype in (torch.float32, torch.bfloat16):
        line = refused(f"--model-name-or-path {folder}: tensor {key} in model.safetensors holds 2 NaN/inf values; ",
                       materialize, folder, dtype)
        assert "download or export them again" in line


def test_nan_in_the_weights_stops_every_rank_whoever_reads(tiny_bundle, nan_folder, tmp_path):
    folder, key = nan_folder
    prefix = str(tmp_path / "nonfinite")
    result = forked_torchrun(2, [NONFINITE_WORKER, tiny_bundle["model_dir"], folder, prefix], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    line = f"--model-name-or-path {folder}: tensor {key} in model.safetensors holds 2 NaN/inf values; "
    for rank in range(2):
        with open(f"{prefix}.rank{rank}.json") as f:
            found = json.load(f)
        assert found["rank0"].startswith(line) and found["one_copy"].startswith(line), (rank, found)
        assert found["restore"].startswith(f"--model-name-or-path {folder}: tensor {key} in model.safetensors "
                                           "holds 2 NaN/inf values"), (rank, found)


# ---- the last good checkpoint ----------------------------------------------------------------------------------


def fake_checkpoints(output_dir, bad_steps: dict[int, int]) -> None:
    """checkpoint-<step> folders, complete, whose trainer_state.json holds step and bad_steps_in_a_row."""
    for step, bad in bad_steps.items():
        path = output_dir / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / TRAINER_STATE).write_text(json.dumps({"step": step, "bad_steps_in_a_row": bad}))
        (path / COMPLETE_MARKER).write_text(f"{step}\n")


def stop_after(output_dir, step: int, bad: int) -> str:
    state = types.SimpleNamespace(step=step, bad_steps_in_a_row=bad)
    args = types.SimpleNamespace(max_bad_steps=bad, output_dir=str(output_dir))
    with pytest.raises(TrainingError) as raised:
        skip_nonfinite_step(state, float("nan"), types.SimpleNamespace(log=lambda *a: None), args)
    return str(raised.value)


def test_the_last_good_checkpoint_was_saved_after_an_applied_update(tmp_path):
    # Steps 3, 5 and 6 skipped, a checkpoint after every step: checkpoint-5 holds step 4's weights, from which
    # steps 5 and 6 went wrong (its only step was skipped); checkpoint-4 was saved right after an applied update.
    run = tmp_path / "run"
    fake_checkpoints(run, {1: 0, 2: 0, 3: 1, 4: 0, 5: 1})
    assert last_good_checkpoint(str(run)) == str(run / "checkpoint-4")
    assert f"the last good checkpoint is {run}/checkpoint-4;" in stop_after(run, 6, 2)
    # Every step skipped (NaN in the weights): checkpoint-4 holds the weights the run started from.
    skipped = tmp_path / "skipped"
    fake_checkpoints(skipped, {4: 4})
    assert last_good_checkpoint(str(skipped)) is None
    assert "the last good checkpoint is none (none was saved right after an applied update" in stop_after(skipped, 5, 5)
    # Saved every 3 steps, steps 6 to 8 skipped: checkpoint-6 (steps 4 and 5 applied, 6 not) holds step 5's weights.
    every_three = tmp_path / "every-three"
    fake_checkpoints(every_three, {3: 0, 6: 1})
    assert last_good_checkpoint(str(every_three)) == str(every_three / "checkpoint-3")
    # One whose trainer_state.json cannot be read is passed over; an incomplete one is never named.
    (every_three / "checkpoint-3" / TRAINER_STATE).write_text("{")
    assert last_good_checkpoint(str(every_three)) is None
    fake_checkpoints(every_three, {9: 0})
    (every_three / "checkpoint-9" / COMPLETE_MARKER).unlink()
    assert last_good_checkpoint(str(every_three)) is None
