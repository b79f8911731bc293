"""How rows become steps: grouped by length without reordering learning, packed without crossing rows,
balanced across ranks; and the first N eval rows of --max-eval-samples."""

import random
import statistics

import pytest

from ftloop.distributed import World
from ftloop.config import parse_args
from ftloop.data.batches import eval_batches
from ftloop.data.loaders import build_eval_loader, build_loaders
from ftloop.data.sampler import StepBatchSampler
from ftloop.model import load_config
from launch import train_flags


def mixed_lengths(n: int = 4000, seed: int = 0) -> list[int]:
    """Lengths of a mixed set: short answers, long captions, text-only rows and a few multi-image rows."""
    rng = random.Random(seed)
    kinds = [(0.45, 30, 80), (0.35, 300, 700), (0.15, 15, 40), (0.05, 1200, 2000)]
    out = []
    for _ in range(n):
        x, acc = rng.random(), 0.0
        for share, low, high in kinds:
            acc += share
            if x < acc:
                break
        out.append(rng.randint(low, high))
    return out


def steps(samplers: list[StepBatchSampler]) -> list[list[list]]:
    """Per step, per rank: the units of each of its micro-batches, concatenated."""
    iters = [iter(s) for s in samplers]
    out = []
    for _ in range(samplers[0].steps_per_epoch):
        out.append([[u for _ in range(s.accumulation) for u in next(it)] for s, it in zip(samplers, iters)])
    return out


def unit_tokens(unit, lengths) -> int:
    return sum(lengths[i] for i in unit) if isinstance(unit, tuple) else lengths[unit]


def padding(samplers, lengths) -> float:
    """1 - real / padded positions over the epoch (each micro-batch padded to its longest unit)."""
    real = padded = 0
    for s in samplers:
        for batch in s:
            sizes = [unit_tokens(u, lengths) for u in batch]
            real, padded = real + sum(sizes), padded + len(sizes) * max(sizes)
    return 1 - real / padded


def rank_balance(samplers, lengths) -> float:
    """As the loop logs it: per step, the sum over accumulation rounds of the most positions (padding included)
    any rank had, over the sum of the mean over ranks; the mean over steps."""
    ratios = []
    accumulation = samplers[0].accumulation
    iters = [iter(s) for s in samplers]
    for _ in range(samplers[0].steps_per_epoch):
        rounds = [[len(b) * max(unit_tokens(u, lengths) for u in b) for b in (next(it) for it in iters)]
                  for _ in range(accumulation)]
        ratios.append(sum(max(r) for r in rounds) / sum(sum(r) / len(r) for r in rounds))
    return sum(ratios) / len(ratios)


def make(lengths, world=4, micro=4, accum=2, mega_steps=50, **kw):
    return [StepBatchSampler(len(lengths), world, r, micro, accum, seed=7, lengths=lengths, mega_steps=mega_steps,
                             **kw) for r in range(world)]


