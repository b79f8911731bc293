"""Rank-0 loading: the weights every rank ends up with are exactly the checkpoint's, tied weights stay
tied, and ranks other than 0 never hold a full copy of the model."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from launch import REPO, check, torchrun, train_flags

WORKER = os.path.join(REPO, "tests", "load_worker.py")


@pytest.fixture(scope="module")
def larger_tied_model(tiny_bundle, tmp_path_factory):
    """~70M parameters (280 MB in fp32) with tied input/output embeddings, like Qwen2.5-VL-3B."""
    folder = tmp_path_factory.mktemp("larger_model")
    config = AutoConfig.from_pretrained(tiny_bundle["model_dir"])
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 512, 1536, 20
    text.num_attention_heads, text.num_key_value_heads = 8, 2
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # head_dim 64 -> 32 rotary pairs
    config.vision_config.out_hidden_size = 512
    config.tie_word_embeddings = text.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    for name in os.listdir(tiny_bundle["model_dir"]):
        if not name.endswith((".safetensors", ".json")) or name in ("tokenizer_config.json", "tokenizer.json",
                                                                       "preprocessor_config.json"):
            shutil.copy(os.path.join(tiny_bundle["model_dir"], name), folder)
    bytes_fp32 = sum(p.numel() for p in model.parameters()) * 4
    return folder, {k: v.clone() for k, v in model.state_dict().items()}, bytes_fp32


def test_every_rank_gets_rank0_weights_and_only_its_shard(larger_tied_model, tiny_bundle, tmp_path):
    folder, reference, model_bytes = larger_tied_model
    prefix = str(tmp_path / "load")
    flags = train_flags(tiny_bundle, tmp_path / "out", "--model-name-or-path", str(folder), "--max-steps", "1")
    # Large blocks straight from mmap, so that freed memory leaves the RSS and the peak measures live data.
    check(torchrun(4, [WORKER, prefix, "--", *flags], timeout=300, MALLOC_MMAP_THRESHOLD_="65536"))

    # Gathered from the four ranks' shards: exactly the checkpoint, tied lm_head included.
    state = torch.load(f"{prefix}.state.pt")
    assert set(reference) <= set(state)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], state["model.language_model.embed_tokens.weight"])

    growth = {}
    for rank in range(4):
        with open(f"{prefix}.rank{rank}.json") as f:
            r = json.load(f)
        growth[rank] = (r["peak_mib"] - r["before_mib"]) * 2**20
    assert growth[0] > 0.9 * model_bytes  # rank 0 did read the whole checkpoint
    for rank in (1, 2, 3):  # a quarter of the model, one unit in flight and the run's own objects; no copy
        assert growth[rank] < 0.5 * model_bytes, (rank, growth[rank] / model_bytes)
