"""The log window: data wait and rank balance are recorded per logged step, and a run whose steps wait for
data is told once what to change."""

import json

import pytest
import torch

from ftloop.data.loaders import Step
from ftloop.distributed import World
from ftloop.metrics import MetricsLogger, StepWindow


class Bar:
    def set_postfix(self, **values):
        self.postfix = values


def window_of(window: StepWindow, steps: int, step_time: float, data_wait: float, balance: float = 1.0):
    for _ in range(steps):
        window.add(torch.tensor(0.5), Step([], torch.tensor(10.0), torch.tensor([90.0, 100.0], dtype=torch.float64),
                                         torch.tensor(balance, dtype=torch.float64), data_wait,
                                         torch.tensor([400.0, 16.0], dtype=torch.float64)))
    window.started -= steps * step_time  # as if the steps had taken that long


def test_data_wait_is_logged_and_a_slow_data_path_is_warned_once(tmp_path, capsys):
    world = World(0, 0, 1, torch.device("cpu"), "gloo", 1)
    logger, bar = MetricsLogger(str(tmp_path), True, "none", "", "", {}), Bar()
    window = StepWindow(world, loader_workers=1)
    window_of(window, 2, step_time=1.0, data_wait=0.5, balance=1.3)  # the first window: start-up, not warned
    window.log(logger, bar, 2, 1e-3, 1.0, 0, 100)
    assert "waiting for data" not in capsys.readouterr().err
    window_of(window, 2, step_time=1.0, data_wait=0.05)  # 5%: fine
    window.log(logger, bar, 4, 1e-3, 1.0, 0, 200)
    assert "waiting for data" not in capsys.readouterr().err
    window_of(window, 2, step_time=1.0, data_wait=0.3)
    window.log(logger, bar, 6, 1e-3, 1.0, 0, 300)
    warning = capsys.readouterr().err
    assert "steps spend 30% of their time waiting for data" in warning and "--dataloader-num-workers (now 1" in warning
    window_of(window, 2, step_time=1.0, data_wait=0.3)
    window.log(logger, bar, 8, 1e-3, 1.0, 0, 400)
    assert "waiting for data" not in capsys.readouterr().err  # once per run
    logger.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [round(r["data_wait_s"], 6) for r in records] == [0.5, 0.05, 0.3, 0.3]
    assert [round(r["rank_tokens_max_over_mean"], 6) for r in records] == [1.3, 1.0, 1.0, 1.0]
    assert bar.postfix["wait"] == "0.30s"


def test_rank_balance_is_the_slowest_rank_of_each_round_over_the_mean(monkeypatch):
    """Two ranks, two micro-batches each: positions 8 and 2 here, 4 and 6 on the other rank. The rounds take
    max(8, 4) + max(2, 6) = 14 against means 6 + 4 = 10: 1.4 (a step-total view would say 10/10 = 1)."""
    import ftloop.data.loaders

    def batch(rows, length, real):
        mask = torch.zeros(rows, length, dtype=torch.long)
        mask.view(-1)[:real] = 1
        return {"attention_mask": mask, "labels": torch.where(mask.bool(), 5, -100)}

    other_rank = [3.0, 7.0, 10.0, 0.0, 0.0, 0.0, 50.0, 16.0, 4.0, 6.0]
    monkeypatch.setattr(ftloop.data.loaders, "all_gather_rows",
                        lambda values, device: torch.tensor([values, other_rank], dtype=torch.float64))
    world = World(0, 0, 2, torch.device("cpu"), "gloo", 2)
    counts, votes = ftloop.data.loaders.count_step([batch(2, 4, 7), batch(1, 2, 2)], world, rounds=2)
    assert votes == [0.0, 0.0, 0.0]
    assert float(counts.rank_balance) == pytest.approx(1.4)
    assert counts.tokens.tolist() == [16.0, 20.0] and float(counts.targets) == 3 + (3 + 2) + 1  # labels shifted
    # the work its FLOPs are counted from: squared row lengths (4^2 + 3^2 + 2^2 here) and patches, both ranks
    assert counts.work.tolist() == [4 * 4 + 3 * 3 + 2 * 2 + 50.0, 16.0]


@pytest.mark.parametrize("ranks", [1, 2])
def test_mfu_is_the_window_s_model_flops_over_its_time_and_the_ranks_peaks(tmp_path, monkeypatch, ranks):
    """The step's counts are already every rank's (the step's collective), so the FLOPs are divided by the peak
    of all the ranks."""
    import ftloop.metrics
    from ftloop.flops import FlopModel

    monkeypatch.setattr(ftloop.metrics, "all_gather_rows",  # every rank logs what this one does
                        lambda values, device: torch.tensor([values] * ranks, dtype=torch.float64))
    world = World(0, 0, ranks, torch.device("cpu"), "gloo", ranks)
    logger, bar = MetricsLogger(str(tmp_path), True, "none", "", "", {}), Bar()
    flops = FlopModel(per_token=6, per_supervised_token=60, per_patch=2, layers=1, attention_width=3)
    window = StepWindow(world, 1, flops, peak_flops=1000.0)
    window_of(window, 2, step_time=1.0, data_wait=0.0)  # 90 tokens, 10 supervised, 400 pairs, 16 patches a step
    window.log(logger, bar, 2, 1e-3, 1.0, 0, 100)
    logger.close()
    [record] = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    per_step = 6 * 90 + 60 * 10 + 12 * 1 * 3 * 400 + 2 * 16
    assert record["mfu"] == pytest.approx(per_step / 1000.0 / ranks, rel=1e-3)  # 2 steps in 2 s, ranks x 1000 FLOP/s
    assert bar.postfix["mfu"] == f"{record['mfu']:.1%}"
