"""Settings that matter on CUDA, observed on the CPU: the attention implementation `auto` picks (the flash-attn
import and the GPU simulated), the refusals of flash-attention that cannot run, the allocator's expandable segments,
and --full-determinism reaching torch before training."""

import subprocess
import sys
import types

import pytest
import torch

import ftloop.config
from ftloop.config import Config, DataArgs, FSDPArgs, ModelArgs
from ftloop.errors import ConfigError

from launch import REPO, check, env, forked_python_m, train_flags


@pytest.fixture
def gpu(monkeypatch):
    """Pretend: a GPU is visible, and flash-attn imports (each switchable)."""
    state = {"cuda": True, "flash": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["cuda"])
    monkeypatch.setattr(ftloop.config, "flash_attention_imports", lambda: state["flash"])
    return state


def test_auto_takes_flash_attention_only_where_it_runs(gpu):
    auto = ModelArgs(attn_implementation="auto")
    assert auto.attention(bf16=True) == "flash_attention_2"
    assert auto.attention(bf16=False) == "sdpa"  # flash-attention has no fp32 kernels
    gpu["flash"] = False
    assert auto.attention(bf16=True) == "sdpa"
    gpu["flash"], gpu["cuda"] = True, False
    assert auto.attention(bf16=True) == "sdpa"
    assert ModelArgs().attn_implementation == "auto"


@pytest.mark.parametrize("flash, bf16, cuda, says", [
    (False, True, True, "pip install 'ftloop[flash]'"),
    (True, False, True, "drop --no-bf16"),
    (True, True, False, "NVIDIA GPUs only"),
])
def test_flash_attention_that_cannot_run_is_refused_in_one_line(tiny_bundle, gpu, flash, bf16, cuda, says):
    gpu.update(flash=flash, cuda=cuda)
    cfg = Config(model=ModelArgs(model_name_or_path=tiny_bundle["model_dir"], attn_implementation="flash_attention_2"),
                 data=DataArgs(train_data=tiny_bundle["train_json"]), fsdp=FSDPArgs(bf16=bf16))
    with pytest.raises(ConfigError, match="--attn-implementation flash_attention_2") as refused:
        cfg.check()
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_flash_attention_imports_is_whether_the_package_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # what Python does for a failed import: ImportError
    assert not ftloop.config.flash_attention_imports()
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert ftloop.config.flash_attention_imports()


ALLOCATOR = ("from ftloop.distributed import init_distributed; import os, torch.distributed as dist; "
             "init_distributed(); print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF')); dist.destroy_process_group()")


@pytest.mark.parametrize("given, expected", [
    ({}, "expandable_segments:True"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "max_split_size_mb:128"),
    ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:128"}, "None"),  # torch's newer name, the user's: left alone
])
def test_the_allocator_gets_expandable_segments_unless_the_user_chose(given, expected):
    environment = {k: v for k, v in env().items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
                                                               "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = check(subprocess.run([sys.executable, "-c", ALLOCATOR], env={**environment, **given}, cwd=REPO,
                                  capture_output=True, text=True, timeout=120))
    assert result.stdout.split()[-1] == expected


DETERMINISM = """
import os, sys, torch
import ftloop.train as train
def probe(cfg, world):
    print("PROBE", torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
          os.environ.get("FLASH_ATTENTION_DETERMINISTIC"), torch.backends.cudnn.deterministic)
train.run = probe
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("flag", [True, False])
def test_full_determinism_reaches_torch_before_the_run(tiny_bundle, tmp_path, flag):
    flags = train_flags(tiny_bundle, tmp_path / "out", *(["--full-determinism"] if flag else []))
    environment = {k: v for k, v in env().items() if k not in ("CUBLAS_WORKSPACE_CONFIG",
                                                               "FLASH_ATTENTION_DETERMINISTIC")}
    result = check(subprocess.run([sys.executable, "-c", DETERMINISM, *flags], env=environment, cwd=REPO,
                                  capture_output=True, text=True, timeout=120))
    probe = next(line for line in result.stdout.splitlines() if line.startswith("PROBE")).split()[1:]
    assert probe == (["True", ":4096:8", "1", "True"] if flag else ["False", "None", "None", "False"])


def test_a_deterministic_run_trains_on_the_cpu_and_says_its_attention(tiny_bundle, tmp_path):
    """Every op of a step has a deterministic implementation (torch raises where one has none)."""
    result = check(forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path / "out", "--max-steps", "2",
                                                               "--full-determinism", "--logging-steps", "1")))
    assert "attention sdpa" in result.stdout
