"""Adafactor (Shazeer & Stern, 2018), numerically matching ``transformers.optimization.Adafactor``.

The per-parameter math is split into small tensor functions, and every statistic that needs a
reduction (parameter RMS, update RMS, row/column means of the squared gradient) is computed in
two stages:

1. *sums*: a sum of squares / a sum along a dim, plus the number of elements it covers;
2. *statistic*: ``sum / count`` (and ``sqrt`` for an RMS).

Only stage 1 looks at the tensor, so a sharded variant (FSDP flat shards) can compute the sums on
its local slice, all-reduce them across ranks, and reuse stage 2 and everything after it as is.

Numerics follow transformers exactly in structure (same formulas, same order of operations);
the only differences are reduction order inside an RMS (sum of squares instead of ``norm``) and
keeping scalars as 0-dim tensors to avoid host syncs, both at the level of fp32 rounding.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)

Scalar = Union[float, Tensor]  # python float, or a 0-dim tensor kept on device to avoid syncs


# --------------------------------------------------------------------------------------------
# Stage 1: sums (local; these are what a sharded implementation would all-reduce)
# --------------------------------------------------------------------------------------------


def sum_of_squares(t: Tensor) -> Tensor:
    """0-dim sum of t**2 (the all-reducible half of an RMS)."""
    return t.square().sum()


def row_col_sums(sq_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of a (..., R, C) tensor over its last dim (-> (..., R)) and second-to-last dim (-> (..., C)).

    Leading dims are treated as a batch of independent matrices.
    """
    return sq_grad.sum(dim=-1), sq_grad.sum(dim=-2)


# --------------------------------------------------------------------------------------------
# Stage 2: statistics from sums
# --------------------------------------------------------------------------------------------


def rms_from_sums(sum_sq: Tensor, count: int) -> Tensor:
    """Root mean square from a sum of squares and the number of elements it covers."""
    return (sum_sq / count).sqrt()


def rms(t: Tensor) -> Tensor:
    return rms_from_sums(sum_of_squares(t), t.numel())


# --------------------------------------------------------------------------------------------
# Per-parameter update math
# --------------------------------------------------------------------------------------------


def beta2_at(step: int, decay_rate: float) -> float:
    """Second-moment decay for step t: 1 - t^decay_rate (0 at t=1, so the first step sees grad^2 only)."""
    return 1.0 - math.pow(step, decay_rate)


def relative_step_size(step: int, warmup_init: bool) -> float:
    """Time-dependent step size: min(1e-6 * t if warmup_init else 1e-2, 1/sqrt(t))."""
    cap = 1e-6 * step if warmup_init else 1e-2
    return min(cap, 1.0 / math.sqrt(step))


def learning_rate(group: dict, step: int, param_rms: Tensor) -> Scalar:
    """The effective step size: (relative or external lr) * max(eps2, RMS(param)) if scale_parameter.

    The max is a tensor clamp rather than python ``max`` so no value is pulled to the host.
    """
    lr = relative_step_size(step, group["warmup_init"]) if group["relative_step"] else group["lr"]
    if group["scale_parameter"]:
        return param_rms.clamp(min=group["eps"][1]) * lr
    return lr


def ema_(avg: Tensor, new: Tensor, beta: float) -> Tensor:
    """In place: avg = beta * avg + (1 - beta) * new."""
    return avg.mul_(beta).add_(new, alpha=1.0 - beta)


def factored_rsqrt(row: Tensor, col: Tensor, row_mean: Tensor) -> Tensor:
    """Rank-1 approximation of 1/sqrt(E[g^2]) from the factored second moment.

    E[g^2]_{ij} ~= row_i * col_j / mean(row), so its rsqrt is rsqrt(row_i / mean(row)) * rsqrt(col_j).
    ``row_mean`` is passed in (shape (..., 1)) because under row sharding it needs a global reduction.
    """
    r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)  # (..., R, 1)
    c_factor = col.unsqueeze(-2).rsqrt()  # (..., 1, C)
    return r_factor * c_factor


