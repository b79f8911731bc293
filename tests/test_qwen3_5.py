"""Qwen3.5 (dense, model_type qwen3_5: a hybrid decoder of Gated DeltaNet and gated full-attention layers, Qwen3-VL's
tower without DeepStack) through the same loop: 2-process training of the tiny random Qwen3.5 bundle that resumes
bit for bit, one process giving the same weights as two, an export that `Qwen3_5ForConditionalGeneration` loads in
the checkpoint's own key layout with the trained model's logits, the DeltaNet's fp32 scalars updated in fp32 under
bf16 compute, packed sequences, Qwen3.5-MoE refused in one line. (The one vision pass against
transformers' forward, images, videos, both and text only: test_vision_forward.)"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig

from ftloop.config import ModelArgs
from ftloop.errors import ConfigError
from ftloop.export import export_checkpoint
from ftloop.model import load_config
from familyrun import train_export_resume_and_one_process
from launch import check, forked_python_m, forked_torchrun, train_flags

RUN = ["--max-steps", "3", "--logging-steps", "1", "--learning-rate", "1e-3", "--no-bf16", "--save-dtype", "fp32",
       "--no-load-best-model-at-end"]
TWO = ["--per-device-train-batch-size", "2"]


def test_qwen3_5_trains_resumes_exactly_and_exports_the_trained_model(qwen35_bundle, tmp_path):
    run = [*RUN, "--eval-data", qwen35_bundle["eval_json"], "--eval-steps", "3"]
    stdout, final = train_export_resume_and_one_process(qwen35_bundle, tmp_path, run, Qwen3_5ForConditionalGeneration)
    assert "eval_loss" in stdout
    # Said at the start: which implementation runs the linear attention (here, without the kernels, the torch path).
    assert "linear attention: transformers' torch path (causal-conv1d and flash-linear-attention not installed" in stdout
    source = load_file(f"{qwen35_bundle['model_dir']}/model.safetensors")
    assert final.keys() == source.keys()  # the checkpoint's key layout (model.visual.*, model.language_model.*)
    changed = {k for k in source if not torch.equal(final[k], source[k])}
    for part in (".linear_attn.in_proj_qkv.", ".linear_attn.A_log", ".linear_attn.dt_bias", ".linear_attn.conv1d.",
                 ".self_attn.q_proj.", ".visual.pos_embed."):  # both layer kinds and the tower learn
        assert any(part in k for k in changed), part


def test_the_deltanet_scalars_are_updated_in_fp32_under_bf16_compute(qwen35_bundle, tmp_path):
    """A_log and dt_bias (as every parameter) keep fp32 master weights under --bf16: FSDP computes in bf16 and the
    optimizer updates the fp32 shards. 3 steps at lr 1e-5 move them by ~3e-5, far below half a bf16 step of their
    values (4e-3 at 1, where dt_bias starts): only fp32 masters hold such a move (bf16 ones, --param-dtype bf16,
    lose it or round it to a whole step: the check fails with them, and such a run says so at its start)."""
    out = tmp_path / "bf16"
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
        qwen35_bundle, out, *[f for f in RUN if f != "--no-bf16"], *TWO, "--learning-rate", "1e-5", "--save-steps", "0")]))
    assert "A_log and dt_bias" not in result.stdout
    final = load_file(out / "final" / "model.safetensors")
    source = load_file(f"{qwen35_bundle['model_dir']}/model.safetensors")
    scalars = [k for k in source if k.endswith((".A_log", ".dt_bias"))]
    assert len(scalars) == 2  # the one DeltaNet layer's
    for key in scalars:
        moved = (final[key] - source[key]).abs()
        assert 0 < moved.max() < 1e-3, (key, moved.max())


def test_qwen3_5_trains_packed_sequences_resumes_exactly_and_one_process_equals_two(qwen35_bundle, tmp_path):
    """--packing runs end to end (the DeltaNet layers take each packed row one per line, under FSDP and gradient
    checkpointing; that a packed micro-batch is exact: test_packing)."""
    run = [*RUN, "--packing", "--max-seq-length", "128"]
    stdout, _ = train_export_resume_and_one_process(qwen35_bundle, tmp_path, run, Qwen3_5ForConditionalGeneration)
    assert "packed sequences" in stdout


def test_bf16_masters_say_at_the_start_that_the_deltanet_scalars_are_bf16_too():
    from ftloop.family import deltanet_scalars_line

    assert "A_log and dt_bias in bf16" in deltanet_scalars_line("qwen3_5", "bf16")
    assert deltanet_scalars_line("qwen3_5", "fp32") is None and deltanet_scalars_line("qwen3_vl", "bf16") is None


def test_the_data_check_takes_a_qwen3_5_model(qwen35_bundle, capsys):
    """The check before training reads its processor and its chat format (the empty think block included) and
    passes the bundle's rows; the plan of its 2 decoder layers (one of each kind) fits 2 GPUs."""
    from ftloop.data.check import main as check_main
    from ftloop.plan import main as plan_main

    flags = ["--train-data", qwen35_bundle["train_json"], "--image-folder", qwen35_bundle["image_folder"],
             "--model-name-or-path", qwen35_bundle["model_dir"], "--workers", "1"]
    assert check_main(flags) == 0
    assert "0 errors" in capsys.readouterr().out
    assert plan_main(["--model-name-or-path", qwen35_bundle["model_dir"], "--nproc-per-node", "2"]) == 0
    assert "DeltaNet layers as the " in capsys.readouterr().out  # the torch path here, the kernels on GPUs


