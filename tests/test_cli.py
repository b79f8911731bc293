"""Flags: parsed with HF TrainingArguments names, validated up front, one clear line on error."""

import ast
import inspect
import json
import os
import re
import time
import traceback

import pytest

from ftloop.config import Config, parse_args, parse_size
from ftloop.data.sources import check_sources
from ftloop.errors import ConfigError
from ftloop.train import main as train_main
from launch import REPO, check, forked_python_m, python_m, torchrun, train_flags


def config_for(bundle, *flags: str) -> Config:
    return parse_args(train_flags(bundle, "/tmp/ftloop-unused", *flags))


def test_hf_names_without_group_prefixes_and_seed_defaults(tiny_bundle):
    cfg = config_for(tiny_bundle, "--learning-rate", "2e-5", "--warmup-ratio", "0.1", "--max-grad-norm", "0.5",
                     "--gradient-accumulation-steps", "4", "--no-bf16", "--param-dtype", "bf16")
    assert cfg.optim.learning_rate == 2e-5 and cfg.optim.warmup_ratio == 0.1 and cfg.optim.max_grad_norm == 0.5
    assert cfg.train.gradient_accumulation_steps == 4
    assert cfg.fsdp.bf16 is False and cfg.model.param_dtype == "bf16"
    default = parse_args(["--model-name-or-path", tiny_bundle["model_dir"], "--train-data", tiny_bundle["train_json"]])
    assert default.optim.optim == "adafactor" and default.optim.lr_scheduler_type == "constant"
    assert default.fsdp.bf16 and default.fsdp.sharding_strategy == "FULL_SHARD"
    assert default.model.gradient_checkpointing and default.data.dataloader_num_workers == 1
    assert default.train.load_best_model_at_end and default.train.save_dtype == "bf16"
    assert default.model.param_dtype == "fp32" and default.train.report_to == "wandb"
    assert default.fsdp.reduce_dtype == "fp32" and default.optim.bf16_master_rounding == "stochastic"
    default.check()
    config_for(tiny_bundle, "--optim", "adamw", "--param-dtype", "bf16", "--bf16-master-rounding", "nearest").check()


