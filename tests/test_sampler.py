"""The sampler's resume position: a run that stops mid-epoch and continues (at the same or another world
size or global batch) sees exactly the rows of an uninterrupted run, in the same order."""

import pytest

from ftloop.data.sampler import StepBatchSampler


def rows_of_epoch(samplers: list[StepBatchSampler], steps: int | None = None) -> list[int]:
    """Rows consumed step by step by all ranks together, micro-batch k of every rank before k+1: that is
    the epoch's permutation order, whatever the layout."""
    iters = [iter(s) for s in samplers]
    first = samplers[0]
    out = []
    for _ in range(first.steps_left_in_epoch if steps is None else steps):
        micro = [[next(it) for _ in range(first.accumulation)] for it in iters]
        out.append([i for k in range(first.accumulation) for rank in micro for i in rank[k]])
        for s in samplers:
            s.advance()
    return out


def make(world: int, micro: int, accum: int, lengths=None) -> list[StepBatchSampler]:
    return [StepBatchSampler(103, world, r, micro, accum, seed=5, lengths=lengths, mega_steps=3) for r in range(world)]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("resume_layout", [(2, 1, 2), (1, 1, 4), (4, 1, 1), (1, 2, 1), (1, 3, 2)])
def test_resume_continues_the_same_rows(grouped, resume_layout):
    lengths = [(i * 37) % 91 for i in range(103)] if grouped else None
    whole = [i for step in rows_of_epoch(make(2, 1, 2, lengths)) for i in step]

    first = make(2, 1, 2, lengths)
    done = [i for step in rows_of_epoch(first, steps=7) for i in step]
    state = first[0].state_dict()
    assert state["epoch"] == 0 and state["position"] == 28

    resumed = make(*resume_layout, lengths)
    for s in resumed:
        s.load_state_dict(state)
    rest = [i for step in rows_of_epoch(resumed) for i in step]
    seen = done + rest
    assert len(seen) == len(set(seen))  # nothing repeated
    # The same row order, cut into other steps when the global batch changed; only the partial block the
    # epoch drops at its end differs in length.
    shorter = min(len(seen), len(whole))
    assert seen[:shorter] == whole[:shorter]
    assert len(whole) - 4 < len(seen) <= 103


def test_position_resets_each_epoch_and_state_round_trips():
    [s] = make(1, 2, 2)
    rows_of_epoch([s], steps=3)
    assert s.state_dict()["position"] == 12
    s.set_epoch(1)
    assert s.state_dict()["position"] == 0 and s.state_dict()["epoch"] == 1
    assert len(s) == s.steps_per_epoch * s.accumulation
    [t] = make(1, 2, 2)
    t.load_state_dict({**s.state_dict(), "position": 8})
    assert len(t) == (103 - 8) // 4 * 2
    assert next(iter(t)) == list(iter(s))[2 * 2]  # epoch 1, step 2, first micro-batch
