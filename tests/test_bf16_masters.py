"""bf16 master weights under ShardedAdafactor: compensated updates learn as fp32 masters do at a fine-tuning
learning rate (plain rounding does not), stochastic rounding is unbiased, the Kahan buffer is checkpointed, and
a step's temporaries are those of one chunk of a tensor at a time."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ftloop.optim.segments import Segment, SteppedTensor
from ftloop.optim.adafactor import ShardedAdafactor, round_stochastically_
from launch import REPO, env


def optimizer_for(params, rounding, **kwargs):
    layout = [SteppedTensor(p, [Segment(f"p{i}", tuple(p.shape), 0, p.numel(), 0)], None) for i, p in enumerate(params)]
    defaults = dict(lr=1e-5, scale_parameter=False, relative_step=False, warmup_init=False)  # the HF Trainer's
    return ShardedAdafactor(layout, bf16_rounding=rounding, **{**defaults, **kwargs})


def fine_tune(dtype, rounding, steps=600, seed=0) -> tuple[float, float]:
    """A 'pretrained' softmax classifier (weights ~0.05, where a bf16 step is ~2e-4) learns a nearby teacher at
    lr 1e-5 for `steps` steps; eval cross-entropy before and after, with the weights in bf16 (as bf16 eval runs)."""
    g = torch.Generator().manual_seed(seed)
    classes, dim = 32, 128
    start = torch.randn(classes, dim, generator=g) * 0.05
    teacher = start + torch.randn(classes, dim, generator=g) * 0.01

    def rows(n):
        x = torch.randn(n, dim, generator=g) * 4
        return x, torch.multinomial(F.softmax(x @ teacher.T, -1), 1, generator=g).squeeze(1)

    (x, y), (x_eval, y_eval) = rows(8192), rows(4096)
    w = torch.nn.Parameter(start.clone().to(dtype))
    optimizer = optimizer_for([w], rounding)
    torch.manual_seed(seed)
    for step in range(steps):
        batch = slice(step * 256 % 8192, step * 256 % 8192 + 256)
        optimizer.zero_grad()
        F.cross_entropy(x[batch] @ w.float().T, y[batch]).backward()
        optimizer.step()

    def loss(weights):
        return F.cross_entropy(x_eval @ weights.detach().to(torch.bfloat16).float().T, y_eval).item()

    return loss(start), loss(w)


def test_compensated_bf16_masters_learn_like_fp32_and_plain_rounding_does_not():
    before, fp32 = fine_tune(torch.float32, "nearest")
    gain = before - fp32
    assert gain > 0.004  # the fp32 run learns measurably
    share = {}
    for rounding in ("stochastic", "kahan", "nearest"):
        _, loss = fine_tune(torch.bfloat16, rounding)
        share[rounding] = (before - loss) / gain
        if rounding != "nearest":
            assert loss == pytest.approx(fp32, rel=0.02), rounding
    assert share["kahan"] > 0.95
    # Stochastic rounding is right on average, but its weights walk randomly by a few bf16 steps, which this
    # flat toy loss does not pull back: 80 to 102 % of the gain over six rounding seeds (100 % on the demo
    # model, scripts/bench_bf16_masters.py).
    assert share["stochastic"] > 0.6
    assert share["nearest"] < 0.2, share  # most updates are below half a bf16 step: lost


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    value = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # a quarter of the way from 1 to next bf16
    weight = torch.zeros_like(value, dtype=torch.bfloat16)
    weight.copy_(round_stochastically_(value.clone(), torch.Generator().manual_seed(0)))
    assert set(weight.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert weight.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    weight.copy_(round_stochastically_(-value, torch.Generator().manual_seed(1)))
    assert weight.float().mean().item() == pytest.approx(-(1.0 + 2**-10), abs=2e-5)


def test_stochastic_rounding_does_not_depend_on_the_global_generator():
    """Replicas of a tensor (NO_SHARD, HYBRID_SHARD) round alike even where other code drew random numbers."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, 32).bfloat16())
        optimizer = optimizer_for([w], "stochastic", lr=1e-3)
        torch.manual_seed(global_seed)
        for _ in range(3):
            w.grad = torch.ones_like(w)
            optimizer.step()
        results.append(w.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_bf16_state_round_trip_continues_exactly(rounding):
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(8, 6).to(torch.bfloat16)), torch.nn.Parameter(torch.randn(5).bfloat16())]

    def grads(step):
        g = torch.Generator().manual_seed(step)
        return [torch.randn(8, 6, generator=g).bfloat16(), torch.randn(5, generator=g).bfloat16()]

    def steps(params, optimizer, which):
        for step in which:
            for p, g in zip(params, grads(step)):
                p.grad = g
            optimizer.step()

    straight = make()
    steps(straight, optimizer_for(straight, rounding, lr=1e-3), range(6))
    resumed = make()
    first = optimizer_for(resumed, rounding, lr=1e-3)
    steps(resumed, first, range(3))
    state = first.sharded_state_dict()
    if rounding == "kahan":
        assert state["p0.compensation"].dtype == torch.bfloat16 and state["p0.compensation"].abs().sum() > 0
    second = optimizer_for(resumed, rounding, lr=1e-3)
    second.load_sharded_state_dict(state)
    steps(resumed, second, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


MEMORY_PROBE = r"""
import json, re, sys, torch
sys.path.insert(0, sys.argv[1])
from test_bf16_masters import optimizer_for
def rss(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
extra = {}
for dtype, rounding in [(torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"), (torch.bfloat16, "kahan"),
                        (torch.float32, "nearest")]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(2048, 1024).to(dtype)) for _ in range(8)]
    optimizer = optimizer_for(params, rounding, lr=1e-3, chunk_elements=int(sys.argv[2]))
    for step in range(2):  # the state is made in the first step; the second is measured
        for p in params:
            p.grad = torch.randn_like(p)
        before = rss("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        optimizer.step()
    extra[f"{dtype}-{rounding}"] = rss("VmHWM") - before
    del params, optimizer
print(json.dumps(extra))
"""


CHUNK = 2**18  # an eighth of a tensor


def test_step_holds_temporaries_of_one_chunk_at_a_time():
    """8 tensors of 2M elements, stepped in chunks of 256K: all their fp32 copies at once would be 8 x 2 x 8 MB;
    what a step adds is a few fp32 and int32 copies of one chunk (measured: 6 chunks' fp32 bytes with bf16 weights
    and gradients, for every rounding; 4 with fp32 ones), under one tensor's fp32 bytes."""
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, f"{REPO}/tests", str(CHUNK)], capture_output=True,
                            text=True, env={**env(), "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=120)
    assert result.returncode == 0, result.stderr
    extra, chunk_fp32 = json.loads(result.stdout), CHUNK * 4
    for variant, nbytes in extra.items():
        assert nbytes <= 8 * chunk_fp32, (variant, nbytes / chunk_fp32)
