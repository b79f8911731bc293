"""The whole run, as users start it: train, evaluate, export, reload with plain transformers."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from ftloop.distributed import World
from ftloop.config import Config, DataArgs, TrainArgs
from ftloop.data.loaders import build_eval_loader
from ftloop.model import VisionLanguageSFT
from launch import FAULTY_TRAIN, REPO, check, forked_python_m, forked_torchrun, logged_losses, python_m, torchrun
from launch import train_flags
from launch import env as launch_env


def exported_dtypes(folder) -> set:
    dtypes = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


@pytest.fixture(scope="module")
def fp32_run(tiny_bundle, tmp_path_factory):
    """2 processes, fp32 compute and export, eval every 2 steps, the last step's weights exported."""
    out = tmp_path_factory.mktemp("fp32_run")
    result = torchrun(2, ["-m", "ftloop.train", *train_flags(
        tiny_bundle, out, "--eval-data", tiny_bundle["eval_json"], "--max-steps", "4", "--eval-steps", "2",
        "--logging-steps", "1", "--per-device-train-batch-size", "2", "--learning-rate", "1e-3",
        "--no-bf16", "--save-dtype", "fp32", "--no-load-best-model-at-end", "--eval-on-start",
        "--max-shard-size", "200KB", "--save-steps", "2")])
    check(result)
    return out, result


def test_metrics_record_every_logged_and_eval_step(fp32_run):
    out, result = fp32_run
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in train:
        assert {"lr", "grad_norm", "tokens_per_s", "step_time_s", "data_wait_s", "peak_allocated_gib",
                "peak_reserved_gib", "padding_ratio", "rank_tokens_max_over_mean"} <= r.keys()
        assert 0 <= r["data_wait_s"] < r["step_time_s"] and r["rank_tokens_max_over_mean"] >= 1
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns
    assert evals[-1]["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    assert "exported" in result.stdout
    # the long phases show a bar on rank 0 (the row check, the load, each evaluation, the export)
    bars = {line.split(":")[0] for line in result.stderr.replace("\r", "\n").splitlines()}
    assert {"checking train.json", "checking eval.json", "loading weights", "eval", "exporting"} <= bars, bars
    assert result.stderr.count("loading weights: 0tensor") == 1  # rank 0's alone


def test_sharded_checkpoint_written_by_every_rank(fp32_run):
    checkpoint = fp32_run[0] / "checkpoint-2"
    names = set(os.listdir(checkpoint))
    assert {"__0_0.distcp", "__1_0.distcp", "trainer_state.json", "run_config.json", ".metadata", ".complete",
            "rng", "hf"} <= names
    state = json.load(open(checkpoint / "trainer_state.json"))
    assert state["step"] == 2 and state["world_size"] == 2 and state["sampler"]["position"] == 8
    assert state["dtypes"] == {"parameters": ["float32"], "optimizer_state": ["float32"]}
    assert sorted(os.listdir(checkpoint / "rng")) == ["rank-0.pt", "rank-1.pt"]


def test_export_is_a_sharded_hf_folder(fp32_run):
    final = fp32_run[0] / "final"
    names = set(os.listdir(final))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json"} <= names
    assert "chat_template.jinja" in names or "chat_template.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1  # --max-shard-size 200KB split it
    assert exported_dtypes(final) == {"F32"}
    assert (fp32_run[0] / "best" / "config.json").is_file()
    assert not [n for n in os.listdir(fp32_run[0]) if n.endswith((".tmp", ".old"))]  # no half-written folders left


def eval_loss_of_the_export(folder, model_class, bundle, tmp_path) -> float:
    """The eval loss of an exported folder reloaded with plain transformers (fp32), over the bundle's eval rows."""
    model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    cfg = Config(data=DataArgs(eval_data=bundle["eval_json"], image_folder=bundle["image_folder"],
                               dataloader_num_workers=0), train=TrainArgs(output_dir=str(tmp_path)))
    loader = build_eval_loader(cfg, tokenizer, processor, model.config, World.single())
    scorer = VisionLanguageSFT(model)
    total = count = 0.0
    with torch.no_grad():
        for batch in loader:
            loss_sum, n = scorer(**batch)
            total, count = total + float(loss_sum), count + float(n)
    return total / count


def last_eval_loss(out) -> float:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in r][-1]["eval_loss"]


def test_export_reloads_with_transformers_and_gives_the_trained_loss(fp32_run, tiny_bundle, tmp_path):
    """The reloaded export reproduces the eval loss the FSDP model measured at the last step."""
    out, _ = fp32_run
    reloaded = eval_loss_of_the_export(out / "final", Qwen2_5_VLForConditionalGeneration, tiny_bundle, tmp_path)
    assert reloaded == pytest.approx(last_eval_loss(out), rel=1e-5)


