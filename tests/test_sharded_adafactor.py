"""Adafactor under FSDP1 sharding equals single-process transformers Adafactor on the unwrapped model."""

import os

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from launch import REPO, check, forked_torchrun

WORKER = os.path.join(REPO, "tests", "adafactor_worker.py")


def reference(case: str) -> dict:
    """transformers' Adafactor, one process, same model, batches, decay mask and per-part lr."""
    import adafactor_worker as w

    model = w.toy_model()
    kwargs = dict(w.CASES[case])
    base_lr = kwargs.pop("lr", None)
    groups = {}
    for name, p in model.named_parameters():
        scale, decay = w.settings_for(case)(name, tuple(p.shape))
        groups.setdefault((scale, decay), []).append(p)
    wd = kwargs.pop("weight_decay", 0.0)
    optimizer = HFAdafactor([{"params": ps, "weight_decay": wd if decay else 0.0,
                              **({"lr": base_lr * scale} if base_lr else {})}
                             for (scale, decay), ps in groups.items()], lr=base_lr, **kwargs)
    for x, y in w.batches():
        optimizer.zero_grad()
        w.loss_on(model, x, y, w.GLOBAL_BATCH).backward()
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_adafactor")
    results = {}
    for world in (1, 2, 4):
        path = out / f"w{world}.pt"
        check(forked_torchrun(world, [WORKER, str(path), "0,1"], timeout=300))  # flat shards and original parameters
        for orig, results_of_one in torch.load(path).items():
            results[world, orig] = results_of_one
    return results


def max_relative_difference(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)


@pytest.mark.parametrize("case", ["hf_trainer", "hf_trainer_beta1_wd", "paper", "paper_beta1_wd"])
def test_same_parameters_at_every_world_size(runs, case):
    want = reference(case)
    for (world, orig), result in runs.items():
        difference = max_relative_difference(result[case]["params"], want)
        assert difference <= 1e-5, (case, world, orig, difference)



def test_a_plain_adafactor_on_flat_shards_drifts_with_the_world_size(runs):
    """The control: without shape recovery the result depends on how FSDP cut the parameters."""
    want = reference("plain_on_flat_shards")
    assert max_relative_difference(runs[1, 1]["plain_on_flat_shards"]["params"], want) <= 1e-5
    for world in (2, 4):
        assert max_relative_difference(runs[world, 0]["plain_on_flat_shards"]["params"], want) > 1e-3


def test_state_is_r_plus_c_per_matrix_on_every_rank(runs):
    """Factored statistics are O(R + C) floats per rank however the shard cuts the matrix; 1-D parameters
    keep a second moment only for their local slice. Exact byte count, hf_trainer case (no first moment)."""
    import adafactor_worker as w

    factored = unfactored_numel = unfactored_count = 0
    for p in w.toy_model().parameters():
        if p.dim() >= 2:
            rows = p.numel() // p.shape[-1]
            batches = rows // p.shape[-2]
            factored += rows + batches * p.shape[-1] + 1  # row stats, column stats, RMS
        else:
            unfactored_numel += p.numel()
            unfactored_count += 1
    for (world, orig), result in runs.items():
        per_rank = result["hf_trainer"]["state_bytes"]
        assert sum(per_rank) == 4 * (world * (factored + unfactored_count) + unfactored_numel), (world, orig)
        for rank_bytes in per_rank:
            assert rank_bytes <= 4 * (factored + unfactored_count + unfactored_numel)


def test_two_all_reduces_per_step_whatever_the_number_of_units(runs):
    """Statistics, then update RMS: one collective each for all four FSDP units together (none on one rank)."""
    for (world, orig), result in runs.items():
        assert result["hf_trainer"]["all_reduces_per_step"] == (2 if world > 1 else 0), (world, orig)


def test_state_dict_round_trip_continues_exactly(runs):
    for key, result in runs.items():
        straight, resumed = result["hf_trainer_beta1_wd"]["params"], result["resumed"]["params"]
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), key


SAVE_WORLD = 2


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    """Half the steps at world size 2, then model and optimizer saved with torch.distributed.checkpoint."""
    folder = tmp_path_factory.mktemp("dcp") / "checkpoint"
    check(forked_torchrun(SAVE_WORLD, [WORKER, str(folder) + ".unused", "1", "save", str(folder)]))
    return folder


@pytest.mark.parametrize("load_world", [2, 1, 4])
def test_dcp_checkpoint_reshards_optimizer_state(runs, dcp_checkpoint, tmp_path, load_world):
    """Optimizer state saved with torch.distributed.checkpoint at one world size continues at another."""
    out = tmp_path / "params.pt"
    check(forked_torchrun(load_world, [WORKER, str(out), "1", "load", str(dcp_checkpoint)]))
    resumed = torch.load(out)
    straight = runs[load_world, 1]["hf_trainer_beta1_wd"]["params"]
    if load_world == SAVE_WORLD:
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    else:
        assert max_relative_difference(resumed, straight) <= 1e-5


def test_per_part_learning_rates_and_decay_by_parameter_name(tiny_bundle):
    """--vision-lr, --merger-lr and --learning-rate by value on every parameter of a real Qwen2.5-VL layout; the
    reference test above shows ShardedAdafactor steps each part at its scaled rate, as transformers' would."""
    from ftloop.config import ModelArgs, OptimArgs
    from ftloop.model import build_meta_model, load_config
    from ftloop.optim.build import part_settings

    args = ModelArgs(model_name_or_path=tiny_bundle["model_dir"])
    model = build_meta_model(load_config(args), args)
    optim = OptimArgs(learning_rate=1e-5, vision_lr=2e-6, merger_lr=4e-5)
    parts = {"model.visual.merger.": 4e-5, "model.visual.": 2e-6, "model.language_model.": 1e-5, "lm_head.": 1e-5}
    lrs, decayed = {}, set()
    for name, p in model.named_parameters():
        scale, decay = part_settings(optim)(name, tuple(p.shape))
        part = next(prefix for prefix in parts if name.startswith(prefix))
        lrs.setdefault(part, set()).add(round(optim.learning_rate * scale, 12))
        decayed.add((p.dim() >= 2) == decay)
    assert lrs == {part: {lr} for part, lr in parts.items()}
    assert decayed == {True}  # decay on matrices only, never on biases and norm weights
    same = part_settings(OptimArgs(learning_rate=1e-5))
    assert {same(name, tuple(p.shape))[0] for name, p in model.named_parameters()} == {1.0}