def test_a_qwen3_5_moe_folder_is_refused_in_one_line(tmp_path):
    Qwen3_5MoeConfig().save_pretrained(tmp_path / "moe")
    with pytest.raises(ConfigError, match=r"a Qwen3.5-MoE model \(qwen3_5_moe\), which ftloop does not train yet"):
        load_config(ModelArgs(model_name_or_path=str(tmp_path / "moe")))


def test_the_start_of_a_run_says_which_linear_attention_runs(monkeypatch):
    """Both kernels must import as transformers imports them (a broken install counts as missing, as transformers
    then falls back)."""
    import ftloop.linear_attention
    from ftloop.family import linear_attention_path

    assert linear_attention_path("qwen3_vl") is None and linear_attention_path("qwen2_5_vl") is None
    assert "torch path (causal-conv1d and flash-linear-attention not installed" in linear_attention_path("qwen3_5")
    imported = []

    def imports(module):
        imported.append(module)
        if module == "causal_conv1d":
            raise ImportError("undefined symbol")  # installed, but built for another torch
        return type("Module", (), {"chunk_gated_delta_rule": object()})

    ftloop.linear_attention.missing_kernels.cache_clear()
    monkeypatch.setattr(ftloop.linear_attention.importlib, "import_module", imports)
    try:
        assert "torch path (causal-conv1d not installed" in linear_attention_path("qwen3_5")
        assert imported == ["fla.ops.gated_delta_rule", "causal_conv1d"]
        ftloop.linear_attention.missing_kernels.cache_clear()
        monkeypatch.setattr(ftloop.linear_attention.importlib, "import_module",
                            lambda module: type("Module", (), {"chunk_gated_delta_rule": 1, "causal_conv1d_fn": 1}))
        assert linear_attention_path("qwen3_5") == "linear attention: flash-linear-attention and causal-conv1d kernels"
    finally:
        ftloop.linear_attention.missing_kernels.cache_clear()


def test_lora_adapts_both_layer_kinds_and_trains(qwen35_bundle, tmp_path):
    """The default targets reach the DeltaNet's in_proj_qkv, in_proj_z and out_proj besides the full-attention and
    MLP projections (a default name a model lacks is skipped; Qwen2.5-VL's 28 adapters are unchanged:
    test_lora); a 2-process LoRA run trains only the adapters and exports a merged folder that
    Qwen3_5ForConditionalGeneration loads."""
    from ftloop.config import LoraArgs
    from ftloop.lora import add_adapters
    from ftloop.model import build_meta_model

    args = ModelArgs(model_name_or_path=qwen35_bundle["model_dir"])
    model = build_meta_model(load_config(args), args, "bf16")
    add_adapters(model, LoraArgs(lora_rank=4), torch.float32)
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    layer0, layer1 = "model.language_model.layers.0.", "model.language_model.layers.1."  # DeltaNet, full attention
    assert {f"{layer0}linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "out_proj")} <= adapted
    assert {f"{layer1}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} <= adapted
    assert len(adapted) == 6 + 7  # and each layer's gate, up and down projections

    out = tmp_path / "lora"
    check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(qwen35_bundle, out, *RUN, *TWO, "--lora-rank", "4",
                                                                 "--learning-rate", "1e-2", "--save-steps", "0")]))
    final = load_file(out / "final" / "model.safetensors")
    source = load_file(f"{qwen35_bundle['model_dir']}/model.safetensors")
    merged = {k for k in source if not torch.equal(final[k], source[k])}
    assert {k.removesuffix(".weight") for k in merged} == adapted  # the adapted projections moved, nothing else
    reloaded = Qwen3_5ForConditionalGeneration.from_pretrained(out / "final", dtype=torch.float32)
    assert torch.equal(reloaded.state_dict()["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"],
                       final["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"])


def test_lora_and_packing_together_do_not_hang(qwen35_bundle, tmp_path):
    """LoRA's adapter matrices are FSDP units inside the DeltaNet layer, gathered at each call: the layer runs once
    per micro-batch on every rank, however many rows each rank's packs hold (a call per row left the ranks in
    different all-gathers). With --param-dtype bf16 the run says at its start that A_log and dt_bias are bf16 too."""
    out = tmp_path / "lora-packed"
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
        qwen35_bundle, out, *RUN, "--lora-rank", "4", "--packing", "--max-seq-length", "128", "--seed", "3",
        "--param-dtype", "bf16")], timeout=90))
    assert "packed sequences" in result.stdout and (out / "final" / "model.safetensors").exists()
    assert "--param-dtype bf16 holds the DeltaNet layers' A_log and dt_bias in bf16" in result.stdout


