"""Shared pytest fixtures."""

import pytest
from transformers import AutoImageProcessor, AutoTokenizer

from ftloop.demo.bundle import build_demo_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A `model_size="test"` demo bundle (tiny random Qwen2.5-VL + toy shapes data), built once per session.

    Returns build_demo_bundle's dict: model_dir, image_folder, train_json, eval_json. Treat it as read-only:
    it is shared by every test in the session.
    """
    out = tmp_path_factory.mktemp("tiny_bundle")
    return build_demo_bundle(out, num_train=16, num_eval=8, image_size=56, seed=0, model_size="test")


@pytest.fixture(scope="session")
def qwen3_bundle(tmp_path_factory):
    """The same bundle with a tiny random Qwen3-VL (DeepStack, 16-pixel patches, interleaved mRoPE)."""
    out = tmp_path_factory.mktemp("qwen3_bundle")
    return build_demo_bundle(out, num_train=16, num_eval=8, image_size=56, seed=0, model_size="test",
                             family="qwen3-vl")


@pytest.fixture(scope="session")
def qwen35_bundle(tmp_path_factory):
    """The same bundle with a tiny random Qwen3.5 (a Gated DeltaNet layer and a full-attention one; Qwen3-VL's tower
    without DeepStack)."""
    out = tmp_path_factory.mktemp("qwen35_bundle")
    return build_demo_bundle(out, num_train=16, num_eval=8, image_size=56, seed=0, model_size="test",
                             family="qwen3.5")


@pytest.fixture(scope="session")
def tokenizer(tiny_bundle):
    """The tiny bundle's tokenizer (Qwen's special tokens, the official chat template)."""
    return AutoTokenizer.from_pretrained(tiny_bundle["model_dir"])


@pytest.fixture(scope="session")
def image_processor(tiny_bundle):
    """The tiny bundle's Qwen2-VL image processor."""
    return AutoImageProcessor.from_pretrained(tiny_bundle["model_dir"])
