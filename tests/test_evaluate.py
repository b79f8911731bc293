"""The evaluation pass (ftloop.steps.evaluate): one reduction per evaluation and no host read per batch, however
many batches; a batch that fails to load still runs a forward (so the ranks' all-gathers stay in step) and the
failure is raised at the end. (Two real ranks, one failing mid-evaluation: tests/test_resume.py.)"""

import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from ftloop import steps
from ftloop.data.batches import make_collate
from ftloop.errors import DataError, RowFailedMidRun
from ftloop.loss import IGNORE_INDEX

SYNCING = {"_local_scalar_dense", "nonzero", "item"}  # ops that wait for the device on CUDA


class SyncCounter(TorchDispatchMode):
    """Syncing ops, but those of the loader's collate (host work, in its worker processes in a run)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING and not any(
                frame.name == "collate" for frame in traceback.extract_stack()):
            self.count += 1
        return func(*args, **(kwargs or {}))


class Rows(Dataset):
    """Row k: k + 2 tokens, all supervised; the row in `bad` fails to load, as a deleted image does."""

    def __init__(self, count: int, bad: int | None = None):
        self.count, self.bad = count, bad

    def __len__(self):
        return self.count

    def __getitem__(self, k):
        if k == self.bad:
            raise DataError(f"eval.json: row {k + 1}: image not found: gone.png")
        return {"input_ids": torch.arange(3, k + 5), "labels": torch.arange(3, k + 5)}


class Scorer(nn.Module):
    """(sum of the supervised token ids, their count): the loss a batch gives, on the device, as the model's."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, input_ids, labels, **_):
        self.batches.append(input_ids)
        supervised = labels != IGNORE_INDEX
        return (labels * supervised).sum().float(), supervised.sum()


def loader(rows: Dataset) -> DataLoader:
    return DataLoader(rows, batch_sampler=[[k] for k in range(len(rows))], collate_fn=make_collate(0, 1, 2))


@pytest.mark.parametrize("batches", [2, 6])
def test_one_reduction_and_a_fixed_number_of_host_reads_per_evaluation(monkeypatch, batches):
    reductions = []
    reduce = steps.all_reduce_sum
    monkeypatch.setattr(steps, "all_reduce_sum", lambda *a: reductions.append(a) or reduce(*a))
    model = Scorer()
    with SyncCounter() as syncs:
        loss = steps.evaluate(model, loader(Rows(batches)), torch.device("cpu"))
    tokens = [list(range(3, k + 5)) for k in range(batches)]
    assert loss == pytest.approx(sum(map(sum, tokens)) / sum(map(len, tokens)))
    assert len(reductions) == 1 and len(model.batches) == batches
    # after the last batch, the failure vote and the mean; the third is the DataLoader's seed for its iterator, read
    # from a CPU generator (no device to wait for): none per batch
    assert syncs.count == 3


def test_a_batch_that_fails_still_runs_a_forward_and_the_failure_is_raised_after_the_last(monkeypatch):
    model = Scorer()
    with pytest.raises(RowFailedMidRun, match=r"eval.json: row 2: image not found: gone.png"):
        steps.evaluate(model, loader(Rows(4, bad=1)), torch.device("cpu"))
    assert len(model.batches) == 4  # every batch's forward, as on the ranks that did not fail
    assert model.batches[1].tolist() == [[0]]  # the failed batch's stand-in: one token, nothing supervised
    assert model.training