BAD_FLAGS = [  # (flags, the start of the one line they get): every check Config.check makes
    (["--per-device-train-batch-size", "0"], "--per-device-train-batch-size must be positive"),
    (["--max-eval-samples", "-1"], "--max-eval-samples must be 0 (all) or positive"),
    (["--unfreeze-topk-llm", "-1"], "--unfreeze-topk-llm and --unfreeze-topk-vision must be 0 (off) or positive"),
    (["--freeze-vision-tower", "--freeze-merger", "--freeze-llm"],
     "--freeze-vision-tower, --freeze-merger and --freeze-llm together leave nothing to train"),
    (["--length-group-steps", "0"], "--length-group-steps must be 1 or more"),
    (["--lora-alpha", "32", "--no-merge-lora"], "--lora-alpha, --merge-lora set without --lora-rank"),
    (["--lora-rank", "-4"], "--lora-rank must be 0 (off) or positive"),
    (["--lora-rank", "8", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--lora-rank", "8", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--lora-rank", "8", "--lora-target-modules"], "--lora-rank with no --lora-target-modules or"),
    (["--lora-rank", "8", "--unfreeze-topk-llm", "1"], "--lora-rank trains the adapters alone (every base weight is "
     "frozen), so --unfreeze-topk-llm means nothing with it"),
    (["--max-tokens-per-batch", "4096"], "--max-tokens-per-batch is the size of a packed sequence; pass --packing"),
    (["--packing", "--max-tokens-per-batch", "1024"], "--max-tokens-per-batch 1024 is below --max-seq-length 2048"),
    (["--per-device-eval-batch-size", "-1"], "--per-device-eval-batch-size must be positive"),
    (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be positive"),
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--max-steps", "-1", "--num-train-epochs", "0"], "--num-train-epochs must be positive"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio"),
    (["--logging-steps", "0"], "--logging-steps"),
    (["--eval-steps", "0"], "--eval-steps"),
    (["--max-seq-length", "0"], "--max-seq-length"),
    (["--train-data", "/nonexistent/train.json"], "--train-data /nonexistent/train.json: file not found"),
    (["--eval-data", "/nonexistent/eval.json"], "--eval-data /nonexistent/eval.json: file not found"),
    (["--image-folder", "/nonexistent/images"], "--image-folder /nonexistent/images: folder not found"),
    (["--model-name-or-path", "/nonexistent/model"], "--model-name-or-path /nonexistent/model: no config.json"),
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--cpu-offload", "--sharding-strategy", "NO_SHARD"], "--cpu-offload"),
    (["--cpu-offload"], "--cpu-offload moves GPU shards to host memory, and there is no GPU here"),
    (["--ddp-timeout", "0"], "--ddp-timeout must be positive"),
    (["--save-grace-s", "0"], "--save-grace-s must be positive"),
    (["--optim", "adamw", "--param-dtype", "bf16"], "--param-dtype bf16 with --optim adamw rounds every update"),
    (["--eval-ratio", "1"], "--eval-ratio must be in"),
    (["--eval-ratio", "0.2", "--eval-data", "{train}"], "--eval-ratio holds out training rows instead of --eval-data"),
    (["--dataloader-num-workers", "-1"], "--dataloader-num-workers must be 0 or more"),
    (["--min-pixels", "0"], "--min-pixels must be positive"),
    (["--max-pixels", "-4"], "--max-pixels must be positive"),
    (["--min-pixels", "800", "--max-pixels", "400"], "--min-pixels 800 is above --max-pixels 400"),
    (["--max-images-per-sample", "-1"], "--max-images-per-sample must be 0"),
    (["--peak-tflops", "0"], "--peak-tflops must be positive"),
    (["--video-fps", "0"], "--video-fps must be positive"),
    (["--video-min-frames", "0"], "--video-min-frames must be 1 or more"),
    (["--video-max-frames", "1"], "--video-max-frames must be 2 or more"),
    (["--video-min-frames", "10", "--video-max-frames", "8"], "--video-min-frames 10 is above --video-max-frames 8"),
    (["--video-total-pixels", "0"], "--video-total-pixels must be positive"),
    (["--video-min-pixels", "9000", "--video-max-pixels", "8000"],
     "--video-min-pixels 9000 is above --video-max-pixels"),
    (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
    (["--vision-lr", "0"], "--vision-lr must be positive"),
    (["--merger-lr", "-1e-5"], "--merger-lr must be positive"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be 0"),
    (["--save-steps", "-1"], "--save-steps must be 0"),
    (["--save-total-limit", "-2"], "--save-total-limit must be 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be positive"),
    (["--resume-from-checkpoint", "/nonexistent/checkpoint-3"], "--resume-from-checkpoint /nonexistent/checkpoint-3"),
    (["--output-dir", ""], "--output-dir is required"),
    (["--output-dir", "{train}"], "--output-dir {train}: is a file"),
    (["--output-dir", "{run}"], "--output-dir {run}: holds a run already"),
    (["--model-name-or-path", ""], "--model-name-or-path is required"),
    (["--train-data", ""], "--train-data is required"),
    (["--loss-chunk-size", "-1"], "--loss-chunk-size must be 0 (one chunk) or positive"),
    (["--attn-implementation", "flash_attention_2"], "--attn-implementation flash_attention_2: flash-attn does not "
     "import here (install it with `pip install 'ftloop[flash]'`"),
]
FLASH_BAD_FLAGS = [  # the same, where flash-attn imports (simulated: this machine has no flash-attn)
    (["--attn-implementation", "flash_attention_2", "--no-bf16"], "--attn-implementation flash_attention_2 computes "
     "in bf16 only, and --no-bf16 computes in fp32"),
    (["--attn-implementation", "flash_attention_2"], "--attn-implementation flash_attention_2 runs on NVIDIA GPUs "
     "only"),
]


@pytest.fixture
def flash_imports(monkeypatch):
    import ftloop.config

    monkeypatch.setattr(ftloop.config, "flash_attention_imports", lambda: True)


def bad_config(bundle, tmp_path, flags: list[str]) -> Config:
    folders = {"train": bundle["train_json"], "run": str(tmp_path / "earlier")}
    (tmp_path / "earlier" / "final").mkdir(parents=True, exist_ok=True)
    return config_for(bundle, *[flag.format(**folders) for flag in flags])


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_values_name_the_flag(tiny_bundle, tmp_path, flags, message):
    message = message.format(train=tiny_bundle["train_json"], run=tmp_path / "earlier")
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_flags(bad_config(tiny_bundle, tmp_path, flags))


@pytest.mark.parametrize("flags, message", FLASH_BAD_FLAGS)
def test_flash_attention_flags_are_refused_in_one_line(tiny_bundle, tmp_path, flash_imports, flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_flags(bad_config(tiny_bundle, tmp_path, flags))


def test_every_check_in_validate_has_a_bad_flag_case(tiny_bundle, tmp_path, monkeypatch):
    """A `_need` check added to ftloop/config.py without a case in BAD_FLAGS fails here: each case is traced to
    the `_need` call that refused it, and every one must be reached (checks raised otherwise, parse_size's,
    have tests of their own)."""
    import ftloop.config

    source = inspect.getsource(ftloop.config)
    calls = {node.lineno for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_need"}
    reached = set()
    flash = [False] * len(BAD_FLAGS) + [True] * len(FLASH_BAD_FLAGS)
    for (flags, _), imports in zip(BAD_FLAGS + FLASH_BAD_FLAGS, flash):
        monkeypatch.setattr(ftloop.config, "flash_attention_imports", lambda imports=imports: imports)
        try:
            bad_config(tiny_bundle, tmp_path, flags).check()
        except ConfigError as err:
            frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == ftloop.config.__file__]
            reached.add(frames[-2].lineno if frames[-1].name == "_need" else frames[-1].lineno)
    assert calls and calls <= reached, f"config.py lines with a _need and no case: {sorted(calls - reached)}"



def check_flags(cfg: Config) -> None:
    """What ftloop.train.main checks before it starts a process group (tested there too)."""
    cfg.check()
    check_sources(cfg.data)


def test_required_flags():
    with pytest.raises(ConfigError, match="--model-name-or-path is required"):
        parse_args([]).check()
    with pytest.raises(ConfigError, match="--train-data is required"):
        parse_args(["--model-name-or-path", "some/hub-id"]).check()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024


def error_lines(result) -> list[str]:
    lines = [line for line in result.stderr.splitlines() if line.startswith("ftloop: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines


def one_error_line(result) -> str:
    lines = error_lines(result)
    assert len(lines) == 1, lines
    return lines[0]


def bad_row_lines(result, data, rows: int) -> list[str]:
    """Every bad row on its own line, then one line that says how many and what to do."""
    lines = error_lines(result)
    assert len(lines) == rows + 1, lines
    assert f"{data}: {rows} bad row" in lines[-1] and "--skip-bad-rows" in lines[-1]
    return lines[:-1]


# A run line in the HF Trainer's spelling, as the scripts of Qwen's finetune and 2U1 write it (`--bf16 True`,
# `--model_max_length`; `--data_path` is 2U1's), less the flags ftloop has no use for (--deepspeed, --tune_mm_*).
QWEN_SCRIPT = ["--model_name_or_path", "M", "--data_path", "train.json", "--bf16", "True", "--output_dir", "out",
               "--num_train_epochs", "0.5", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
               "--max_pixels", "50176", "--min_pixels", "784", "--save_steps", "1000", "--save_total_limit", "1",
               "--learning_rate", "2e-7", "--weight_decay", "0", "--warmup_ratio", "0.03", "--max_grad_norm", "1",
               "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "8192",
               "--gradient_checkpointing", "True", "--dataloader_num_workers", "4", "--run_name", "qwen2vl",
               "--report_to", "wandb"]


def test_the_hf_trainer_s_spelling_and_other_tools_names_are_taken():
    cfg = parse_args(QWEN_SCRIPT)
    assert cfg.model.model_name_or_path == "M" and cfg.data.train_data == "train.json"
    assert cfg.fsdp.bf16 and cfg.model.gradient_checkpointing and cfg.data.max_seq_length == 8192
    assert cfg.optim.lr_scheduler_type == "cosine" and cfg.train.per_device_train_batch_size == 4
    required = ["--model-name-or-path", "M", "--train-data", "t"]
    for given, read in [(["--bf16", "False"], False), (["--bf16=false"], False), (["--bf16=TRUE"], True),
                        (["--no-bf16"], False), (["--bf16", "0"], False), (["--bf16", "yes"], True)]:
        assert parse_args(required + given).fsdp.bf16 is read, given
    cfg = parse_args(required + ["--packing", "--gradient_checkpointing", "false", "--eval-on-start", "1"])
    assert cfg.data.packing and not cfg.model.gradient_checkpointing and cfg.train.eval_on_start
    for alias in ("--model_max_length", "--cutoff_len", "--max-length", "--max-seq-length"):
        assert parse_args(required + [alias, "99"]).data.max_seq_length == 99, alias
    assert parse_args(["--model-name-or-path", "M", "--data_path", "a.json", "--eval_path", "b.json"]).data.eval_data \
        == "b.json"
    with pytest.raises(ConfigError, match=r"^--bf16=maybe: --bf16 is on or off; give --bf16 or --no-bf16"):
        parse_args(required + ["--bf16=maybe"])


def test_an_unknown_flag_is_answered_with_the_nearest_ones(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--model-name-or-path", "M", "--train-data", "t", "--learning_rat", "1e-5"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--learning_rat" in err and "Perhaps you meant" in err and "--learning-rate" in err


def test_cli_exits_2_with_one_line_for_a_bad_flag(tiny_bundle, tmp_path, monkeypatch):
    # ftloop.train's entry point checks every flag first (BAD_FLAGS has every check), before any process group.
    monkeypatch.setattr("ftloop.train.init_distributed", lambda *_: pytest.fail("a process group was started"))
    with pytest.raises(ConfigError, match="--per-device-train-batch-size must be positive"):
        train_main(train_flags(tiny_bundle, tmp_path, "--per-device-train-batch-size", "0"))
    result = forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path, "--eval-data",
                                                         str(tmp_path / "no.json")))
    assert f"--eval-data {tmp_path / 'no.json'}: file not found" in one_error_line(result)  # ftloop.data's check


def test_cli_names_file_and_row_of_a_missing_image_before_training(tiny_bundle, tmp_path):
    rows = json.loads(open(tiny_bundle["train_json"]).read())
    image_row = next(r for r in rows if "image" in r)
    broken = dict(image_row, image="no/such/picture.png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps([image_row, broken]))
    result = forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path / "out", "--train-data", str(data),
                                                         "--max-steps", "1", "--per-device-train-batch-size", "2"))
    [line] = bad_row_lines(result, data, 1)
    assert f"{data}: row 2" in line and "no/such/picture.png" in line
    assert not (tmp_path / "out" / "final").exists()


def test_cli_hub_id_without_network_is_one_clear_line(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = python_m("ftloop.train", train_flags(tiny_bundle, tmp_path, "--model-name-or-path",
                                                  "nobody-here/not-a-model"))
    assert "--model-name-or-path nobody-here/not-a-model" in one_error_line(result)


def test_help_shows_the_attribute_docstrings(capsys):
    with pytest.raises(SystemExit) as exited:  # what `python -m ftloop.train --help` runs
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "python -m ftloop.train" in out
    assert "--per-device-train-batch-size" in out and "Sequences per micro-batch on each rank" in out


def test_cli_corrupt_image_is_found_before_training(tiny_bundle, tmp_path):
    rows = json.loads(open(tiny_bundle["train_json"]).read())
    image_row = next(r for r in rows if "image" in r)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps([image_row, dict(image_row, image=str(tmp_path / "corrupt.png"))]))
    result = forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path / "out", "--train-data", str(data),
                                                         "--max-steps", "1", "--per-device-train-batch-size", "2",
                                                         "--dataloader-num-workers", "1"))
    [line] = bad_row_lines(result, data, 1)
    assert f"{data}: row 2: cannot read image" in line and "corrupt.png" in line
    assert "train:" not in result.stderr  # stopped before the first step


def test_many_bad_rows_end_with_the_first_ones_and_their_count_in_torchrun_s_summary(tiny_bundle, tmp_path):
    """Before: a run with many bad rows ended in torchrun's summary saying only "N bad rows; fix, or pass
    --skip-bad-rows", the reasons some 30 lines up. Now the output, and the summary, end with the first three."""
    rows = json.loads(open(tiny_bundle["train_json"]).read())
    image_row = next(r for r in rows if "image" in r)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([image_row] + [dict(image_row, image=f"gone-{n}.png") for n in range(2, 7)]))
    result = torchrun(1, ["-m", "ftloop.train", *train_flags(tiny_bundle, tmp_path / "out", "--train-data", str(data),
                                                             "--max-steps", "1")])
    assert result.returncode != 0
    reasons = [f"{data}: row {n}: image not found: {tiny_bundle['image_folder']}/gone-{n}.png" for n in (2, 3, 4)]
    count = f"{data}: 5 bad rows; fix, or pass --skip-bad-rows to train without them"
    lines = result.stderr.splitlines()
    summary = lines.index(f"  traceback : ftloop: error: the first 3 of them again:")
    assert lines[summary + 1:summary + 5] == [f"  ftloop: error: {line}" for line in reasons + [count]], \
        lines[summary:]
    said = [line for line in lines if line.startswith("ftloop: error: ")]  # rank 0's own lines, before it
    assert said[:5] == [f"ftloop: error: {data}: row {n}: image not found: {tiny_bundle['image_folder']}/gone-{n}.png"
                        for n in range(2, 7)]
    assert said[5:] == [f"ftloop: error: {line}" for line in ["the first 3 of them again:", *reasons, count]]

