"""ftloop's Adafactor (ShardedAdafactor over whole tensors, one process) against transformers.optimization.Adafactor:
every option set, fp32 and bf16 parameters, the parameters and the optimizer state. Sharded: test_sharded_adafactor."""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.optimization import Adafactor as HFAdafactor

from ftloop.optim.adafactor import ShardedAdafactor
from ftloop.optim.segments import Segment, SteppedTensor

# 1-D, 2-D, 3-D (leading dim = batch of matrices), a single-row matrix and a one-element vector.
SHAPES = [(7,), (5, 3), (4, 6, 5), (1, 8), (1,)]
STEPS = 20


def _valid_configs():
    for scale_parameter, relative_step, warmup_init, beta1, weight_decay in itertools.product(
        [True, False], [True, False], [True, False], [None, 0.9], [0.0, 0.1]
    ):
        if warmup_init and not relative_step:
            continue  # rejected by the constructor (tested separately)
        yield dict(
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            beta1=beta1,
            weight_decay=weight_decay,
            lr=None if relative_step else 1e-2,
        )


CONFIGS = list(_valid_configs())
assert len(CONFIGS) == 24


def plain_layout(params, **kwargs) -> ShardedAdafactor:
    """ShardedAdafactor over whole tensors (no process group), decaying every parameter like transformers."""
    layout = [SteppedTensor(p, [Segment(f"p{i}", tuple(p.shape), 0, p.numel(), 0)], None)
              for i, p in enumerate(params)]
    return ShardedAdafactor(layout, **kwargs)


