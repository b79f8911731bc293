"""Training only what is chosen: which tensors each freeze flag fixes, the FSDP units that keep frozen and
trainable tensors apart, and a 2-process run with frozen parts and a text-only rank that resumes exactly."""


import pytest
import torch
from safetensors.torch import load_file

from ftloop.config import ModelArgs
from ftloop.errors import ConfigError
from ftloop.model import build_meta_model, freeze_parts, load_config
from launch import check, checkpoint_state, forked_torchrun, image_and_text_rows, resume_a_copy, train_flags


def trainable(bundle, **flags) -> tuple[set[str], set]:
    args = ModelArgs(model_name_or_path=bundle["model_dir"], **flags)
    model = build_meta_model(load_config(args), args)
    own_units = freeze_parts(model, args)
    return {name for name, p in model.named_parameters() if p.requires_grad}, own_units


def parts(names: set[str]) -> set[str]:
    """Names cut to their part: patch_embed, blocks.N, merger, embed_tokens, layers.N, norm, lm_head."""
    out = set()
    for name in names:
        bits = name.split(".")
        at = next(i for i, b in enumerate(bits) if b in ("patch_embed", "blocks", "merger", "embed_tokens", "layers",
                                                         "norm", "lm_head"))
        out.add(".".join(bits[at:at + 2]) if bits[at] in ("blocks", "layers") else bits[at])
    return out


LLM = {"embed_tokens", "layers.0", "layers.1", "norm", "lm_head"}
VISION = {"patch_embed", "blocks.0", "blocks.1"}


@pytest.mark.parametrize("flags, trains", [
    ({}, VISION | {"merger"} | LLM),
    ({"freeze_vision_tower": True}, {"merger"} | LLM),
    ({"freeze_merger": True}, VISION | LLM),
    ({"freeze_llm": True}, VISION | {"merger"}),
    ({"freeze_vision_tower": True, "freeze_llm": True}, {"merger"}),
    ({"unfreeze_topk_llm": 1}, VISION | {"merger", "layers.1"}),
    ({"unfreeze_topk_vision": 1, "freeze_llm": True}, {"blocks.1", "merger"}),
    ({"unfreeze_topk_vision": 2, "unfreeze_topk_llm": 2, "freeze_merger": True}, {"blocks.0", "blocks.1", "layers.0",
                                                                                 "layers.1"}),
])
def test_each_freeze_flag_fixes_its_part(tiny_bundle, flags, trains):
    names, own_units = trainable(tiny_bundle, **flags)
    assert parts(names) == trains
    assert bool(own_units) == bool(flags)  # the usual units when nothing is frozen


def test_more_blocks_than_the_model_has_is_one_clear_error(tiny_bundle):
    with pytest.raises(ConfigError, match="--unfreeze-topk-llm 3: the model has 2; give at most that"):
        trainable(tiny_bundle, unfreeze_topk_llm=3)


# What --unfreeze-topk-llm 1 freezes of the 2-layer test model, in the exported names (model.layers.*) and the
# checkpoint's (model.language_model.layers.*).
TOP_LLM_LAYER_ONLY = ("embed_tokens.", "layers.0.", "model.norm.", "language_model.norm.", "lm_head.")


def test_a_frozen_merger_beside_a_trainable_patch_embedding_stays_put_and_resumes_exactly(tiny_bundle, tmp_path):
    """The frozen merger shares the root unit with the trainable patch embedding unless freezing gives them units
    of their own (FSDP1 refuses a unit of mixed requires_grad); with the top LLM layer alone training beside
    them, the frozen tensors come out as they went in, the checkpoint holds optimizer state for the trainable
    units alone, and its step 2 resumes bit for bit. Two rows, one with an image: on 2 processes one rank is
    text-only at every step. (Which units get gradients, with a frozen tower: tests/test_distributed.py.)"""
    flags, frozen = ["--freeze-merger", "--unfreeze-topk-llm", "1"], ("visual.merger.", *TOP_LLM_LAYER_ONLY)
    data = image_and_text_rows(tiny_bundle, tmp_path)
    run = ["--train-data", data, "--max-steps", "3", "--logging-steps", "1", "--per-device-train-batch-size",
           "1", "--learning-rate", "1e-2", "--no-bf16", "--save-dtype", "fp32", *flags]
    out = tmp_path / "run"
    check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(tiny_bundle, out, *run, "--save-steps", "2")],
                          timeout=180))
    start = load_file(f"{tiny_bundle['model_dir']}/model.safetensors")
    end = load_file(out / "final" / "model.safetensors")
    for name, tensor in start.items():
        assert torch.equal(end[name], tensor) == any(f in name for f in frozen), name
    optimizer = checkpoint_state(out / "checkpoint-2")["optimizer"]
    assert optimizer and not [k for k in optimizer if any(f in k for f in frozen)]  # no state for frozen parts
    assert any("language_model.layers" in k for k in optimizer)
    resumed = tmp_path / "resumed"
    resume_a_copy(tiny_bundle, out, resumed, run, step=2)
    again = load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(end[k], again[k]) for k in end)