def test_adamw_with_weight_decay_on_flat_shards_is_refused(tiny_bundle, tmp_path):
    result = forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path, "--max-steps", "1", "--optim", "adamw",
                                                         "--weight-decay", "0.1"))
    assert "needs --use-orig-params" in one_error_line(result)


def test_ddp_timeout_bounds_how_long_a_collective_waits(tmp_path):
    started = time.perf_counter()
    result = torchrun(2, [os.path.join(REPO, "tests", "timeout_worker.py"), "2", "30"], timeout=60)
    assert result.returncode != 0 and "rank 0 gave up after" in result.stdout, result.stdout + result.stderr
    waited = float(result.stdout.split("rank 0 gave up after ")[1].split("s:")[0])
    assert 1.5 < waited < 10 and time.perf_counter() - started < 30  # not rank 1's 30 s
    assert parse_args(["--model-name-or-path", "m", "--train-data", "t"]).train.ddp_timeout == 1800  # HF's default


def test_an_output_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(tiny_bundle, tmp_path):
    from ftloop.fsdp.checkpoint import clear_previous_run

    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "checkpoint-4").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("the user's own")
    flags = train_flags(tiny_bundle, out)
    with pytest.raises(ConfigError) as excinfo:
        parse_args(flags).check()
    assert str(excinfo.value) == (
        f"--output-dir {out}: holds a run already (checkpoint-4, final, metrics.jsonl); continue it with "
        "--resume-from-checkpoint auto, give a new --output-dir, or pass --overwrite-output-dir to replace it")
    parse_args(flags + ["--resume-from-checkpoint", "auto"]).check()
    parse_args(flags + ["--overwrite-output-dir"]).check()
    parse_args(train_flags(tiny_bundle, tmp_path)).check()  # a folder holding other things is no run
    assert clear_previous_run(str(out)) == [str(out / n) for n in ("checkpoint-4", "final", "metrics.jsonl")]
    assert os.listdir(out) == ["notes.txt"]


