"""Adafactor that stays exact when FSDP1 shards the parameters.

FSDP1 hands an optimizer 1-D shards. A plain Adafactor then stops factoring (its second moment costs a
float per element instead of R + C per matrix) and takes RMS statistics over whatever slice a rank holds,
so training changes with the number of GPUs. Here every original parameter inside a shard is a `Segment`
with its full shape; each rank computes row and column sums of its slice, one all-reduce per step turns
them into the full parameter's statistics, and a second all-reduce gives each parameter's update RMS.
The result equals single-process Adafactor on the unsharded model, up to float summation order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ftloop.optim.adafactor import _LOW_PRECISION, Adafactor, beta2_at, clip_by_rms_, ema_, learning_rate
from ftloop.optim.segments import Segment, ShardedTensor, row_pieces


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


class ShardedAdafactor(Adafactor):
    """`Adafactor` over FSDP1 shards (or plain tensors), with per-parameter weight decay and lr scale.

    Build the layout with `ftloop.optim.segments.describe_fsdp(model)` (or `describe_plain`); every rank
    must pass the same layout order. Keyword arguments are Adafactor's. To save memory, `step` turns fp32
    gradients into the update in place: read gradients before stepping, clear them after.
    """

    def __init__(self, layout: list[ShardedTensor], **kwargs):
        layout = [t for t in layout if t.tensor.requires_grad]
        super().__init__([t.tensor for t in layout], **kwargs)
        if self.defaults["relative_step"] and any(s.lr_scale != 1.0 for t in layout for s in t.segments):
            raise ValueError("per-part learning rates scale an external lr: use relative_step=False")
        self.layout = layout
        self.slots = {id(t.tensor): [_Slot(s) for s in t.segments] for t in layout}

    def _new_state(self, p: Tensor, slots: list[_Slot], first_moment: bool) -> dict:
        state = {"step": 0}
        for slot in slots:
            s = slot.segment
            if s.factored:
                state[f"{s.name}.exp_avg_sq_row"] = torch.zeros(s.rows, device=p.device)
                state[f"{s.name}.exp_avg_sq_col"] = torch.zeros(slot.batches, slot.cols, device=p.device)
            else:
                state[f"{s.name}.exp_avg_sq"] = torch.zeros(s.numel, device=p.device)
            if first_moment:
                state[f"{s.name}.exp_avg"] = torch.zeros(s.numel, device=p.device)
            state[f"{s.name}.RMS"] = torch.zeros((), device=p.device)
        return state

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

        # Stage 1: local sums for every segment, all-reduced once per process group.
        work = []  # (tensor entry, flat fp32 grad, flat fp32 param, state, per-segment statistics)
        by_group: dict = {}
        for entry in self.layout:
            p = entry.tensor
            # The gradient becomes the update in place (see _precondition): a copy only when low precision.
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grad = grad.float() if grad.dtype in _LOW_PRECISION else grad
            p32 = p.float() if p.dtype in _LOW_PRECISION else p
            state = self.state[p]
            if not state:
                state.update(self._new_state(p, self.slots[id(p)], group["beta1"] is not None))
            state["step"] += 1
            grad, p32 = grad.reshape(-1), p32.view(-1)  # segments index the flattened tensor
            stats = [self._local_sums(slot, grad, p32, eps1) for slot in self.slots[id(p)]]
            by_group.setdefault(entry.group, []).append(len(work))
            work.append([entry, grad, p32, state, stats])
        for pg, indices in by_group.items():
            self._all_reduce([work[i][4] for i in indices], pg)

        # Stage 2: second moments and preconditioned updates; then the update RMS, again all-reduced.
        updates = []
        for entry, grad, p32, state, stats in work:
            beta2t = beta2_at(state["step"], group["decay_rate"])
            updates.append([self._precondition(slot, grad, state, sums, beta2t, eps1)
                            for slot, sums in zip(self.slots[id(entry.tensor)], stats)])
        sq = {pg: [[torch.dot(u, u).view(1) for u in updates[i]] for i in indices] for pg, indices in by_group.items()}
        for pg, parts in sq.items():
            self._all_reduce(parts, pg)
            for i, part in zip(by_group[pg], parts):
                work[i].append(part)

        # Stage 3: clip, scale, momentum, decay, apply.
        for (entry, grad, p32, state, stats, update_sq), seg_updates in zip(work, updates):
            for slot, sums, u, u_sq in zip(self.slots[id(entry.tensor)], stats, seg_updates, update_sq):
                s = slot.segment
                state[f"{s.name}.RMS"] = (sums[-1] / s.full_numel).sqrt()
                lr = learning_rate(group, state["step"], state[f"{s.name}.RMS"]) * s.lr_scale
                clip_by_rms_(u, (u_sq / s.full_numel).sqrt().squeeze(0), group["clip_threshold"])
                u.mul_(lr)
                if group["beta1"] is not None:
                    u = ema_(state[f"{s.name}.exp_avg"], u, group["beta1"])
                piece = p32[s.offset:s.offset + s.numel]
                if group["weight_decay"] != 0 and s.decay:
                    piece.add_(piece * (-group["weight_decay"] * lr))
                piece.sub_(u)
            if p32.data_ptr() != entry.tensor.data_ptr():  # stepped in an fp32 copy
                entry.tensor.copy_(p32.view_as(entry.tensor))
        return loss

    @staticmethod
    def _local_sums(slot: _Slot, grad: Tensor, p32: Tensor, eps1: float) -> Tensor:
        """This rank's row sums and column sums of grad^2 + eps, and sum of p^2, for one segment."""
        s = slot.segment
        piece = p32[s.offset:s.offset + s.numel]
        p_sq = torch.dot(piece, piece).view(1)  # no parameter-sized temporary
        if not s.factored:
            return p_sq
        row_sum = grad.new_zeros(s.rows)
        col_sum = grad.new_zeros(slot.batches, slot.cols)
        for start, row, n, c0, c1, batch in slot.pieces:
            sq = grad[start:start + n * (c1 - c0)].view(n, c1 - c0).square().add_(eps1)
            row_sum[row:row + n] += sq.sum(dim=1)
            col_sum[batch, c0:c1] += sq.sum(dim=0)
        return torch.cat([row_sum, col_sum.view(-1), p_sq])

    @staticmethod
    def _precondition(slot: _Slot, grad: Tensor, state: dict, sums: Tensor, beta2t: float, eps1: float) -> Tensor:
        """grad / sqrt(second moment) for this rank's slice, after updating the second moment. Written over
        the gradient in place: the gradient is not needed again, and no parameter-sized buffer is made."""
        s = slot.segment
        g = grad[s.offset:s.offset + s.numel]
        if not s.factored:
            v = ema_(state[f"{s.name}.exp_avg_sq"], g.square().add_(eps1), beta2t)
            return g.mul_(v.rsqrt())
        row, col = state[f"{s.name}.exp_avg_sq_row"], state[f"{s.name}.exp_avg_sq_col"]
        ema_(row, sums[:s.rows] / slot.cols, beta2t)  # mean over columns
        ema_(col, sums[s.rows:-1].view(slot.batches, slot.cols) / slot.rows_per_batch, beta2t)  # mean over rows
        rows = row.view(slot.batches, slot.rows_per_batch)
        row_mean = rows.sum(dim=-1, keepdim=True) / slot.rows_per_batch
        r_factor = (rows / row_mean).rsqrt_().view(-1)
        c_factor = col.rsqrt()
        for start, row_index, n, c0, c1, batch in slot.pieces:
            view = grad[start:start + n * (c1 - c0)].view(n, c1 - c0)
            view.mul_(r_factor[row_index:row_index + n, None]).mul_(c_factor[batch, c0:c1])
        return g

    # ---- checkpoints: state by original parameter name, in a form torch.distributed.checkpoint reshards --
    SLICED = ("exp_avg_sq", "exp_avg")  # held per local slice; the row/column statistics are replicated

    def sharded_state_dict(self) -> dict:
        """{"step", "<param>.<state>": tensor}. Row/column statistics and RMS are the same on every rank;
        per-element state is a ShardedTensor over the flattened full parameter, so a checkpoint written at
        one world size loads at another. Collective when anything is sharded."""
        return self._packaged(lambda entry: self.state[entry.tensor] or self._fresh(entry))

    def sharded_state_template(self) -> dict:
        """Zeroed tensors of the right shapes and shardings for `dcp.load` to fill."""
        return self._packaged(self._fresh)

    def _fresh(self, entry: ShardedTensor) -> dict:
        return self._new_state(entry.tensor, self.slots[id(entry.tensor)], self.param_groups[0]["beta1"] is not None)

    def _packaged(self, state_of) -> dict:
        out = {}
        for entry in self.layout:
            state = state_of(entry)
            out["step"] = torch.tensor(state["step"])
            for segment in entry.segments:
                for key in self._state_keys(segment):
                    value = state[f"{segment.name}.{key}"]
                    sliced = key in self.SLICED and entry.group is not None
                    out[f"{segment.name}.{key}"] = self._shard(value, segment, entry.group) if sliced else value
        return out

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """The inverse of `sharded_state_dict`, for this rank's layout (the world size may have changed)."""
        for entry in self.layout:
            state = self.state[entry.tensor]
            state.clear()
            state.update(self._fresh(entry))
            state["step"] = int(loaded["step"])
            for segment in entry.segments:
                for key in self._state_keys(segment):
                    value = loaded[f"{segment.name}.{key}"]
                    if not torch.is_tensor(value) or type(value).__name__ == "ShardedTensor":
                        shards = value.local_shards()
                        value = shards[0].tensor if shards else state[f"{segment.name}.{key}"]
                    elif key in self.SLICED:  # saved unsharded, loaded into a slice
                        value = value[segment.first:segment.first + segment.numel]
                    state[f"{segment.name}.{key}"].copy_(value.view_as(state[f"{segment.name}.{key}"]))

    def _state_keys(self, segment: Segment) -> list[str]:
        keys = ["exp_avg_sq_row", "exp_avg_sq_col"] if segment.factored else ["exp_avg_sq"]
        if self.param_groups[0]["beta1"] is not None:
            keys.append("exp_avg")
        return keys + ["RMS"]

    @staticmethod
    def _shard(local: Tensor, segment: Segment, pg):
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

        shards = []
        if segment.numel:
            placement = f"rank:{dist.get_rank(pg)}/{local.device}"
            shards.append(Shard(local, ShardMetadata([segment.first], [segment.numel], placement)))
        return ShardedTensor._init_from_local_shards(shards, [segment.full_numel], process_group=pg)

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