def clip_by_rms_(update: Tensor, update_rms: Tensor, clip_threshold: float) -> Tensor:
    """In place: scale the update down so its RMS is at most clip_threshold (never scale up)."""
    return update.div_((update_rms / clip_threshold).clamp_(min=1.0))


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


class Adafactor(torch.optim.Optimizer):
    """Adafactor with the constructor and numerics of ``transformers.optimization.Adafactor``.

    * >=2-D parameters keep a factored second moment over their last two dims (R + C floats per
      matrix, leading dims are a batch); 0-/1-D parameters keep a full one.
    * ``relative_step``: lr = min(1e-2 (or 1e-6*t with ``warmup_init``), 1/sqrt(t)); otherwise ``lr``.
    * ``scale_parameter``: lr is multiplied by max(eps[1], RMS(param)).
    * The normalised update is clipped to RMS <= ``clip_threshold``; ``beta1`` adds a first moment.
    * ``weight_decay`` is decoupled: p -= weight_decay * lr * p (with the same effective lr).
    * fp16/bf16 parameters are stepped in fp32 and copied back; optimizer state is always fp32.

    State per parameter: ``step`` (python int), ``exp_avg_sq_row``/``exp_avg_sq_col`` or
    ``exp_avg_sq``, ``exp_avg`` if ``beta1`` is set, and ``RMS`` (0-dim, last parameter RMS).
    """

    def __init__(
        self,
        params: Iterable,
        lr: Optional[float] = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: Optional[float] = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ):
        # Same validation (and messages) as transformers.
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _init_state(state: dict, grad: Tensor, use_first_moment: bool) -> None:
        state["step"] = 0
        if use_first_moment:
            state["exp_avg"] = torch.zeros_like(grad)
        if grad.dim() >= 2:
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["RMS"] = grad.new_zeros(())

    def _preconditioned_grad(self, state: dict, grad: Tensor, group: dict) -> Tensor:
        """Update the second moment with grad^2 and return grad / sqrt(second moment)."""
        beta2t = beta2_at(state["step"], group["decay_rate"])
        sq_grad = grad.square().add_(group["eps"][0])
        if grad.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row_sum, col_sum = row_col_sums(sq_grad)
            ema_(row, row_sum / grad.shape[-1], beta2t)  # mean over columns
            ema_(col, col_sum / grad.shape[-2], beta2t)  # mean over rows
            row_mean = row.sum(dim=-1, keepdim=True) / row.shape[-1]
            return factored_rsqrt(row, col, row_mean).mul_(grad)
        exp_avg_sq = ema_(state["exp_avg_sq"], sq_grad, beta2t)
        return exp_avg_sq.rsqrt().mul_(grad)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                # Low-precision grads/params are computed in fp32; state is created in that dtype.
                grad = p.grad.float() if p.grad.dtype in _LOW_PRECISION else p.grad
                p32 = p.float() if p.dtype in _LOW_PRECISION else p  # a copy iff low precision

                state = self.state[p]
                if len(state) == 0:
                    self._init_state(state, grad, group["beta1"] is not None)
                state["step"] += 1
                state["RMS"] = rms(p32)
                lr = learning_rate(group, state["step"], state["RMS"])

                update = self._preconditioned_grad(state, grad, group)
                clip_by_rms_(update, rms(update), group["clip_threshold"])
                update.mul_(lr)
                if group["beta1"] is not None:
                    update = ema_(state["exp_avg"], update, group["beta1"])

                # Decoupled weight decay, applied to the pre-update parameter (as transformers does).
                if group["weight_decay"] != 0:
                    p32.add_(p32 * (-group["weight_decay"] * lr))
                p32.sub_(update)

                if p32 is not p:
                    p.copy_(p32)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Standard load, except moments of fp16/bf16 parameters stay fp32.

        ``Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype,
        which would round fp32 moments of a bf16 parameter to bf16; restore them from the source.
        """
        super().load_state_dict(state_dict)
        saved_ids = (pid for g in state_dict["param_groups"] for pid in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for pid, p in zip(saved_ids, params):
            if p.dtype not in _LOW_PRECISION or pid not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][pid].items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