def test_bf16_default_exports_bf16_and_loads_best_at_end(tiny_bundle, tmp_path):
    result = python_m("ftloop.train", train_flags(
        tiny_bundle, tmp_path, "--eval-data", tiny_bundle["eval_json"], "--max-steps", "3", "--eval-steps", "1",
        "--learning-rate", "0.5", "--per-device-train-batch-size", "2"))
    check(result)
    assert exported_dtypes(tmp_path / "final") == {"BF16"}
    assert json.load(open(tmp_path / "final" / "config.json")).get("dtype") in ("bfloat16", None)
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "eval_loss" in line]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert best["step"] != evals[-1]["step"]  # lr 0.5 makes later steps worse...
    assert f"loaded the best weights back (step {best['step']}" in result.stdout  # ...so the best comes back
    # `final` holds the best weights: its tensors equal `best`'s.
    with safe_open(os.path.join(tmp_path, "best", "model.safetensors"), "pt") as b, \
            safe_open(os.path.join(tmp_path, "final", "model.safetensors"), "pt") as f:
        assert all(torch.equal(b.get_tensor(k), f.get_tensor(k)) for k in b.keys())


def test_wandb_without_credentials_logs_offline_and_says_so(tiny_bundle, tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_MODE": None, "WANDB_API_KEY": None}
    result = python_m("ftloop.train", train_flags(tiny_bundle, tmp_path / "out", "--max-steps", "1",
                                                  "--report-to", "wandb", "--wandb-project-name", "ftloop-test"),
                      extra_env=env)
    check(result)
    assert result.stdout.count("wandb: no credentials found") == 1
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "out" / "wandb"))

    # A run that fails closes its wandb run too (with the exit code), though the process skips the
    # interpreter's exit hooks (ftloop.distributed.leave).
    result = subprocess.run([sys.executable, FAULTY_TRAIN, "--fault-raise-at-step", "2", *train_flags(
        tiny_bundle, tmp_path / "failed", "--max-steps", "3", "--logging-steps", "1", "--report-to", "wandb")],
        env={k: v for k, v in {**launch_env(), **env}.items() if v is not None}, cwd=REPO, capture_output=True,
        text=True, timeout=240)
    assert result.returncode == 1 and "RuntimeError: fault injected at step 2" in result.stderr
    assert "wandb: Run history:" in result.stdout + result.stderr, result.stderr[-3000:]


def test_qwen2_vl_trains_through_the_same_path(tiny_bundle, tmp_path):
    """Layer classes are found from the model, so a Qwen2-VL folder needs nothing special; its export, reloaded with
    plain transformers, gives the eval loss the run measured at its last step (an export under wrong names would
    load with fresh weights and only a warning)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    bundle_config = json.load(open(os.path.join(tiny_bundle["model_dir"], "config.json")))
    text = bundle_config["text_config"]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=text["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=text["bos_token_id"],
                         eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **{k: bundle_config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")})
    folder = tmp_path / "qwen2vl"
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        shutil.copy(os.path.join(tiny_bundle["model_dir"], name), folder)
    out = tmp_path / "out"
    check(forked_python_m("ftloop.train", train_flags(
        tiny_bundle, out, "--model-name-or-path", str(folder), "--eval-data", tiny_bundle["eval_json"],
        "--max-steps", "2", "--eval-steps", "2", "--per-device-train-batch-size", "2", "--no-bf16", "--save-dtype",
        "fp32", "--no-load-best-model-at-end", "--learning-rate", "1e-3")))
    assert json.load(open(out / "final" / "config.json"))["model_type"] == "qwen2_vl"
    reloaded = eval_loss_of_the_export(out / "final", Qwen2VLForConditionalGeneration, tiny_bundle, tmp_path)
    assert reloaded == pytest.approx(last_eval_loss(out), rel=1e-5)


@pytest.mark.parametrize("flags", [
    ["--sharding-strategy", "SHARD_GRAD_OP", "--optim", "adamw", "--param-dtype", "bf16", "--bf16-master-rounding",
     "nearest"],
    ["--sharding-strategy", "HYBRID_SHARD", "--use-orig-params", "--lr-scheduler-type", "cosine"],
    ["--vision-lr", "1e-4", "--merger-lr", "2e-4", "--weight-decay", "0.01"],
    ["--optim", "adamw", "--use-orig-params", "--vision-lr", "1e-4", "--weight-decay", "0.01"],
])
def test_other_fsdp_and_optimizer_options_train_and_export(tiny_bundle, tmp_path, flags):
    out = tmp_path / "run"
    common = ["--max-steps", "3", "--per-device-train-batch-size", "2", "--logging-steps", "1", *flags]
    check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(tiny_bundle, out, "--save-steps", "1", *common)]))
    records = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in records)
    assert exported_dtypes(out / "final") == {"BF16"}
    if "adamw" in flags:  # AdamW's moments come back from a checkpoint too: step 3 follows step 2's update of them
        resumed = tmp_path / "resumed"
        check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
            tiny_bundle, resumed, "--resume-from-checkpoint", str(out / "checkpoint-1"), *common)]))
        assert logged_losses(resumed)[3] == logged_losses(out)[3]