def sorted_mega_batches_padding(lengths, world=4, micro=4, accum=2, mega_steps=50) -> float:
    """The grouping ftloop had before: each mega-batch sorted longest first, its steps in that order."""
    order = list(range(len(lengths)))
    random.Random(7 * 1_000_003).shuffle(order)
    mega = mega_steps * world * micro * accum
    order = [i for s in range(0, len(order), mega) for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    real = padded = 0
    for start in range(0, len(order) - len(order) % micro, micro):
        sizes = [lengths[i] for i in order[start:start + micro]]
        real, padded = real + sum(sizes), padded + micro * max(sizes)
    return 1 - real / padded


def rank_correlation(xs: list[float]) -> float:
    """Spearman's rank correlation of xs with their position."""
    ranks = {i: r for r, i in enumerate(sorted(range(len(xs)), key=lambda i: xs[i]))}
    n = len(xs)
    return 1 - 6 * sum((ranks[i] - i) ** 2 for i in range(n)) / (n * (n * n - 1))


@pytest.mark.parametrize("world, micro, accum", [(2, 4, 1), (1, 4, 4), (4, 2, 2)])
def test_grouping_within_a_step_changes_no_step_and_cuts_padding(world, micro, accum):
    """The default window of one step: every step holds the rows it holds without grouping (so the same
    gradient), only laid out so that similar lengths share a micro-batch."""
    lengths = mixed_lengths(2000)
    grouped = make(lengths, world, micro, accum, mega_steps=1)
    plain = make(lengths, world, micro, accum, group_by_length=False)
    assert [sorted(u for rank in step for u in rank) for step in steps(grouped)] == \
        [sorted(u for rank in step for u in rank) for step in steps(plain)]
    grouped_padding, plain_padding = padding(grouped, lengths), padding(plain, lengths)
    print(f"{world}x{micro}x{accum}: padding {grouped_padding:.3f} grouped in the step, {plain_padding:.3f} not")
    assert grouped_padding < 0.8 * plain_padding


def test_grouped_steps_come_in_shuffled_order_with_the_padding_of_sorted_mega_batches():
    """--length-group-steps 50."""
    lengths = mixed_lengths()
    grouped = make(lengths)
    means = [sum(unit_tokens(u, lengths) for rank in step for u in rank) / 32 for step in steps(grouped)]
    assert len(means) == 4000 // 32
    for start in range(0, len(means) - 49, 50):  # each mega-batch's worth of steps
        window = means[start:start + 50]
        assert window != sorted(window, reverse=True) and abs(rank_correlation(window)) < 0.4
    # Long and short steps alternate: many direction changes, as in a random order.
    changes = sum((a - b) * (b - c) < 0 for a, b, c in zip(means, means[1:], means[2:]))
    assert changes > len(means) / 3
    # Each step holds long and short rows as the data does: its mean length varies about as much as a random
    # step's (82 against 70 tokens here; steps of buckets of one length would vary 5x as much, tried).
    plain = make(lengths, group_by_length=False)
    plain_means = [sum(unit_tokens(u, lengths) for rank in step for u in rank) / 32 for step in steps(plain)]
    print(f"per-step mean length: spread {statistics.pstdev(means):.0f} grouped, {statistics.pstdev(plain_means):.0f}"
          " random")
    assert statistics.pstdev(means) < 1.25 * statistics.pstdev(plain_means)
    grouped_padding, before = padding(grouped, lengths), sorted_mega_batches_padding(lengths)
    plain_padding = padding(plain, lengths)
    print(f"padding: grouped {grouped_padding:.3f}, sorted mega-batches {before:.3f}, plain {plain_padding:.3f}")
    assert grouped_padding <= 1.5 * before and grouped_padding < 0.3 * plain_padding


@pytest.mark.parametrize("world, micro, accum", [(2, 1, 4), (4, 1, 2), (8, 1, 1)])
def test_packed_steps_are_the_same_at_any_world_size_and_balanced(world, micro, accum):
    lengths = mixed_lengths(2000)
    reference = [sorted(u for rank in step for u in rank) for step in steps(make(lengths, 1, 1, 8, pack_tokens=2048))]
    packed = make(lengths, world, micro, accum, pack_tokens=2048)
    assert [sorted(u for rank in step for u in rank) for step in steps(packed)] == reference
    units = packed[0].units()
    assert sorted(i for u in units for i in u) == list(range(2000))  # every row once
    assert max(unit_tokens(u, lengths) for u in units) <= 2048
    balance = rank_balance(packed, lengths)
    print(f"packed {world}x{micro}x{accum}: rank balance {balance:.3f}, padding {padding(packed, lengths):.3f}")
    assert balance < 1.1
    assert rank_balance(make(lengths, world, micro, accum, pack_tokens=2048, group_by_length=False), lengths) < 1.1


def loaders(bundle, out, *extra):
    cfg = parse_args(train_flags(bundle, out, "--eval-data", bundle["eval_json"], *extra))
    from ftloop.data.encode import load_tokenizer_and_processor
    tokenizer, processor = load_tokenizer_and_processor(bundle["model_dir"], None, None)
    return cfg, tokenizer, processor, load_config(cfg.model)


@pytest.mark.parametrize("truncation", ["drop", "right"])
def test_a_row_longer_than_a_pack_is_dropped_or_cut_as_truncation_says(tiny_bundle, tmp_path, capsys, truncation):
    cfg, tokenizer, processor, hf_config = loaders(tiny_bundle, tmp_path, "--packing", "--max-seq-length", "36",
                                                   "--truncation", truncation)
    loader, sampler, _ = build_loaders(cfg, tokenizer, processor, hf_config, World.single())
    said = capsys.readouterr().out
    if truncation == "drop":
        assert "rows longer than --max-seq-length 36" in said and sampler.num_rows < 16
    else:
        assert sampler.num_rows == 16
    batches = list(loader)
    assert batches and all(b["input_ids"].shape[1] <= 36 for b in batches)
    assert all(sum(b["segment_lengths"]) == b["input_ids"].numel() for b in batches)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_max_eval_samples_takes_the_first_rows_at_every_world_size(tiny_bundle, tmp_path, world):
    cfg, tokenizer, processor, hf_config = loaders(tiny_bundle, tmp_path, "--max-eval-samples", "3")
    loader = build_eval_loader(cfg, tokenizer, processor, hf_config, World.single())
    assert len(loader.dataset) == 3
    seen = [i for rank in range(world) for batch in eval_batches(len(loader.dataset), world, rank, 1) for i in batch
            if i >= 0]  # what each rank's loader takes of those rows (ftloop.data.loaders builds it so)
    assert sorted(seen) == [0, 1, 2]


def test_the_steps_of_packed_epochs_are_counted_epoch_by_epoch():
    """Each epoch packs its own permutation into its own number of sequences: the run's steps are the sum."""
    rng = random.Random(1)
    # Three windows of rows packed apart (PACK_WINDOW_ROWS), no short rows to fill gaps: the counts vary.
    lengths = [rng.randint(300, 1500) for _ in range(9000)]
    [sampler] = make(lengths, 1, 1, 1, pack_tokens=2048)
    per_epoch = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        per_epoch.append(sampler.steps_per_epoch)
    sampler.set_epoch(0)
    print(f"packed steps per epoch: {per_epoch}")
    assert len(set(per_epoch)) > 1  # they do differ here
    assert sampler.steps_in(3) == sum(per_epoch)
    assert sampler.steps_in(2.5) == per_epoch[0] + per_epoch[1] + -(-per_epoch[2] // 2)
    plain = make(lengths, 2, 2, 2)[0]
    assert plain.steps_in(1.5) == -(-9000 // 8 * 3 // 2)
