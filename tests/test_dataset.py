"""Samples, collation and the order in which ranks see rows."""

import dataclasses

import pytest
import torch

from datautil import SYSTEM, one_line_error, save_rgb
from ftloop.loss import IGNORE_INDEX
from ftloop.data.batches import EvalDataset, SFTDataset, eval_batches, make_collate, make_packed_collate
from ftloop.data.sampler import StepBatchSampler
from ftloop.data.layouts import load_rows
from ftloop.data.rows import Row
from ftloop.errors import DataError

# ------------------------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def ids(tokenizer):
    names = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>", "<|video_pad|>"]
    return dict(zip(names, tokenizer.convert_tokens_to_ids(names)))


@pytest.fixture(scope="module")
def bundle_rows(tiny_bundle):
    return load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"])


def image_row(paths, reply="red") -> Row:
    placeholders = "".join("<image>" for _ in paths)
    return Row([{"role": "user", "content": placeholders + "\nWhat color?"}, {"role": "assistant", "content": reply}],
               [str(p) for p in paths])


def numbered(rows: list[Row]) -> list[Row]:
    """The rows as a source numbers them, from 1 (a message about a row names its number)."""
    return [dataclasses.replace(row, number=n) for n, row in enumerate(rows, start=1)]


def text_row(reply="nine") -> Row:
    return Row([{"role": "user", "content": "What is 4 plus 5?"}, {"role": "assistant", "content": reply}])


def test_dataset_image_row(tokenizer, image_processor, ids, bundle_rows):
    ds = SFTDataset(bundle_rows, tokenizer, image_processor, 4096, SYSTEM)
    assert len(ds) == 16
    s = ds[0]
    assert set(s) == {"pixel_values", "image_grid_thw", "input_ids", "labels"}
    grid = s["image_grid_thw"]
    assert grid.shape == (1, 3)
    n_pad = int((s["input_ids"] == ids["<|image_pad|>"]).sum())
    assert n_pad == int(grid.prod()) // image_processor.merge_size**2 > 0
    assert s["pixel_values"].shape[0] == int(grid.prod())
    assert s["input_ids"].dtype == torch.long and s["labels"].shape == s["input_ids"].shape
    assert (s["labels"][s["labels"] != IGNORE_INDEX] != ids["<|image_pad|>"]).all()