def test_exports_carry_the_mtp_head_through_byte_for_byte(qwen35_bundle, tmp_path):
    """Every Qwen3.5 checkpoint holds a multi-token-prediction head (`mtp.*`) that transformers leaves out on load;
    the run's exports (and `python -m ftloop.export` while the source folder is there) copy its tensors unchanged,
    in the source's names and dtypes, so the exported folder serves as the original does (speculative decoding)."""
    import shutil

    from safetensors.torch import save_file

    source = tmp_path / "with_mtp"
    shutil.copytree(qwen35_bundle["model_dir"], source)
    weights = load_file(source / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    mtp = {"mtp.fc.weight": torch.randn(64, 128, generator=g).bfloat16(),
           "mtp.layers.0.input_layernorm.weight": torch.randn(64, generator=g),
           "mtp.norm.weight": torch.randn(64, generator=g).bfloat16()}
    save_file({**weights, **mtp}, source / "model.safetensors", metadata={"format": "pt"})
    bundle = dict(qwen35_bundle, model_dir=str(source))

    out = tmp_path / "run"
    check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(bundle, out, *RUN, *TWO, "--save-steps", "2")]))
    for folder in (out / "final", tmp_path / "offline"):
        if folder.name == "offline":
            export_checkpoint(str(out / "checkpoint-2"), str(folder), save_dtype="bf16")
        exported = {}
        for file in folder.glob("*.safetensors"):
            exported.update(load_file(file))
        for key, tensor in mtp.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), (folder.name, key)
        assert not any(k.startswith("mtp.") for k in exported if k not in mtp)
        reloaded = Qwen3_5ForConditionalGeneration.from_pretrained(folder)  # transformers still leaves it out
        assert not any(k.startswith("mtp.") for k in reloaded.state_dict())

    # The source folder gone: an offline export says it in one line and leaves the head out.
    shutil.move(source, tmp_path / "moved")
    result = forked_python_m("ftloop.export", [str(out / "checkpoint-2"), str(tmp_path / "without")])
    assert result.returncode == 0, result.stderr
    assert "is not here: the tensors the model leaves out on load (such as Qwen3.5's mtp.* head) are not carried" \
        in result.stdout
    assert not any(k.startswith("mtp.") for file in (tmp_path / "without").glob("*.safetensors")
                   for k in load_file(file))


THINK = "<think>\n\n</think>\n\n"
TURNS = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."},
         {"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "A circle."}]


def test_a_final_reply_without_reasoning_gets_the_empty_think_block_as_the_template_writes_it(qwen35_bundle):
    """--empty-think context (the default): the block before the reply after the last user turn, untrained, where a
    post-trained template's generation prompt puts it with thinking off (the demo bundle's template: the rendered row
    starts with exactly what the template gives the model at inference); `trained`: inside the reply's span;
    `none`: left out; a reply holding <think> is written as it is; other families write none."""
    from transformers import AutoTokenizer

    from ftloop.data.encode import chat_format, render_chat

    assert chat_format(None, "qwen3_5").think_block == THINK and not chat_format(None, "qwen3_5").think_block_trained
    assert chat_format(None, "qwen3_5", "trained").think_block_trained
    assert chat_format(None, "qwen3_5", "none").think_block == ""
    assert chat_format(None, "qwen3_vl").think_block == chat_format(None, "qwen2_5_vl").think_block == ""

    def render(mode, messages=TURNS):
        chat = chat_format(None, "qwen3_5", mode)
        return render_chat(messages, [1], chat.system_prompt, think_block=chat.think_block,
                           think_block_trained=chat.think_block_trained)

    text, spans = render("context")
    assert text.count(THINK) == 1 and text.endswith(f"<|im_start|>assistant\n{THINK}A circle.<|im_end|>\n")
    assert "assistant\nRed.<|im_end|>" in text  # an earlier turn: as the template renders history
    assert [text[a:b] for a, b in spans] == ["Red.<|im_end|>", "A circle.<|im_end|>"]
    text, spans = render("trained")
    assert [text[a:b] for a, b in spans] == ["Red.<|im_end|>", f"{THINK}A circle.<|im_end|>"]
    text, spans = render("none")
    assert THINK not in text
    thought = [*TURNS[:3], {"role": "assistant", "content": "<think>\nround, so\n</think>\n\nA circle."}]
    text, spans = render("context", thought)
    assert THINK not in text and text[spans[-1][0]:].startswith("<think>\nround, so")

    tokenizer = AutoTokenizer.from_pretrained(qwen35_bundle["model_dir"])
    single = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}]
    prompt = tokenizer.apply_chat_template(single[:1], tokenize=False, add_generation_prompt=True)
    text, spans = render("context", single)
    assert text.startswith(prompt) and text[len(prompt):] == "Red.<|im_end|>\n" and text[spans[0][0]:] == text[len(prompt):]
