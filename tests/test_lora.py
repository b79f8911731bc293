"""LoRA through peft: which tensors get adapters, their first values, the merge arithmetic, and 2-process runs
whose exports `PeftModel.from_pretrained` loads, whose merged export gives the adapted model's logits, and whose
checkpoints resume bit for bit."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText

from ftloop.config import LoraArgs, ModelArgs
from ftloop.errors import ConfigError
from ftloop.export import export_checkpoint
from ftloop.fsdp.checkpoint import check_resumable, read_trainer_state
from ftloop.lora import add_adapters, initial_adapter, merged
from ftloop.fsdp.internals import clean_name
from ftloop.model import build_meta_model, load_config
from launch import check, checkpoint_state, forked_python_m, forked_torchrun, image_and_text_rows, resume_a_copy
from launch import train_flags

peft = pytest.importorskip("peft")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapted(bundle, dtype: str = "bf16", **flags):
    args = ModelArgs(model_name_or_path=bundle["model_dir"])
    model = build_meta_model(load_config(args), args, dtype)
    return model, add_adapters(model, LoraArgs(lora_rank=4, **flags), torch.float32)


def test_adapters_go_on_the_decoder_projections_in_fp32_beside_a_frozen_bf16_base(tiny_bundle):
    model, units = adapted(tiny_bundle)
    trainable = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    part = {p: "mlp" if p in ("gate_proj", "up_proj", "down_proj") else "self_attn" for p in PROJECTIONS}
    expected = {f"model.language_model.layers.{i}.{part[p]}.{p}.lora_{m}.default.weight" for i in range(2)
                for p in PROJECTIONS for m in "AB"}
    assert set(trainable) == expected and len(expected) == 2 * 7 * 2
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert len(units) == len(expected)  # every adapter matrix an FSDP unit of its own
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (4, 64) and q.lora_B["default"].weight.shape == (64, 4)


def test_vision_targets_and_unknown_names(tiny_bundle):
    model, _ = adapted(tiny_bundle, lora_target_modules=(), lora_vision_target_modules=("qkv",))
    names = {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"model.visual.blocks.{i}.attn.qkv.lora_{m}.default.weight" for i in range(2) for m in "AB"}
    with pytest.raises(ConfigError, match=r"--lora-target-modules qkv: no linear layer of that name in a decoder "
                                          r"layer of Qwen2_5_VLForConditionalGeneration; its decoder layers have "
                                          r"mlp\.down_proj, mlp\.gate_proj"):
        adapted(tiny_bundle, lora_target_modules=("qkv",))


def test_without_peft_the_flag_says_how_to_install_it(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ConfigError, match=r"--lora-rank needs peft, an optional dependency: pip install "
                                          r"'ftloop\[lora\]'"):
        adapted(tiny_bundle)


def test_first_adapter_values_start_the_model_as_its_base():
    meta = torch.empty(8, 96, device="meta")
    a = initial_adapter("x.q_proj.lora_A.default.weight", meta, seed=3)
    assert torch.equal(a, initial_adapter("x.q_proj.lora_A.default.weight", meta, seed=3))  # on every rank
    assert not torch.equal(a, initial_adapter("x.k_proj.lora_A.default.weight", meta, seed=3))
    bound = 1 / 96**0.5  # nn.Linear's initialisation (Kaiming uniform, a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.equal(initial_adapter("x.q_proj.lora_B.default.weight", meta, 3), torch.zeros(8, 96))
    assert initial_adapter("x.q_proj.weight", meta, 3) is None


def test_merged_weights_give_the_adapted_models_logits(tiny_bundle):
    """`merged` (what the export writes) against peft's own forward through the adapters, in fp32."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"], dtype=torch.float32)
    lora = LoraArgs(lora_rank=4, lora_alpha=12.0, lora_dropout=0.0)
    add_adapters(model, lora, torch.float32)
    adapters = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p.data, std=0.2)
            adapters[clean_name(name)] = p.data
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        live = model(input_ids=ids).logits
        plain = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"], dtype=torch.float32)
        base = plain(input_ids=ids).logits
        for name, p in plain.named_parameters():
            p.copy_(merged(name, p, adapters, lora))
        merged_logits = plain(input_ids=ids).logits
    assert (live - base).abs().max() > 0.05  # the adapters change the output
    torch.testing.assert_close(merged_logits, live, rtol=1e-4, atol=1e-5)



