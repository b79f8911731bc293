"""What every family's 2-process run must give (tests/test_qwen3_vl.py, tests/test_qwen3_5.py): run `flags` (3 steps,
a checkpoint at step 2, fp32 saves) at 2 processes of `two` rows each into `out`, then check that the checkpoint's
offline export loads with `model_class.from_pretrained` and gives the trained model's logits exactly, that a run
resumed from step 2 ends bit for bit where the straight one did, and that one process with the same global batch
in two micro-batches gives the same weights (sharded Adafactor over other shards, 1e-5)."""

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText

from ftloop.export import export_checkpoint
from launch import check, checkpoint_state, forked_python_m, forked_torchrun, resume_a_copy, train_flags


def train_export_resume_and_one_process(bundle: dict, tmp_path, flags: list[str], model_class):
    """The straight run's stdout and its `final` tensors, after the checks above."""
    two = ["--per-device-train-batch-size", "2"]
    out = tmp_path / "run"
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(bundle, out, *flags, *two,
                                                                          "--save-steps", "2")]))
    final = load_file(out / "final" / "model.safetensors")

    export_checkpoint(str(out / "checkpoint-2"), str(tmp_path / "exported"), save_dtype="fp32")
    state = {k.removeprefix("hf."): v for k, v in checkpoint_state(out / "checkpoint-2")["model"].items()}
    trained = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(bundle["model_dir"]))
    assert not trained.load_state_dict(state, strict=False).missing_keys
    reloaded = model_class.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    assert type(reloaded) is type(trained)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, trained.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)

    resumed = tmp_path / "resumed"
    resume_a_copy(bundle, out, resumed, [*flags, *two], step=2)
    again = load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)

    alone = tmp_path / "alone"
    check(forked_python_m("ftloop.train", train_flags(bundle, alone, *flags, "--per-device-train-batch-size", "2",
                                                      "--gradient-accumulation-steps", "2")))
    one = load_file(alone / "final" / "model.safetensors")
    for name, tensor in final.items():  # atol: 1% of one update at lr 1e-3 (sums in another order differ so)
        assert torch.allclose(one[name], tensor, rtol=1e-5, atol=1e-5), (name, (one[name] - tensor).abs().max())
    return result.stdout, final