def test_overwrite_output_dir_starts_afresh_and_all_rows_too_long_is_said(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    result = check(forked_python_m("ftloop.train", train_flags(tiny_bundle, out, "--max-steps", "1",
                                                               "--overwrite-output-dir",
                                                               "--per-device-train-batch-size", "2")))
    assert f"removed {out / 'checkpoint-9'}: --overwrite-output-dir" in result.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]  # this run's only
    assert sorted(os.listdir(out)) == [".ftloop", ".ftloop.lock", "final", "metrics.jsonl"]  # .ftloop: the row check's cache
    # Under torchrun, the launcher's closing summary (its last lines) carries the same line.
    short = train_flags(tiny_bundle, tmp_path / "short", "--max-seq-length", "5")
    too_long = torchrun(1, ["-m", "ftloop.train", *short])
    line = (f"ftloop: error: --train-data {tiny_bundle['train_json']}: all 16 readable rows are longer than "
            "--max-seq-length 5; raise it, or pass --truncation right to cut their text after the last image")
    assert too_long.returncode != 0 and line in too_long.stderr.splitlines(), too_long.stderr[-3000:]
    assert f"  traceback : {line}" in too_long.stderr.splitlines()[-6:], too_long.stderr[-3000:]


def test_epochs_set_the_steps_with_a_partial_last_epoch_and_too_few_rows_are_refused(tiny_bundle, tmp_path):
    # 16 rows in global batches of 4: 4 steps an epoch; 1.3 epochs is 5.2 steps, rounded up (as HF does) to 6:
    # the last two in epoch 1.
    check(forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path / "out", "--max-steps", "-1",
                                                      "--num-train-epochs", "1.3", "--per-device-train-batch-size", "4",
                                                      "--logging-steps", "1")))
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]
    result = forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path / "few",
                                                         "--per-device-train-batch-size", "6",
                                                         "--gradient-accumulation-steps", "3"))
    assert one_error_line(result) == (
        "ftloop: error: --train-data has 16 rows, fewer than one global batch of 18 (processes x "
        "--per-device-train-batch-size x --gradient-accumulation-steps)")
    assert not os.path.exists(tmp_path / "few" / "metrics.jsonl")


def test_a_mixture_file_trains_its_sources_together(tiny_bundle, tmp_path):
    """--train-data mix.yaml: the bundle's rows twice (weight 2) and a second source with its own media folder."""
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"- path: {tiny_bundle['train_json']}\n  image_folder: {tiny_bundle['image_folder']}\n  weight: 2\n"
                   f"- path: {tiny_bundle['eval_json']}\n  image_folder: {tiny_bundle['image_folder']}\n")
    flags = train_flags(tiny_bundle, tmp_path / "out", "--train-data", str(mix), "--image-folder", "", "--max-steps",
                        "2", "--per-device-train-batch-size", "2")
    result = check(forked_python_m("ftloop.train", flags))
    assert "40 train rows" in result.stdout  # 16 x 2 + 8