def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_lora_run_exports_adapter_and_merged_folder_and_resumes_exactly(tiny_bundle, tmp_path):
    """2 processes, one row with an image and one text-only (one rank's vision pass is the blank image's),
    bf16 compute with the frozen base held in bf16, fp32 adapters trained by Adafactor, dropout on."""
    run = ["--train-data", image_and_text_rows(tiny_bundle, tmp_path), "--max-steps", "3", "--logging-steps", "1",
           "--per-device-train-batch-size", "1", "--learning-rate", "1e-2", "--lora-rank", "4"]
    out = tmp_path / "run"
    check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(tiny_bundle, out, *run, "--save-steps", "2")],
                          timeout=180))

    saved = checkpoint_state(out / "checkpoint-2")
    model_state = {k.removeprefix("hf."): v for k, v in saved["model"].items()}
    adapters = {k for k in model_state if ".lora_" in k}
    assert len(adapters) == 28 and all(model_state[k].dtype == torch.float32 for k in adapters)
    assert {v.dtype for k, v in model_state.items() if k not in adapters} == {torch.bfloat16}
    optimizer = {k: v for k, v in saved["optimizer"].items() if k != "step"}
    # Adafactor's state for the adapters alone, factored: a row and a column statistic of each matrix.
    assert {k.rsplit(".", 1)[0] for k in optimizer} == adapters
    assert all(f"{k}.exp_avg_sq_row" in optimizer and f"{k}.exp_avg_sq_col" in optimizer for k in adapters)
    # `python -m ftloop.export` merges a LoRA checkpoint's adapters too: W + alpha / rank x B A (16 / 4).
    export_checkpoint(str(out / "checkpoint-2"), str(tmp_path / "offline"))
    q = "model.language_model.layers.1.self_attn.q_proj"
    by_hand = model_state[f"{q}.weight"].float() + 4.0 * (
        model_state[f"{q}.lora_B.default.weight"] @ model_state[f"{q}.lora_A.default.weight"])
    assert torch.equal(load_file(tmp_path / "offline" / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"],
                       by_hand.bfloat16())
    offline = load_file(tmp_path / "offline" / "adapter" / "adapter_model.safetensors")
    assert torch.equal(offline[f"base_model.model.{q}.lora_A.weight"], model_state[f"{q}.lora_A.default.weight"])

    # final/adapter loads into the base with peft; final/ is the merged model, in the usual layout.
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"], dtype=torch.float32)
    base_logits = logits(base, ids)
    live = peft.PeftModel.from_pretrained(base, str(out / "final" / "adapter"))
    file = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    loaded = {k: v for k, v in live.state_dict().items() if "lora_" in k}
    assert len(file) == len(loaded) == 28 and all(torch.equal(v, file[k.replace(".default", "")])
                                                  for k, v in loaded.items())
    live_logits = logits(live, ids)
    merged_model = AutoModelForImageTextToText.from_pretrained(out / "final", dtype=torch.float32)
    bf16_base = AutoModelForImageTextToText.from_pretrained(tiny_bundle["model_dir"], dtype=torch.bfloat16)
    bf16_error = (logits(bf16_base, ids) - base_logits).abs().max()  # what holding weights in bf16 costs
    learned = (live_logits - base_logits).abs().max()
    error = (logits(merged_model, ids) - live_logits).abs().max()
    assert learned > 10 * bf16_error and error < 2 * bf16_error, (learned, error, bf16_error)
    start, end = load_file(f"{tiny_bundle['model_dir']}/model.safetensors"), load_file(out / "final" /
                                                                                         "model.safetensors")
    for name, tensor in start.items():  # all but the projections' weights come out as they went in (in bf16)
        targeted = name.endswith("_proj.weight") and name.startswith("model.layers.")
        assert torch.equal(end[name], tensor.bfloat16()) != targeted, name

    # A resume with other adapters is refused before anything loads (the same ones are taken).
    checkpoint, saved_config = str(out / "checkpoint-2"), json.load(open(out / "checkpoint-2" / "run_config.json"))
    hf_config, order = AutoConfig.from_pretrained(tiny_bundle["model_dir"]), read_trainer_state(checkpoint)["sampler"]
    check_resumable(checkpoint, hf_config, order, saved_config)
    with pytest.raises(ConfigError, match=r"it was saved with --lora-rank 4 --lora-alpha 16.0 --lora-dropout 0.05 "
                                          r"--lora-target-modules q_proj .*, this run has --lora-rank 4 --lora-alpha "
                                          r"32.0 .*; resume with the LoRA flags it was saved with"):
        check_resumable(checkpoint, hf_config, order, dict(saved_config, lora=dict(saved_config["lora"],
                                                                                   lora_alpha=32.0)))
    with pytest.raises(ConfigError, match=r"this run has no LoRA"):
        check_resumable(checkpoint, hf_config, order, dict(saved_config, lora={}))
    resumed = tmp_path / "resumed"
    resume_a_copy(tiny_bundle, out, resumed, run, step=2)
    again = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    assert file.keys() == again.keys() and all(torch.equal(file[k], again[k]) for k in file)


def test_best_adapters_come_back_and_no_merge_lora_writes_the_adapter_alone(tiny_bundle, tmp_path):
    """AdamW (flat shards) at an lr that makes the step worse: the best eval is step 0's, whose adapters
    (B = 0, the base itself) are what `final/adapter` holds at the end."""
    out = tmp_path / "run"
    result = check(forked_python_m("ftloop.train", train_flags(
        tiny_bundle, out, "--eval-data", tiny_bundle["eval_json"], "--eval-on-start", "--max-steps", "1",
        "--eval-steps", "1", "--learning-rate", "1.0", "--lora-rank", "4", "--no-merge-lora", "--optim", "adamw")))
    evals = [r["eval_loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] > evals[0]  # the adapters trained, for the worse
    assert "loaded the best adapters back (step 0" in result.stdout
    assert sorted(p.name for p in (out / "final").iterdir()) == ["adapter"]
    assert sorted(p.name for p in (out / "final" / "adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    final = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    b = [v for k, v in final.items() if "lora_B" in k]
    assert len(b) == 14 and all(not v.any() for v in b)


def test_why_a_layer_s_adapters_are_units_of_their_own():
    """README (LoRA): FSDP1 will not flatten a frozen projection with its trainable adapter under
    use_orig_params=False, and under use_orig_params=True keeps a gradient for all of it (the frozen weight
    included): so each adapter matrix is its own unit."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(256, 256, bias=False).requires_grad_(False)
            self.lora_A, self.lora_B = nn.Linear(256, 8, bias=False), nn.Linear(8, 256, bias=False)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x))

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="uniform `requires_grad`"):
            FSDP(Projection(), use_orig_params=False, device_id=torch.device("cpu"))
        unit = FSDP(Projection(), use_orig_params=True, device_id=torch.device("cpu"))
        unit(torch.randn(4, 256)).sum().backward()
        assert unit._handle.flat_param.grad.numel() == 256 * 256 + 2 * 256 * 8 == 69632  # trainable: 4,096
    finally:
        dist.destroy_process_group()
