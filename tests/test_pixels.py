"""--min-pixels / --max-pixels (the image processor's limits, overridden at load time) and
--max-images-per-sample (rows with more images are bad rows)."""

import dataclasses

import pytest
from transformers import AutoImageProcessor, AutoTokenizer

from datautil import SYSTEM, save_rgb, turns, write_json
from ftloop.data.batches import SFTDataset
from ftloop.data.check import Measuring, checked_rows, main, report
from ftloop.data.layouts import load_rows
from ftloop.data.media import load_image_processor
from ftloop.data.rows import Row
from ftloop.distributed import World
from ftloop.errors import ConfigError, DataErrors
from launch import forked_python_m, train_flags
from test_cli import config_for, one_error_line


def image_row(paths) -> Row:
    return Row([{"role": "user", "content": "<image>" * len(paths) + "What?"}, {"role": "assistant", "content": "red"}],
               [str(p) for p in paths])


@pytest.mark.parametrize("flags, message", [
    (["--min-pixels", "0"], "--min-pixels must be positive"),
    (["--max-pixels", "-5"], "--max-pixels must be positive"),
    (["--min-pixels", "9000", "--max-pixels", "4000"], "--min-pixels 9000 is above --max-pixels 4000"),
    (["--max-images-per-sample", "-1"], "--max-images-per-sample must be 0"),
])
def test_flag_values_are_validated_before_anything_runs(tiny_bundle, flags, message):
    with pytest.raises(ConfigError, match=message):
        config_for(tiny_bundle, *flags).check()


def test_default_keeps_the_checkpoints_limits(tiny_bundle):
    cfg = config_for(tiny_bundle)
    assert cfg.data.min_pixels is None and cfg.data.max_pixels is None and cfg.data.max_images_per_sample == 0
    processor = load_image_processor(tiny_bundle["model_dir"])
    stock = AutoImageProcessor.from_pretrained(tiny_bundle["model_dir"])
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == \
        (stock.size["shortest_edge"], stock.size["longest_edge"]) == (3136, 3136)


def test_limits_checked_against_the_checkpoint_and_the_patch_grid(tiny_bundle):
    model = tiny_bundle["model_dir"]  # its limits: min 3136 = max 3136
    with pytest.raises(ConfigError, match="--min-pixels 5000 is above the checkpoint's max_pixels 3136"):
        load_image_processor(model, min_pixels=5000)
    with pytest.raises(ConfigError, match="the checkpoint's min_pixels 3136 is above --max-pixels 1000"):
        load_image_processor(model, max_pixels=1000)
    with pytest.raises(ConfigError, match=r"--max-pixels 700 is below 784 = \(patch_size 14 x merge_size 2\)"):
        load_image_processor(model, min_pixels=500, max_pixels=700)
    # The flags on their own (positive, min <= max) are checked with the others, before anything loads:
    # test_flag_values_are_validated_before_anything_runs.


def test_override_reaches_the_processor_tokens_and_the_export(tiny_bundle, tokenizer, tmp_path):
    wide = save_rgb(tmp_path / "wide.png", (224, 112))
    stock = load_image_processor(tiny_bundle["model_dir"])
    larger = load_image_processor(tiny_bundle["model_dir"], min_pixels=784, max_pixels=224 * 112)
    assert (larger.size["shortest_edge"], larger.size["longest_edge"]) == (784, 224 * 112)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pads = [int((SFTDataset([image_row([wide])], tokenizer, p, 4096, SYSTEM)[0]["input_ids"] == image_pad).sum())
            for p in (stock, larger)]
    assert pads == [2, 32]  # at most 3136 pixels: 28x56 (2x4 patches / 4); 224x112: 8x16 patches / 4
    # The run's image processor is what the export writes: the limits travel with the model.
    larger.save_pretrained(tmp_path / "export")
    reloaded = AutoImageProcessor.from_pretrained(tmp_path / "export")
    assert (reloaded.size["shortest_edge"], reloaded.size["longest_edge"]) == (784, 224 * 112)


