"""Adafactor (Shazeer & Stern, 2018) that stays exact when FSDP1 shards the parameters, with the constructor and
numerics of `transformers.optimization.Adafactor` (tested against it for every option, at 1, 2 and 4 ranks).

FSDP1 hands an optimizer 1-D shards. A plain Adafactor then stops factoring (its second moment costs a
float per element instead of R + C per matrix) and takes RMS statistics over whatever slice a rank holds,
so training changes with the number of GPUs. Here every original parameter inside a shard is a `Segment`
with its full shape; each rank computes row and column sums of its slice, one all-reduce per step turns
them into the full parameter's statistics, and a second all-reduce gives each parameter's update RMS.
The result equals single-process Adafactor on the unsharded model, up to float summation order (an RMS is
a sum of squares here, a norm there; scalars stay 0-dim tensors on the device, so nothing syncs the host).

The update of one parameter, as transformers computes it: the second moment's EMA with decay 1 - t^decay_rate
(factored into row and column means for matrices, whose rank-1 product approximates it), the gradient divided by
its square root, clipped to RMS <= clip_threshold, times the step size (`learning_rate`: relative or external,
times the parameter's RMS with scale_parameter), through a first moment with beta1, and decoupled weight decay
on the parameter before the update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import math

import torch.distributed as dist
from torch import Tensor

from ftloop.fsdp.internals import local_slice, sharded_tensor
from ftloop.optim.segments import Segment, SteppedTensor, row_pieces

_LOW_PRECISION = (torch.float16, torch.bfloat16)
ROUNDINGS = ("nearest", "stochastic", "kahan")  # how a bf16 weight takes its update (--bf16-master-rounding)
CHUNK = 1 << 20  # elements per piece when a low-precision weight is read or written: bounds the fp32 temporaries


def beta2_at(step: int, decay_rate: float) -> float:
    """Second-moment decay for step t: 1 - t^decay_rate (0 at t=1, so the first step sees grad^2 only)."""
    return 1.0 - math.pow(step, decay_rate)


def learning_rate(group: dict, step: int, param_rms: Tensor):
    """The step size: (relative or external lr) * max(eps2, RMS(param)) with scale_parameter (a clamp on the
    device, not python's max: nothing comes to the host)."""
    if group["relative_step"]:
        lr = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
    else:
        lr = group["lr"]
    if group["scale_parameter"]:
        return param_rms.clamp(min=group["eps"][1]) * lr
    return lr


def ema_(avg: Tensor, new: Tensor, beta: float) -> Tensor:
    """In place: avg = beta * avg + (1 - beta) * new."""
    return avg.mul_(beta).add_(new, alpha=1.0 - beta)


def clip_by_rms_(update: Tensor, update_rms: Tensor, clip_threshold: float) -> Tensor:
    """In place: scale the update down so its RMS is at most clip_threshold (never scale up)."""
    return update.div_((update_rms / clip_threshold).clamp_(min=1.0))


def _sum_of_squares(t: Tensor) -> Tensor:
    """sum(t^2) in fp32; a low-precision tensor goes through fp32 in pieces of CHUNK elements."""
    if t.dtype not in _LOW_PRECISION:
        return torch.dot(t, t)  # no parameter-sized temporary
    total = torch.zeros((), device=t.device)
    for start in range(0, t.numel(), CHUNK):
        piece = t[start:start + CHUNK].float()
        total += torch.dot(piece, piece)
    return total


class _Slot:
    """One segment's static layout: rectangular pieces of its local slice, each inside one matrix of the
    batch (leading dims), as (start in the stepped tensor, first row, rows, first col, end col, batch)."""

    def __init__(self, segment: Segment):
        self.segment = segment
        shape = segment.shape
        self.cols = shape[-1] if segment.factored else 0
        self.rows_per_batch = shape[-2] if segment.factored else 0
        self.batches = segment.rows // self.rows_per_batch if segment.factored else 0
        self.pieces = []
        if not segment.factored:
            return
        for local, row, n, c0, c1 in row_pieces(segment.first, segment.numel, self.cols):
            while n:  # split blocks of whole rows where one matrix of the batch ends and the next begins
                batch = row // self.rows_per_batch
                take = min(n, (batch + 1) * self.rows_per_batch - row)
                self.pieces.append((segment.offset + local, row, take, c0, c1, batch))
                local, row, n = local + take * (c1 - c0), row + take, n - take


@dataclass
class _StepWork:
    """One stepped tensor's step in progress, between the all-reduces."""
    entry: SteppedTensor
    state: dict
    sums: list[Tensor]  # per segment: row sums, column sums, sum of p^2 (local, then all-reduced)
    update: Tensor | None = None  # the preconditioned update, kept only where it overwrote an fp32 gradient
    update_sq: list[Tensor] = field(default_factory=list)  # per segment: sum of update^2


class ShardedAdafactor(torch.optim.Optimizer):
    """Adafactor over FSDP1 shards (or plain tensors), with per-parameter weight decay and lr scale.

    Build the layout with `ftloop.optim.segments.describe_fsdp(model)` (one segment per whole tensor without
    FSDP); every rank must pass the same layout order. The other arguments are transformers' Adafactor's. To save memory, `step` turns fp32
    gradients into the update in place: read gradients before stepping, clear them after.

    Memory: with fp32 parameters and gradients nothing parameter-sized is allocated. With bf16 ones the fp32
    work copies exist for one stepped tensor (one FSDP unit's local shard) at a time: its gradient in fp32,
    plus pieces of at most CHUNK elements while the weights are written. The update is then computed twice
    (once for its RMS, once to apply it) instead of being held for every tensor until the RMS all-reduce.
    `bf16_rounding` is how a bf16 weight takes its update: see ROUNDINGS and --bf16-master-rounding.
    """

    def __init__(self, layout: list[SteppedTensor], lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, bf16_rounding: str = "nearest", rounding_seed: int = 0):
        if lr is not None and relative_step:  # transformers' checks, with its messages
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        layout = [t for t in layout if t.tensor.requires_grad]
        super().__init__([t.tensor for t in layout], dict(
            lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
            warmup_init=warmup_init))
        scaled = any(segment.lr_scale != 1.0 for entry in layout for segment in entry.segments)
        if self.defaults["relative_step"] and scaled:
            raise ValueError("per-part learning rates scale an external lr: use relative_step=False")
        if bf16_rounding not in ROUNDINGS:
            raise ValueError(f"bf16_rounding must be one of {ROUNDINGS}, not {bf16_rounding!r}")
        self.bf16_rounding = bf16_rounding
        # Stochastic rounding draws from its own generator, seeded by (rounding_seed, step, tensor): every
        # replica of a tensor (NO_SHARD, HYBRID_SHARD) rounds alike whatever else used the global generators,
        # and a resumed run draws what the uninterrupted one did.
        self.rounding_seed = rounding_seed
        self.layout = layout
        self.slots = {id(entry.tensor): [_Slot(segment) for segment in entry.segments] for entry in layout}

    def _compensated(self, p: Tensor) -> bool:
        return self.bf16_rounding == "kahan" and p.dtype in _LOW_PRECISION

    def _new_state(self, p: Tensor, slots: list[_Slot], first_moment: bool) -> dict:
        state = {"step": 0}
        for slot in slots:
            seg = slot.segment
            if seg.factored:
                state[f"{seg.name}.exp_avg_sq_row"] = torch.zeros(seg.rows, device=p.device)
                state[f"{seg.name}.exp_avg_sq_col"] = torch.zeros(slot.batches, slot.cols, device=p.device)
            else:
                state[f"{seg.name}.exp_avg_sq"] = torch.zeros(seg.numel, device=p.device)
            if first_moment:
                state[f"{seg.name}.exp_avg"] = torch.zeros(seg.numel, device=p.device)
            if self._compensated(p):  # what rounding took from the weight, given back at the next update
                state[f"{seg.name}.compensation"] = torch.zeros(seg.numel, device=p.device, dtype=p.dtype)
            state[f"{seg.name}.RMS"] = torch.zeros((), device=p.device)
        return state

    @staticmethod
    def _fp32_grad(p: Tensor) -> tuple[Tensor, bool]:
        """The flattened gradient in fp32, and whether it is the gradient's own buffer (fp32 gradients: the
        update may be written over it) rather than a copy (bf16 gradients)."""
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if grad.dtype in _LOW_PRECISION:
            return grad.float().view(-1), False
        return grad.view(-1), p.grad is not None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.param_groups) != 1:
            raise ValueError("ShardedAdafactor takes one parameter group; per-parameter settings live in Segments")
        group = self.param_groups[0]
        eps1 = group["eps"][0]

        # Stage 1: local sums for every segment (fp32 copies of one tensor at a time), one all-reduce.
        works = []
        for entry in self.layout:
            p = entry.tensor
            state = self.state[p]
            if not state:
                state.update(self._new_state(p, self.slots[id(p)], group["beta1"] is not None))
            state["step"] += 1
            grad, _ = self._fp32_grad(p)
            sums = [self._local_sums(slot, grad, p.view(-1), eps1) for slot in self.slots[id(p)]]
            works.append(_StepWork(entry, state, sums))
            del grad
        self._all_reduce_by_group(works, lambda w: w.sums)

        # Stage 2: second moments and preconditioned updates, for their RMS; again one all-reduce.
        for w in works:
            beta2t = beta2_at(w.state["step"], group["decay_rate"])
            grad, owned = self._fp32_grad(w.entry.tensor)
            for slot, sums in zip(self.slots[id(w.entry.tensor)], w.sums):
                self._update_second_moment(slot, grad, w.state, sums, beta2t, eps1)
                u = self._precondition(slot, grad, w.state)
                w.update_sq.append(torch.dot(u, u).view(1))
            w.update = grad if owned else None  # a bf16 gradient's copy is dropped and made again below
            del grad
        self._all_reduce_by_group(works, lambda w: w.update_sq)

        # Stage 3: clip, scale, momentum, decay, apply.
        for index, w in enumerate(works):
            p = w.entry.tensor
            noise = None
            if self.bf16_rounding == "stochastic" and p.dtype in _LOW_PRECISION:
                noise = torch.Generator(device=p.device)
                noise.manual_seed(hash((self.rounding_seed, w.state["step"], index)) % 2**63)
            update = w.update
            if update is None:  # the same update again, from the second moments stage 2 left
                update, _ = self._fp32_grad(p)
                for slot in self.slots[id(p)]:
                    self._precondition(slot, update, w.state)
            for slot, sums, u_sq in zip(self.slots[id(p)], w.sums, w.update_sq):
                seg = slot.segment
                w.state[f"{seg.name}.RMS"] = (sums[-1] / seg.full_numel).sqrt()
                lr = learning_rate(group, w.state["step"], w.state[f"{seg.name}.RMS"]) * seg.lr_scale
                u = update[seg.offset:seg.offset + seg.numel]
                clip_by_rms_(u, (u_sq / seg.full_numel).sqrt().squeeze(0), group["clip_threshold"])
                u.mul_(lr)
                if group["beta1"] is not None:
                    u = ema_(w.state[f"{seg.name}.exp_avg"], u, group["beta1"])
                decay = -group["weight_decay"] * lr if group["weight_decay"] != 0 and seg.decay else None
                self._apply(p.view(-1)[seg.offset:seg.offset + seg.numel], u, decay,
                            w.state.get(f"{seg.name}.compensation"), noise)
            w.update = update = None
        return loss

    def _apply(self, weight: Tensor, u: Tensor, decay, compensation: Tensor | None,
               noise: torch.Generator | None) -> None:
        """weight += decay * weight - u (decay on the weight before the update, as transformers does it); a
        bf16 weight is rounded with `noise` (stochastic), through `compensation` (Kahan), or to nearest."""
        if weight.dtype not in _LOW_PRECISION:
            if decay is not None:
                weight.add_(weight * decay)
            weight.sub_(u)
            return
        for start in range(0, weight.numel(), CHUNK):
            piece, step = weight[start:start + CHUNK], u[start:start + CHUNK]
            w32 = piece.float()
            if decay is not None:
                w32.add_(w32 * decay)
            w32.sub_(step)
            if compensation is None:
                self._round_into(piece, w32, noise)
            else:  # Kahan: add back what the last rounding lost, round, keep what this rounding loses
                lost = compensation[start:start + CHUNK]
                w32.add_(lost.float())
                piece.copy_(w32)
                lost.copy_(w32.sub_(piece.float()))

    @staticmethod
    def _round_into(piece: Tensor, value: Tensor, noise: torch.Generator | None) -> None:
        """piece (bf16) = value (fp32, overwritten), rounded stochastically with `noise`, else to nearest."""
        if noise is not None:
            # Add uniform noise below the 16 bits bf16 drops, then drop them: the weight rounds away from zero
            # with probability (distance to the lower magnitude) / (bf16 step), so its expected value is exact.
            bits = value.view(torch.int32)
            bits.add_(torch.empty_like(bits).random_(0, 1 << 16, generator=noise)).bitwise_and_(-65536)
        piece.copy_(value)

    @staticmethod
    def _local_sums(slot: _Slot, grad: Tensor, weights: Tensor, eps1: float) -> Tensor:
        """This rank's row sums and column sums of grad^2 + eps, and sum of p^2, for one segment."""
        seg = slot.segment
        p_sq = _sum_of_squares(weights[seg.offset:seg.offset + seg.numel]).view(1)
        if not seg.factored:
            return p_sq
        row_sum = grad.new_zeros(seg.rows)
        col_sum = grad.new_zeros(slot.batches, slot.cols)
        for start, row, n, c0, c1, batch in slot.pieces:
            sq = grad[start:start + n * (c1 - c0)].view(n, c1 - c0).square().add_(eps1)
            row_sum[row:row + n] += sq.sum(dim=1)
            col_sum[batch, c0:c1] += sq.sum(dim=0)
        return torch.cat([row_sum, col_sum.view(-1), p_sq])

    @staticmethod
    def _update_second_moment(slot: _Slot, grad: Tensor, state: dict, sums: Tensor, beta2t: float,
                              eps1: float) -> None:
        """The EMA of grad^2: factored from the all-reduced row and column sums, or per element of the slice."""
        seg = slot.segment
        if not seg.factored:
            ema_(state[f"{seg.name}.exp_avg_sq"], grad[seg.offset:seg.offset + seg.numel].square().add_(eps1), beta2t)
            return
        ema_(state[f"{seg.name}.exp_avg_sq_row"], sums[:seg.rows] / slot.cols, beta2t)  # mean over columns
        ema_(state[f"{seg.name}.exp_avg_sq_col"], sums[seg.rows:-1].view(slot.batches, slot.cols) / slot.rows_per_batch,
             beta2t)  # mean over rows

    @staticmethod
    def _precondition(slot: _Slot, grad: Tensor, state: dict) -> Tensor:
        """grad / sqrt(second moment) for this rank's slice, written over `grad` in place (no parameter-sized
        buffer is made); returns the segment's view of it."""
        seg = slot.segment
        g = grad[seg.offset:seg.offset + seg.numel]
        if not seg.factored:
            return g.mul_(state[f"{seg.name}.exp_avg_sq"].rsqrt())
        rows = state[f"{seg.name}.exp_avg_sq_row"].view(slot.batches, slot.rows_per_batch)
        row_mean = rows.sum(dim=-1, keepdim=True) / slot.rows_per_batch
        r_factor = (rows / row_mean).rsqrt_().view(-1)
        c_factor = state[f"{seg.name}.exp_avg_sq_col"].rsqrt()
        for start, row_index, n, c0, c1, batch in slot.pieces:
            view = grad[start:start + n * (c1 - c0)].view(n, c1 - c0)
            view.mul_(r_factor[row_index:row_index + n, None]).mul_(c_factor[batch, c0:c1])
        return g

    # ---- checkpoints: state by original parameter name, in a form torch.distributed.checkpoint reshards --
    SLICED = ("exp_avg_sq", "exp_avg", "compensation")  # held per local slice; the row/column statistics are replicated

    def sharded_state_dict(self) -> dict:
        """{"step", "<param>.<state>": tensor}. Row/column statistics and RMS are the same on every rank;
        per-element state is a ShardedTensor over the flattened full parameter, so a checkpoint written at
        one world size loads at another. No collective."""
        return self._packaged(lambda entry: self.state[entry.tensor] or self._fresh(entry))

    def sharded_state_template(self) -> dict:
        """Zeroed tensors of the right shapes and shardings for `dcp.load` to fill."""
        return self._packaged(self._fresh)

    def _fresh(self, entry: SteppedTensor) -> dict:
        return self._new_state(entry.tensor, self.slots[id(entry.tensor)], self.param_groups[0]["beta1"] is not None)

    def _packaged(self, state_of) -> dict:
        out = {}
        for entry in self.layout:
            state = state_of(entry)
            out["step"] = torch.tensor(state["step"])
            for segment in entry.segments:
                for key in self._state_keys(segment, entry.tensor):
                    value = state[f"{segment.name}.{key}"]
                    sliced = key in self.SLICED and entry.group is not None
                    out[f"{segment.name}.{key}"] = (sharded_tensor(value, segment.full_numel, segment.pieces,
                                                                   entry.group) if sliced else value)
        return out

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """The inverse of `sharded_state_dict`, for this rank's layout (the world size may have changed)."""
        for entry in self.layout:
            state = self.state[entry.tensor]
            state.clear()
            state.update(self._fresh(entry))
            state["step"] = int(loaded["step"])
            for segment in entry.segments:
                for key in self._state_keys(segment, entry.tensor):
                    value = loaded[f"{segment.name}.{key}"]
                    mine = local_slice(value)
                    if mine is not value:  # saved sharded: this rank's slice (none held: the fresh zeros stay)
                        value = state[f"{segment.name}.{key}"] if mine is None else mine
                    elif key in self.SLICED:  # saved unsharded, loaded into a slice
                        value = value[segment.first:segment.first + segment.numel]
                    state[f"{segment.name}.{key}"].copy_(value.view_as(state[f"{segment.name}.{key}"]))

    def _state_keys(self, segment: Segment, p: Tensor) -> list[str]:
        keys = ["exp_avg_sq_row", "exp_avg_sq_col"] if segment.factored else ["exp_avg_sq"]
        if self.param_groups[0]["beta1"] is not None:
            keys.append("exp_avg")
        if self._compensated(p):
            keys.append("compensation")
        return keys + ["RMS"]

    def _all_reduce_by_group(self, works: list[_StepWork], parts_of) -> None:
        """All-reduce `parts_of(work)` of every stepped tensor: one collective per process group."""
        by_group: dict = {}
        for w in works:
            by_group.setdefault(w.entry.group, []).append(parts_of(w))
        for pg, parts in by_group.items():
            self._all_reduce(parts, pg)

    @staticmethod
    def _all_reduce(parts: list[list[Tensor]], pg) -> None:
        """Sum every tensor in `parts` over the process group with one collective, in place."""
        if pg is None:
            return
        flat = [t for per_tensor in parts for t in per_tensor]
        if not flat:
            return
        buffer = torch.cat(flat)
        if buffer.device.type == "cpu" and dist.get_backend(pg) == "nccl":  # shards offloaded to the host
            buffer = buffer.cuda()
        dist.all_reduce(buffer, group=pg)
        offset = 0
        for t in flat:
            t.copy_(buffer[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