def _make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _run(opt_cls, kwargs, dtype, steps=STEPS, seed=0):
    """Fresh params from `seed`, `steps` optimizer steps with seeded random grads."""
    params = _make_params(dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    opt = opt_cls(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


def _ours_as_transformers(ours: ShardedAdafactor, index: int, p: torch.Tensor) -> dict:
    """Our state of parameter `index` (keyed by segment name, flattened) in transformers' keys and shapes."""
    state, name = ours.segment_state(ours.layout[index]) | {"step": ours.state[p]["step"]}, f"p{index}"
    out = {"step": state["step"]}
    if ours.param_groups[0]["scale_parameter"]:  # the only reader of the weights' RMS (transformers records it always)
        out["RMS"] = state[f"{name}.RMS"]
    if p.dim() >= 2:
        out["exp_avg_sq_row"] = state[f"{name}.exp_avg_sq_row"].view(p.shape[:-1])
        out["exp_avg_sq_col"] = state[f"{name}.exp_avg_sq_col"].view(p.shape[:-2] + p.shape[-1:])
    else:
        out["exp_avg_sq"] = state[f"{name}.exp_avg_sq"].view(p.shape)
    if f"{name}.exp_avg" in state:
        out["exp_avg"] = state[f"{name}.exp_avg"].view(p.shape)
    return out


def _assert_state_close(ours, ref, params_ours, params_ref):
    for i, (po, pr) in enumerate(zip(params_ours, params_ref)):
        so, sr = _ours_as_transformers(ours, i, po), ref.state[pr]
        assert so["step"] == sr["step"] == STEPS
        tensor_keys = {k for k, v in sr.items() if torch.is_tensor(v) and (k != "RMS" or "RMS" in so)}
        assert {k for k, v in so.items() if torch.is_tensor(v)} == tensor_keys
        for key in tensor_keys:
            assert so[key].dtype == torch.float32, key  # fp32 state, also for bf16 parameters
            # Normalise by the tensor's scale: exp_avg has elements near 0 where elementwise
            # relative error is meaningless.
            scale = sr[key].abs().max().item()
            torch.testing.assert_close(so[key], sr[key].float(), rtol=0, atol=1e-6 * scale, msg=key)


@pytest.mark.parametrize("chunk_elements", [None, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_transformers_fp32(kwargs, chunk_elements):
    """In one chunk (the five tensors packed together: their gradients and weights concatenated, the weights written
    back with a foreach copy), and in chunks of 7 elements: each tensor alone (its gradient's own memory holds the
    update), the larger ones cut between rows (the (1, 8) matrix's row is a chunk of its own)."""
    ours, opt_ours = _run(plain_layout, {**kwargs, "chunk_elements": chunk_elements}, torch.float32)
    ref, opt_ref = _run(HFAdafactor, kwargs, torch.float32)
    p0 = _make_params(torch.float32)
    for po, pr, init in zip(ours, ref, p0):
        # Max relative difference measured: ~5e-7 (RMS via sum of squares vs. norm; fp32 rounding).
        torch.testing.assert_close(po, pr, rtol=1e-6, atol=1e-8)
        # The parameters must actually have moved, and by the same amount. The displacement is
        # small (esp. with warmup_init), so fp32 cancellation limits this check to ~1e-4.
        d_ours, d_ref = (po - init).detach(), (pr - init).detach()
        assert d_ref.abs().max() > 0
        torch.testing.assert_close(d_ours, d_ref, rtol=0, atol=1e-3 * d_ref.abs().max().item())
    _assert_state_close(opt_ours, opt_ref, ours, ref)


@pytest.mark.parametrize("chunk_elements", [None, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_transformers_bf16(kwargs, chunk_elements):
    ours, opt_ours = _run(plain_layout, {**kwargs, "chunk_elements": chunk_elements}, torch.bfloat16)
    ref, opt_ref = _run(HFAdafactor, kwargs, torch.bfloat16)
    p0 = _make_params(torch.bfloat16)
    for po, pr in zip(ours, ref):
        assert po.dtype == torch.bfloat16
        # Both step in fp32 and round once to bf16 (ours to nearest, the default rounding); the fp32 results differ
        # by at most a few fp32 ulps, which for this seed never crosses a bf16 rounding boundary: bit-identical.
        assert torch.equal(po, pr)
    # Known bf16 stagnation (in both implementations): an update below half a bf16 ulp of the
    # parameter is rounded away, so e.g. with warmup_init (lr = 1e-6 * t) only a few near-zero
    # elements move in 20 steps. Some must move, or the comparison above would be vacuous.
    assert any(not torch.equal(po, init) for po, init in zip(ours, p0))
    _assert_state_close(opt_ours, opt_ref, ours, ref)


def test_zero_gradients_match_transformers():
    """eps[0] is what keeps all-zero rows / elements finite (rsqrt(0) * 0 would be NaN)."""

    def run(opt_cls):
        g = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 6), (5,)]]
        opt = opt_cls(params, beta1=0.9)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            params[0].grad[1] = 0.0  # a whole row of zeros, every step
            params[1].grad[2] = 0.0
            opt.step()
        return params

    for ours, ref in zip(run(plain_layout), run(HFAdafactor)):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=1e-3, relative_step=True), dict(lr=1e-3, relative_step=False, warmup_init=True)],
)
def test_constructor_errors_match_transformers(kwargs):
    params = _make_params(torch.float32)
    with pytest.raises(ValueError) as ref_err:
        HFAdafactor(params, **kwargs)
    with pytest.raises(ValueError) as our_err:
        plain_layout(params, **kwargs)
    assert str(our_err.value) == str(ref_err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    """What a checkpoint holds (`sharded_state_dict`, here of whole tensors) continues the run bit for bit in a
    fresh optimizer; the moments of bf16 parameters stay fp32 through it."""
    kwargs = dict(beta1=0.9, weight_decay=0.1)  # uses every state entry
    grads_gen = torch.Generator().manual_seed(123)
    grads = [[torch.randn(s, generator=grads_gen).to(dtype) for s in SHAPES] for _ in range(20)]

    def do_steps(params, opt, step_grads):
        for gs in step_grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    straight = _make_params(dtype)
    opt_straight = plain_layout(straight, **kwargs)
    do_steps(straight, opt_straight, grads)

    first = _make_params(dtype)
    opt_first = plain_layout(first, **kwargs)
    do_steps(first, opt_first, grads[:10])
    saved = {k: v.clone() for k, v in opt_first.sharded_state_dict().items()}
    assert all(v.dtype == torch.float32 for k, v in saved.items() if k != "step"), saved
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_resumed = plain_layout(resumed, **kwargs)
    opt_resumed.load_sharded_state_dict(saved)
    do_steps(first, opt_first, grads[10:])
    do_steps(resumed, opt_resumed, grads[10:])

    for a, b, c in zip(straight, first, resumed):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    for a, c in zip(straight, resumed):
        sa, sc = opt_straight.state[a], opt_resumed.state[c]
        assert sa.keys() == sc.keys()
        assert sa["step"] == sc["step"] == 20
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(sa[key], sc[key]), key


def test_torch_s_state_dict_round_trip_keeps_the_fp32_state_of_bf16_parameters():
    """torch's Optimizer.load_state_dict casts floating state to each parameter's dtype; ShardedAdafactor keeps its
    statistics fp32 for bf16 parameters, so a save and load changes nothing and the run continues bit for bit."""
    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(8, 6, generator=g).bfloat16()),
                torch.nn.Parameter(torch.randn(5, generator=g).bfloat16())]

    def steps(params, opt, seeds):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            opt.step()

    straight = make()
    steps(straight, plain_layout(straight, beta1=0.9), range(6))
    first = make()
    opt = plain_layout(first, beta1=0.9)
    steps(first, opt, range(3))
    before = {k: v.clone() for k, v in opt.flat[0].items()}
    resumed = plain_layout(first, beta1=0.9)
    resumed.load_state_dict(opt.state_dict())
    assert all(torch.equal(resumed.flat[0][k], v) and v.dtype == torch.float32 for k, v in before.items())
    steps(first, resumed, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(straight, first))


@pytest.mark.parametrize("shape", [(64, 32), (3, 64, 32)])
def test_factored_state_memory(shape):
    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    opt = plain_layout([p])
    opt.step()
    state = opt.segment_state(opt.layout[0])
    assert "p0.exp_avg_sq" not in state and "p0.exp_avg" not in state
    *batch, rows, cols = shape
    batch_size = batch[0] if batch else 1
    assert state["p0.exp_avg_sq_row"].numel() == batch_size * rows
    assert state["p0.exp_avg_sq_col"].shape == (batch_size, cols)


def test_vector_keeps_full_second_moment():
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = plain_layout([p], beta1=0.9)
    opt.step()
    state = opt.segment_state(opt.layout[0])
    assert state["p0.exp_avg_sq"].shape == (10,)
    assert state["p0.exp_avg"].shape == (10,)
    assert "p0.exp_avg_sq_row" not in state


class _FailOnHostSync(TorchDispatchMode):
    """Raises on aten._local_scalar_dense, the op behind .item()/float()/bool() of a tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync in Adafactor.step")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kwargs", [dict(beta1=0.9, weight_decay=0.1), dict(lr=1e-2, relative_step=False)])
def test_step_has_no_host_sync(kwargs):
    params = _make_params(torch.float32)
    opt = plain_layout(params, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with _FailOnHostSync():
            opt.step()