def test_dataset_multi_image_counts(tmp_path, tokenizer, image_processor, ids):
    # different aspect ratios give different grids; the pad runs must follow the images in order
    paths = [save_rgb(tmp_path / "wide.png", (112, 56)), save_rgb(tmp_path / "sq.png", (56, 56)),
             save_rgb(tmp_path / "tall.png", (56, 168))]
    s = SFTDataset([image_row(paths)], tokenizer, image_processor, 4096, SYSTEM)[0]
    grid = s["image_grid_thw"]
    counts = (grid.prod(-1) // image_processor.merge_size**2).tolist()
    assert len(set(counts)) > 1
    assert s["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    input_ids = s["input_ids"].tolist()
    runs, i = [], 0
    while i < len(input_ids):
        if input_ids[i] == ids["<|vision_start|>"]:
            j = input_ids.index(ids["<|vision_end|>"], i)
            runs.append(j - i - 1)
            i = j
        i += 1
    assert runs == counts


def test_dataset_text_row(tokenizer, image_processor, bundle_rows):
    ds = SFTDataset(bundle_rows, tokenizer, image_processor, 4096, SYSTEM)
    s = ds[3]
    assert set(s) == {"input_ids", "labels"}
    assert (s["labels"] != IGNORE_INDEX).any()


def test_dataset_truncates_text_after_last_image(tmp_path, tokenizer, image_processor, ids):
    path = save_rgb(tmp_path / "a.png")
    row = image_row([path], reply="the quick brown fox jumps over the lazy dog " * 8)
    full = SFTDataset([row], tokenizer, image_processor, 4096, SYSTEM)[0]
    n = len(full["input_ids"])
    vision_end = full["input_ids"].tolist().index(ids["<|vision_end|>"])
    for limit in (n - 1, vision_end + 5, vision_end + 1):  # vision_end + 1: the image just fits
        s = SFTDataset([row], tokenizer, image_processor, limit, SYSTEM)[0]
        assert len(s["input_ids"]) == len(s["labels"]) == limit
        assert torch.equal(s["input_ids"], full["input_ids"][:limit])
        assert torch.equal(s["labels"], full["labels"][:limit])
        assert torch.equal(s["pixel_values"], full["pixel_values"])
    assert len(SFTDataset([row], tokenizer, image_processor, n, SYSTEM)[0]["input_ids"]) == n  # no cut when it fits exactly


def test_dataset_truncates_text_row(tokenizer, image_processor):
    row = text_row("one two three four five six seven eight nine ten " * 5)
    full = SFTDataset([row], tokenizer, image_processor, 4096, SYSTEM)[0]
    s = SFTDataset([row], tokenizer, image_processor, 20, SYSTEM)[0]
    assert len(full["input_ids"]) > 20
    assert torch.equal(s["input_ids"], full["input_ids"][:20])
    assert torch.equal(s["labels"], full["labels"][:20])


def test_dataset_refuses_to_cut_an_image(tmp_path, tokenizer, image_processor, ids):
    path = save_rgb(tmp_path / "a.png")
    rows = numbered([text_row(), image_row([path], reply="long " * 30)])
    full = SFTDataset(rows, tokenizer, image_processor, 4096, SYSTEM, source="train.json")[1]
    vision_end = full["input_ids"].tolist().index(ids["<|vision_end|>"])
    for limit in (vision_end, vision_end - 2, 5):
        with pytest.raises(DataError) as excinfo:
            SFTDataset(rows, tokenizer, image_processor, limit, SYSTEM, source="train.json")[1]
        one_line_error(excinfo, "train.json: row 2", str(limit))


def test_dataset_bad_image_names_row(tmp_path, tokenizer, image_processor):
    rows = numbered([text_row(), image_row([tmp_path / "gone.png"])])
    with pytest.raises(DataError) as excinfo:
        SFTDataset(rows, tokenizer, image_processor, 4096, SYSTEM, source="train.json")[1]
    one_line_error(excinfo, "train.json: row 2", str(tmp_path / "gone.png"))


# ------------------------------------------------------------------------------------------------ collate


def test_collate_mixed_batch(tokenizer, image_processor, ids, bundle_rows):
    ds = SFTDataset(bundle_rows, tokenizer, image_processor, 4096, SYSTEM)
    samples = [ds[0], ds[3], ds[1]]  # image, text-only, image
    pad = ids["<|endoftext|>"]
    batch = make_collate(pad, ids["<|image_pad|>"])(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1
    length = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, length)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][i, :n], s["input_ids"])
        assert torch.equal(batch["labels"][i, :n], s["labels"])
        assert (batch["input_ids"][i, n:] == pad).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i, :n].eq(1).all() and batch["attention_mask"][i, n:].eq(0).all()
    is_image = batch["input_ids"] == ids["<|image_pad|>"]
    assert torch.equal(batch["mm_token_type_ids"].bool(), is_image)
    assert set(batch["mm_token_type_ids"].unique().tolist()) == {0, 1}
    assert int(is_image[1].sum()) == 0
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"],
                       torch.cat([samples[0]["image_grid_thw"], samples[2]["image_grid_thw"]]))
    assert int(is_image.sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // image_processor.merge_size**2
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long


class CollatedOnce(torch.utils.data.Dataset):
    """One item: the batch `collate` makes of `items` (in a DataLoader worker, when the loader has workers)."""

    def __init__(self, items, collate):
        self.items, self.collate = items, collate

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.collate(self.items)


def test_a_loader_worker_sends_a_batch_in_one_buffer(tokenizer, image_processor, ids, bundle_rows):
    """A worker hands each storage over with a file descriptor of its own, which the training process maps one at a
    time; the collates put every tensor of a batch (token ids, masks, boolean segment masks, pixels) in one."""
    ds = SFTDataset(bundle_rows, tokenizer, image_processor, 4096, SYSTEM)
    samples = [ds[0], ds[3], ds[1]]
    packed = make_packed_collate(ids["<|endoftext|>"], ids["<|image_pad|>"])
    assert packed([samples])["segment_mask"].dtype == torch.bool
    for collate, items in ((make_collate(ids["<|endoftext|>"], ids["<|image_pad|>"]), samples),
                           (packed, [samples[:2], samples[2:]])):
        here = collate(items)  # no worker: as it was made
        there = next(iter(torch.utils.data.DataLoader(CollatedOnce(items, collate), batch_size=None, num_workers=1)))
        assert here.keys() == there.keys()
        tensors = [key for key, value in here.items() if torch.is_tensor(value)]
        for key in tensors:
            assert there[key].dtype == here[key].dtype and torch.equal(there[key], here[key]), key
        assert len({there[key].untyped_storage().data_ptr() for key in tensors}) == 1
        assert len({here[key].untyped_storage().data_ptr() for key in tensors}) == len(tensors) > 5


def test_collate_text_only_batch(tokenizer, image_processor, ids, bundle_rows):
    ds = SFTDataset(bundle_rows, tokenizer, image_processor, 4096, SYSTEM)
    batch = make_collate(ids["<|endoftext|>"], ids["<|image_pad|>"], ids["<|video_pad|>"])([ds[3], ds[15]])
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert not batch["mm_token_type_ids"].any()


def test_collate_synthetic_pad_and_video():
    samples = [{"input_ids": torch.tensor([5, 7, 7, 9]), "labels": torch.tensor([-100, -100, -100, 9])},
               {"input_ids": torch.tensor([8, 6]), "labels": torch.tensor([-100, 6])}]
    batch = make_collate(0, 7, 8)(samples)
    assert batch["input_ids"].tolist() == [[5, 7, 7, 9], [8, 6, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9], [-100, 6, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [2, 0, 0, 0]]
    # the positions the loss counts, flattened (row x 4 + position): those whose next label is supervised
    assert batch["supervised_index"].tolist() == [2, 4]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids", "supervised_index"}


# ------------------------------------------------------------------------------------------------ samplers


def step_rows(num_rows, world, micro, accum, seed, epoch):
    """Rows each optimizer step covers, gathered over all ranks: list of sets."""
    per_rank = []
    for rank in range(world):
        sampler = StepBatchSampler(num_rows, world, rank, micro, accum, seed)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len(b) == micro for b in batches)
        per_rank.append(batches)
    steps = len(per_rank[0]) // accum
    assert all(len(b) == steps * accum for b in per_rank)
    return [set().union(*(set(b) for r in per_rank for b in r[s * accum:(s + 1) * accum])) for s in range(steps)]


@pytest.mark.parametrize("num_rows", [48, 50, 7])
def test_step_sampler_same_rows_per_step_at_any_world_size(num_rows):
    configs = [(1, 1, 4), (2, 1, 2), (4, 1, 1), (1, 2, 2), (2, 2, 1), (1, 4, 1)]  # world, micro, accum: 4 rows
    for epoch in (0, 3):
        reference = step_rows(num_rows, *configs[0], seed=11, epoch=epoch)
        assert len(reference) == num_rows // 4
        assert all(len(rows) == 4 for rows in reference)
        for world, micro, accum in configs[1:]:
            assert step_rows(num_rows, world, micro, accum, seed=11, epoch=epoch) == reference


def test_step_sampler_rows_at_most_once_per_epoch():
    for world, micro, accum in [(1, 3, 2), (2, 2, 3), (4, 1, 1), (3, 2, 2)]:
        seen = []
        for rank in range(world):
            seen += [i for b in StepBatchSampler(50, world, rank, micro, accum, seed=1) for i in b]
        global_batch = world * micro * accum
        assert len(seen) == len(set(seen)) == (50 // global_batch) * global_batch
        assert set(seen) <= set(range(50))


def test_step_sampler_ranks_disjoint_within_step():
    samplers = [StepBatchSampler(40, 2, r, 2, 2, seed=0) for r in range(2)]
    a, b = (list(s) for s in samplers)
    assert all(not set(x) & set(y) for x, y in zip(a, b))


def test_step_sampler_epoch_and_seed():
    sampler = StepBatchSampler(64, 2, 1, 2, 2, seed=5)
    first = list(sampler)
    assert list(sampler) == first  # deterministic for a given (seed, epoch)
    assert list(StepBatchSampler(64, 2, 1, 2, 2, seed=5)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(StepBatchSampler(64, 2, 1, 2, 2, seed=6)) != first
    # the order is a shuffle, not the identity
    assert [i for b in StepBatchSampler(64, 1, 0, 64, 1, seed=5) for i in b] != list(range(64))


@pytest.mark.parametrize("num_rows,world,micro,accum,expected",
                         [(50, 1, 1, 4, 48), (50, 2, 2, 1, 12), (50, 4, 1, 1, 12), (50, 3, 2, 2, 8),
                          (11, 4, 1, 3, 0), (12, 1, 3, 4, 4)])
def test_step_sampler_len(num_rows, world, micro, accum, expected):
    sampler = StepBatchSampler(num_rows, world, 0, micro, accum, seed=0)
    assert len(sampler) == expected
    assert len(list(sampler)) == expected
    assert sampler.steps_per_epoch * accum == expected


@pytest.mark.parametrize("num_rows,world,batch", [(8, 1, 3), (8, 3, 2), (7, 4, 2), (2, 4, 1), (10, 2, 5),
                                                  (13, 4, 3)])
def test_eval_batches(num_rows, world, batch):
    per_rank = [eval_batches(num_rows, world, rank, batch) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of forwards
    assert all(len(x) == batch for b in per_rank for x in b)
    flat = [i for b in per_rank for x in b for i in x]
    real = [i for i in flat if i >= 0]
    assert sorted(real) == list(range(num_rows))
    assert all(i == -1 for i in flat if i < 0)
    # no more batches than needed: the rank with most rows fills its last batch at least partly
    assert len(per_rank[0]) == -(-(-(-num_rows // world)) // batch)


def test_eval_dataset_filler(tokenizer, image_processor, bundle_rows):
    inner = SFTDataset(bundle_rows[:4], tokenizer, image_processor, 4096, SYSTEM)
    ds = EvalDataset(inner)
    assert len(ds) == 4
    real = ds[2]
    assert torch.equal(real["labels"], inner[2]["labels"]) and (real["labels"] != IGNORE_INDEX).any()
    filler = ds[-1]
    assert (filler["labels"] == IGNORE_INDEX).all()
    assert torch.equal(filler["input_ids"], inner[0]["input_ids"])
    assert filler["labels"].shape == filler["input_ids"].shape
    assert "pixel_values" in filler  # keeps row 0's images so the vision tower runs on every rank
    # collating real rows with fillers changes nothing about the real rows' supervision
    batch = make_collate(tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|image_pad|>"))([ds[i] for i in [1, -1]])
    assert (batch["labels"][1] == IGNORE_INDEX).all() and (batch["labels"][0] != IGNORE_INDEX).any()


def test_train_loader_integration(tiny_bundle, tokenizer, image_processor):
    """DataLoader over the sampler and collate, as build_train_loader wires them (no workers)."""
    from torch.utils.data import DataLoader

    rows = load_rows(tiny_bundle["train_json"], tiny_bundle["image_folder"])
    ds = SFTDataset(rows, tokenizer, image_processor, 4096, SYSTEM)
    seen = []
    for rank in range(2):
        sampler = StepBatchSampler(len(rows), 2, rank, 2, 2, seed=0)
        loader = DataLoader(ds, batch_sampler=sampler,
                            collate_fn=make_collate(tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|image_pad|>")))
        batches = list(loader)
        assert len(batches) == len(sampler) == 4
        for b in batches:
            assert b["input_ids"].shape[0] == 2
            if "pixel_values" in b:
                assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
        seen += [ids for ids in sampler]
    assert sorted(i for b in seen for i in b) == list(range(16))