def test_check_cli_takes_the_limits(tiny_bundle, tmp_path, capsys):
    b = tiny_bundle
    flags = ["--train-data", b["train_json"], "--image-folder", b["image_folder"], "--model-name-or-path",
             b["model_dir"], "--workers", "1"]
    tokenizer = AutoTokenizer.from_pretrained(b["model_dir"])
    stock = report(b["train_json"], Measuring(tokenizer, load_image_processor(b["model_dir"]), SYSTEM), World.single(),
                   b["image_folder"])
    finer = report(b["train_json"], Measuring(tokenizer, load_image_processor(b["model_dir"], 112 * 112, 112 * 112),
                                              SYSTEM), World.single(), b["image_folder"])
    image_rows = [i for i, r in enumerate(load_rows(b["train_json"], b["image_folder"])) if r.images]
    assert all(finer.lengths[i] == stock.lengths[i] + 12 for i in image_rows)  # 16 image tokens instead of 4
    assert main(flags + ["--max-pixels", "12544", "--min-pixels", "12544"]) == 0
    assert f"max {max(finer.lengths)}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--max-pixels 100 is below 784"):  # one line, exit 2 (ftloop.cli)
        main(flags + ["--max-pixels", "100", "--min-pixels", "50"])


def test_train_loads_the_processor_with_the_limits(tiny_bundle, tmp_path):
    # Valid on its own (Config.check passes), wrong against the checkpoint's min_pixels: found where train loads it.
    result = forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path, "--max-steps", "1", "--max-pixels",
                                                         "1000"))
    assert "the checkpoint's min_pixels 3136 is above --max-pixels 1000" in one_error_line(result)


# ------------------------------------------------------------------------------------ --max-images-per-sample


def test_too_many_images_is_a_bad_row(tmp_path, tokenizer, image_processor):
    paths = [save_rgb(tmp_path / f"{k}.png") for k in range(3)]
    row = dataclasses.replace(image_row(paths), number=12, videos=[paths])  # a video's frames do not count as images
    assert Measuring(tokenizer, image_processor, SYSTEM, max_images=3)(row, "train.json")[0] > 0
    assert Measuring(tokenizer, image_processor, SYSTEM, max_images=0)(row, "train.json")[0] > 0  # 0: no limit
    assert Measuring(tokenizer, image_processor, SYSTEM, max_images=2)(row, "train.json") == \
        "train.json: row 12: 3 images, more than --max-images-per-sample 2"


def test_max_images_per_sample_before_training_and_in_the_check(tiny_bundle, tmp_path, tokenizer,
                                                                image_processor, capsys):
    paths = [save_rgb(tmp_path / f"{k}.png") for k in range(3)]
    text = "<image>" * 3 + " Which is red?"
    data = write_json(tmp_path / "train.json", [
        {"image": paths[:1], "conversations": turns(("human", "<image> What?"), ("gpt", "red"))},
        {"image": paths, "conversations": turns(("human", text), ("gpt", "all"))}])
    rows = load_rows(str(data))
    at_most_2 = Measuring(tokenizer, image_processor, SYSTEM, max_images=2)
    with pytest.raises(DataErrors) as excinfo:
        checked_rows(str(data), rows, [], at_most_2, False, World.single())
    assert excinfo.value.lines[0] == f"{data}: row 2: 3 images, more than --max-images-per-sample 2"
    kept = checked_rows(str(data), rows, [], at_most_2, True, World.single())  # --skip-bad-rows
    assert [r.number for r in kept.rows] == [1] and kept.skipped_bad == 1
    assert len(checked_rows(str(data), rows, [], Measuring(tokenizer, image_processor, SYSTEM), False,
                            World.single()).rows) == 2
    flags = ["--train-data", str(data), "--model-name-or-path", tiny_bundle["model_dir"], "--workers", "1"]
    assert main(flags + ["--max-images-per-sample", "2"]) == 2
    assert f"{data}: row 2: 3 images, more than --max-images-per-sample 2" in capsys.readouterr().out
