"""Adafactor (Shazeer & Stern, 2018) that stays exact when FSDP1 shards the parameters, with the constructor and
numerics of `transformers.optimization.Adafactor` (tested against it for every option, at 1, 2 and 4 ranks).

FSDP1 hands an optimizer 1-D shards. A plain Adafactor then stops factoring (its second moment costs a
float per element instead of R + C per matrix) and takes RMS statistics over whatever slice a rank holds,
so training changes with the number of GPUs. Here every original parameter inside a shard is a `Segment`
with its full shape; each rank computes row and column sums of its slice, one all-reduce per step turns
them into the full parameter's statistics, and a second all-reduce gives each parameter's update RMS.
The result equals single-process Adafactor on the unsharded model, up to float summation order (an RMS is
a sum of squares here, a norm there; the clip and the step size scale the update as one factor, an ulp from
transformers' division then product; scalars stay on the device, so nothing syncs the host).

The statistics of all tensors live in flat buffers and every step works in chunks driven by static index tables
(ftloop.optim.tables), so a step costs a fixed number of kernels per chunk, not per parameter: on a GPU, where each
small op is a launch, that is what bounds the optimizer's time.

The update of one parameter, as transformers computes it: the second moment's EMA with decay 1 - t^decay_rate
(factored into row and column means for matrices, whose rank-1 product approximates it), the gradient divided by
its square root, clipped to RMS <= clip_threshold, times the step size (`learning_rate`: relative or external,
times the parameter's RMS with scale_parameter), through a first moment with beta1, and decoupled weight decay
on the parameter before the update.
"""

from __future__ import annotations

import torch
import math

import torch.distributed as dist
from torch import Tensor

from ftloop.fsdp.internals import local_slice, sharded_tensor
from ftloop.optim.segments import Segment, SteppedTensor
from ftloop.optim.tables import Bank, Chunk, build_banks

_LOW_PRECISION = (torch.float16, torch.bfloat16)
ROUNDINGS = ("nearest", "stochastic", "kahan")  # how a bf16 weight takes its update (--bf16-master-rounding)
# Elements of a stepped tensor worked on at once: bounds a step's temporaries (~30 bytes an element) against its
# kernel count (~40 per chunk). Large on CUDA, where every kernel costs a launch: a 7B decoder layer's shard on 8
# GPUs (29M elements) is one chunk, the temporaries ~1 GB when activations are freed. --bf16-master-rounding's
# fp32 copies of bf16 weights are made a chunk at a time too.
CHUNK_ELEMENTS = {"cuda": 1 << 25, "cpu": 1 << 22}
# Tensors smaller than this are packed together into shared chunks: packing copies a tensor's gradient and weights
# (~7 passes over its elements) to save a chunk's ~40 kernels. The break-even: a CUDA launch (~5 us) costs what
# copying ~2M fp32 elements does at 3 TB/s, so on a GPU ~10M elements; a CPU op's dispatch (~3 us) what ~8k
# elements cost, so ~30k.
PACK_BELOW = {"cuda": 1 << 23, "cpu": 1 << 15}


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


def round_stochastically_(value: Tensor, noise: torch.Generator) -> Tensor:
    """In place: fp32 `value` made exactly representable in bf16, rounded stochastically. Uniform noise is added
    below the 16 bits bf16 drops, then they are dropped: a value rounds away from zero with probability (distance
    to the lower magnitude) / (bf16 step), so its expected value is exact."""
    bits = value.view(torch.int32)
    bits.add_(torch.empty_like(bits).random_(0, 1 << 16, generator=noise)).bitwise_and_(-65536)
    return value


class ShardedAdafactor(torch.optim.Optimizer):
    """Adafactor over FSDP1 shards (or plain tensors), with per-parameter weight decay and lr scale.

    Build the layout with `ftloop.optim.segments.describe_fsdp(model)` (one segment per whole tensor without
    FSDP); every rank must pass the same layout order. The other arguments are transformers' Adafactor's. To save
    memory, `step` turns fp32 gradients into the update in place: read gradients before stepping, clear them after.

    Kernels: a step runs a fixed number of ops per chunk of at most `chunk_elements` elements (default
    CHUNK_ELEMENTS of the device; small tensors share one, a larger one is cut into several) and a fixed number per
    process group, however many parameters and FSDP units there are (tests/test_optimizer_ops.py counts them); and
    2 all-reduces.

    Memory: the statistics are flat buffers per process group (ftloop.optim.tables): R + C floats per matrix, a
    float per local element of a vector, one per parameter, and per local element the first moment (beta1) and the
    Kahan buffer (bf16_rounding="kahan"); each stepped tensor's state holds views of its part, `segment_state` each
    parameter's. A step's temporaries are a few fp32 and int32 copies of one chunk; with bf16 gradients the update
    is computed twice (once for its RMS, once to apply it) rather than held for every tensor until the RMS
    all-reduce. `bf16_rounding` is how a bf16 weight takes its update: see ROUNDINGS and --bf16-master-rounding.
    """

    def __init__(self, layout: list[SteppedTensor], lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, bf16_rounding: str = "nearest", rounding_seed: int = 0,
                 chunk_elements: int | None = None):
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
        # Stochastic rounding draws from its own generator, seeded by (rounding_seed, step, chunk): every
        # replica of a tensor (NO_SHARD, HYBRID_SHARD) rounds alike whatever else used the global generators,
        # and a resumed run draws what the uninterrupted one did.
        self.rounding_seed = rounding_seed
        self.layout = layout
        sizes = {kind: chunk_elements for kind in CHUNK_ELEMENTS} if chunk_elements else CHUNK_ELEMENTS
        self.banks = build_banks(layout, sizes, PACK_BELOW)
        self.units = {id(unit.entry.tensor): unit for bank in self.banks for unit in bank.units}
        self.flat: list[dict | None] = [None] * len(self.banks)  # per bank: its statistics (made at the first step)
        self.attached = False  # whether every tensor's state is views of the banks' buffers

    def _compensated(self, p: Tensor) -> bool:
        return self.bf16_rounding == "kahan" and p.dtype in _LOW_PRECISION

    # ---- state: flat per bank; each stepped tensor's state is views of its part, each parameter's views of those ---
    def _fresh(self, entry: SteppedTensor) -> dict:
        """Zeroed state of one stepped tensor, in tensors of its own."""
        p, spans = entry.tensor, self.units[id(entry.tensor)].spans
        state = {"step": 0, **{key: torch.zeros(len(spans[key]), device=p.device)
                               for key in ("row", "col", "vector", "RMS")}}
        if self.param_groups[0]["beta1"] is not None:
            state["exp_avg"] = torch.zeros(p.numel(), device=p.device)
        if self._compensated(p):  # what rounding took from the weight, given back at the next update
            state["compensation"] = torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
        return state

    def _attach(self) -> None:
        """Make the banks' buffers (zeros) where missing, and point every tensor's state at its part of them."""
        if self.attached:
            return
        for number, bank in enumerate(self.banks):
            if self.flat[number] is None:
                sizes = dict(row=bank.rows, col=bank.cols, vector=bank.vector, RMS=bank.segments)
                flat = {key: torch.zeros(size, device=bank.device) for key, size in sizes.items()}
                if self.param_groups[0]["beta1"] is not None:
                    flat["exp_avg"] = torch.zeros(bank.elements, device=bank.device)
                compensated = [u.entry.tensor.dtype for u in bank.units if self._compensated(u.entry.tensor)]
                if compensated:
                    flat["compensation"] = torch.zeros(bank.elements, device=bank.device, dtype=compensated[0])
                self.flat[number] = flat
            flat = self.flat[number]
            for unit in bank.units:
                state = self.state[unit.entry.tensor]
                if not state:
                    state.update(self._fresh(unit.entry))
                for key, value in state.items():
                    if key == "step":
                        continue
                    span = unit.spans["element" if key in ("exp_avg", "compensation") else key]
                    view = flat[key][span.start:span.stop]
                    if value.data_ptr() != view.data_ptr() or value.numel() != view.numel():
                        state[key] = view.copy_(value)  # a loaded or fresh tensor: its values into the bank
        self.attached = True

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then the loaded state copied into the banks (torch's replaces the state's tensors). torch casts
        floating state to its parameter's dtype, which for bf16 parameters would round the fp32 statistics to bf16:
        the saved tensors are put back as they were first."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        for p, i in zip((p for group in self.param_groups for p in group["params"]), ids):
            for key, value in saved.get(i, {}).items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(p.device)
        self.attached = False
        self._attach()

    def segment_state(self, entry: SteppedTensor, state: dict | None = None) -> dict:
        """Each original parameter's state as views of a stepped tensor's (by default its live state), keyed
        "<param>.<state>" in transformers' names: exp_avg_sq_row (the rows of every matrix of a batch, flattened),
        exp_avg_sq_col (matrices x columns), exp_avg_sq (a vector's local slice), exp_avg and compensation (the local
        slice), RMS (0-dim)."""
        if state is None:
            self._attach()
            state = self.state[entry.tensor]
        unit = self.units[id(entry.tensor)]
        spans, out = unit.spans, {}
        for place in unit.places:
            seg = place.segment
            if seg.factored:
                row, col = place.row - spans["row"].start, place.col - spans["col"].start
                out[f"{seg.name}.exp_avg_sq_row"] = state["row"][row:row + seg.rows]
                cols = place.batches * seg.shape[-1]
                out[f"{seg.name}.exp_avg_sq_col"] = state["col"][col:col + cols].view(place.batches, -1)
            else:
                vector = place.vector - spans["vector"].start
                out[f"{seg.name}.exp_avg_sq"] = state["vector"][vector:vector + seg.numel]
            for key in ("exp_avg", "compensation"):
                if key in state:
                    out[f"{seg.name}.{key}"] = state[key][seg.offset:seg.offset + seg.numel]
            out[f"{seg.name}.RMS"] = state["RMS"][place.index - spans["RMS"].start]
        return out

    # ---- the step -------------------------------------------------------------------------------------------------
    @staticmethod
    def _views(bank: Bank, chunk: Chunk, gradients: bool) -> list[Tensor | None]:
        """The chunk's parts of its tensors' flattened weights, or gradients (None where a tensor has none)."""
        out = []
        for unit, first, last in chunk.parts:
            p = bank.units[unit].entry.tensor
            t = p.grad if gradients else p
            out.append(None if t is None else t.view(-1)[first:last])
        return out

    def _fp32_grad(self, bank: Bank, chunk: Chunk) -> tuple[Tensor, list[Tensor] | None]:
        """The chunk's gradient in fp32, and the gradients' own memory where what is written there is kept: the
        gradient itself (one tensor's fp32 gradient), the views a copy can be written back to (fp32 gradients of
        small tensors packed together), or None (bf16 gradients: their copy is made again when needed)."""
        views = self._views(bank, chunk, gradients=True)
        kept = all(v is not None and v.dtype not in _LOW_PRECISION for v in views)
        if kept and len(views) == 1:
            return views[0], views
        views = [torch.zeros(last - first, device=bank.device) if v is None else v
                 for v, (_, first, last) in zip(views, chunk.parts)]
        return (views[0] if len(views) == 1 else torch.cat(views)).float(), views if kept else None

    def _fp32_weights(self, bank: Bank, chunk: Chunk) -> Tensor:
        views = self._views(bank, chunk, gradients=False)
        return (views[0] if len(views) == 1 else torch.cat(views)).float()

    @staticmethod
    def _columns(chunk: Chunk, pieces: Tensor) -> Tensor:
        """Each element's column in its bank's sums (the spare after the parameters for vectors and padding), from
        each element's piece."""
        columns = chunk.piece_col.index_select(0, pieces)
        return columns.add_(torch.arange(chunk.numel, dtype=torch.int32, device=columns.device))

    @staticmethod
    def _pieces(chunk: Chunk) -> Tensor:
        """Each element's piece in the chunk."""
        return torch.repeat_interleave(chunk.lengths, output_size=chunk.numel)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.param_groups) != 1:
            raise ValueError("ShardedAdafactor takes one parameter group; per-parameter settings live in Segments")
        group = self.param_groups[0]
        self._attach()
        for entry in self.layout:
            self.state[entry.tensor]["step"] += 1
        steps = [self.state[bank.units[0].entry.tensor]["step"] for bank in self.banks]

        # Stage 1: each bank's local sums, a chunk at a time; one all-reduce.
        # The weights' RMS is only read to scale the step size (scale_parameter): transformers records it every step.
        sums = [self._local_sums(bank, group["eps"][0], group["scale_parameter"]) for bank in self.banks]
        for bank, bank_sums in zip(self.banks, sums):
            _all_reduce(bank_sums[:bank.reduced], bank.group)

        # Stage 2: second moments, then each parameter's sum of update^2; one all-reduce.
        tables, updates_sq = [], []
        for bank, bank_sums, flat, step in zip(self.banks, sums, self.flat, steps):
            tables.append(self._second_moments(bank, flat, bank_sums, beta2_at(step, group["decay_rate"])))
            update_sq = torch.zeros(bank.segments + 1, device=bank.device)
            for chunk in bank.chunks:
                update, kept = self._fp32_grad(bank, chunk)
                self._precondition(tables[-1], chunk, update)
                if kept is not None and len(kept) > 1:  # kept in the fp32 gradients (else made again in stage 3)
                    torch._foreach_copy_(kept, list(update.split([v.numel() for v in kept])))
                update_sq.index_add_(0, chunk.run_segment, torch.segment_reduce(
                    update * update, "sum", lengths=chunk.run_lengths, unsafe=True))
            _all_reduce(update_sq, bank.group)
            updates_sq.append(update_sq)

        # Stage 3: clip, scale, momentum, decay, apply.
        for number, (bank, bank_sums, step, table, update_sq) in enumerate(zip(self.banks, sums, steps, tables,
                                                                               updates_sq)):
            self._apply_updates(number, bank_sums, step, table, update_sq, group)
        return loss

    def _local_sums(self, bank: Bank, eps1: float, weights_too: bool) -> Tensor:
        """This rank's share of the bank's sums: per piece grad^2 + eps (on its row, or its vector element), per
        column the same, per parameter p^2 (`weights_too`); laid out as ftloop.optim.tables describes."""
        sums = torch.zeros(bank.sums_size, device=bank.device)
        per_parameter = sums[bank.rows + bank.cols:bank.reduced]
        eps = torch.full((), eps1, device=bank.device)
        for chunk in bank.chunks:
            grad, _ = self._fp32_grad(bank, chunk)
            squares = torch.addcmul(eps, grad, grad)  # grad^2 + eps in one pass
            sums.index_add_(0, chunk.piece_row, torch.segment_reduce(squares, "sum", lengths=chunk.lengths,
                                                                     unsafe=True))
            sums.index_add_(0, self._columns(chunk, self._pieces(chunk)), squares)
            del grad, squares
            if not weights_too:
                continue
            weights = self._fp32_weights(bank, chunk)
            per_parameter.index_add_(0, chunk.run_segment, torch.segment_reduce(
                weights * weights, "sum", lengths=chunk.run_lengths, unsafe=True))
        return sums

    @staticmethod
    def _second_moments(bank: Bank, flat: dict, sums: Tensor, beta2t: float) -> Tensor:
        """The EMAs of grad^2 (row and column means for matrices, per element for vectors), and the table of the
        factors grad / sqrt(second moment) takes: rsqrt(row / mean of its matrix's rows) x rsqrt(column), as
        transformers' _approx_sq_grad, or rsqrt(second moment) for a vector element."""
        rows, cols = bank.rows, bank.cols
        ema_(flat["row"], sums[:rows] / bank.row_cols, beta2t)  # mean over columns
        ema_(flat["col"], sums[rows:rows + cols] / bank.col_rows, beta2t)  # mean over rows
        ema_(flat["vector"], sums[bank.reduced:bank.reduced + bank.vector], beta2t)
        means = torch.segment_reduce(flat["row"], "sum", lengths=bank.row_groups, unsafe=True).div_(bank.group_rows)
        row_factor = (flat["row"] / means.repeat_interleave(bank.row_groups, output_size=rows)).rsqrt_()
        return torch.cat([row_factor, flat["col"].rsqrt(), bank.ones, flat["vector"].rsqrt(), bank.zero])

    def _precondition(self, table: Tensor, chunk: Chunk, grad: Tensor) -> None:
        """grad / sqrt(second moment), written over `grad` (one chunk, fp32)."""
        pieces = self._pieces(chunk)
        factor = table.index_select(0, chunk.piece_row).index_select(0, pieces)  # the row's (or vector's) factor
        grad.mul_(factor.mul_(table.index_select(0, self._columns(chunk, pieces))))

    def _apply_updates(self, number: int, sums: Tensor, step: int, table: Tensor, update_sq: Tensor,
                       group: dict) -> None:
        """Clip each parameter's update to RMS <= clip_threshold, scale it by its learning rate, through the first
        moment, decay the weights and apply, a chunk at a time."""
        bank, flat = self.banks[number], self.flat[number]
        if group["scale_parameter"]:
            rms = (sums[bank.rows + bank.cols:bank.reduced] / bank.full_numel).sqrt()
            flat["RMS"].copy_(rms[:bank.segments])
            lr = learning_rate(group, step, rms) * bank.lr_scale.float()
            decay = lr * (-group["weight_decay"]) * bank.decays.float()
        else:  # the python lr times each scale in float64, as a python product of the two would be
            lr64 = bank.lr_scale * learning_rate(group, step, None)
            lr, decay = lr64.float(), (lr64 * (-group["weight_decay"]) * bank.decays).float()
        clip = ((update_sq / bank.full_numel).sqrt() / group["clip_threshold"]).clamp_(min=1.0)
        scale = lr / clip  # transformers divides by the clip, then multiplies by lr: an ulp apart at most
        for index, chunk in enumerate(bank.chunks):
            update, kept = self._fp32_grad(bank, chunk)
            if kept is None:  # the same update again, from the second moments stage 2 left
                self._precondition(table, chunk, update)
            runs = torch.repeat_interleave(chunk.run_lengths, output_size=chunk.numel)  # each element's run

            def per_element(values: Tensor) -> Tensor:  # each parameter's value on its elements
                return values.index_select(0, chunk.run_segment).index_select(0, runs)

            update.mul_(per_element(scale))
            if group["beta1"] is not None:
                update = ema_(flat["exp_avg"][chunk.start:chunk.stop], update, group["beta1"])
            views = self._views(bank, chunk, gradients=False)
            noise = None
            if self.bf16_rounding == "stochastic" and views[0].dtype in _LOW_PRECISION:
                noise = torch.Generator(device=bank.device)
                noise.manual_seed(hash((self.rounding_seed, step, number, index)) % 2**63)
            compensation = flat["compensation"][chunk.start:chunk.stop] if self._compensated(views[0]) else None
            self._apply(views, update, per_element(decay) if group["weight_decay"] != 0 else None,
                        compensation, noise)

    @staticmethod
    def _apply(views: list[Tensor], u: Tensor, decay: Tensor | None, compensation: Tensor | None,
               noise: torch.Generator | None) -> None:
        """weights += decay * weights - u (decay on the weights before the update, as transformers does it) for the
        chunk's `views` of its tensors (one: in place; several: computed on their concatenation and copied back with
        one foreach copy); bf16 weights are rounded with `noise` (stochastic), through `compensation` (Kahan), or to
        nearest."""
        if len(views) == 1 and views[0].dtype not in _LOW_PRECISION:
            weight = views[0]
            if decay is not None:
                weight.add_(weight * decay)
            weight.sub_(u)
            return
        w32 = (views[0] if len(views) == 1 else torch.cat(views)).float()
        if decay is not None:
            w32.add_(w32 * decay)
        w32.sub_(u)
        if compensation is not None:  # Kahan: add back what the last rounding lost, round, keep what this loses
            w32.add_(compensation.float())
        elif noise is not None:
            round_stochastically_(w32, noise)
        if len(views) == 1:
            views[0].copy_(w32)
            rounded = views[0]
        else:
            rounded = w32.to(views[0].dtype)
            torch._foreach_copy_(views, list(rounded.split([v.numel() for v in views])))
        if compensation is not None:
            compensation.copy_(w32.sub_(rounded.float()))

    # ---- checkpoints: state by original parameter name, in a form torch.distributed.checkpoint reshards --
    SLICED = ("exp_avg_sq", "exp_avg", "compensation")  # held per local slice; the row/column statistics are replicated

    def sharded_state_dict(self) -> dict:
        """{"step", "<param>.<state>": tensor}. Row/column statistics and RMS are the same on every rank;
        per-element state is a ShardedTensor over the flattened full parameter, so a checkpoint written at
        one world size loads at another. No collective."""
        self._attach()
        return self._packaged(lambda entry: self.state[entry.tensor])

    def sharded_state_template(self) -> dict:
        """Zeroed tensors of the right shapes and shardings for `dcp.load` to fill."""
        return self._packaged(self._fresh)

    def _packaged(self, state_of) -> dict:
        out = {}
        for entry in self.layout:
            state = state_of(entry)
            out["step"] = torch.tensor(state["step"])
            views = self.segment_state(entry, state)
            for segment in entry.segments:
                for key in self._state_keys(segment, entry.tensor):
                    value = views[f"{segment.name}.{key}"]
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
        self.attached = False
        self._attach()  # the fresh zeros into the banks
        for entry in self.layout:
            state = self.state[entry.tensor]
            state["step"] = int(loaded["step"])
            views = self.segment_state(entry, state)
            for segment in entry.segments:
                for key in self._state_keys(segment, entry.tensor):
                    value, view = loaded[f"{segment.name}.{key}"], views[f"{segment.name}.{key}"]
                    mine = local_slice(value)
                    if mine is not value:  # saved sharded: this rank's slice (none held: the fresh zeros stay)
                        value = view if mine is None else mine
                    elif key in self.SLICED:  # saved unsharded, loaded into a slice
                        value = value[segment.first:segment.first + segment.numel]
                    view.copy_(value.view_as(view))

    def _state_keys(self, segment: Segment, p: Tensor) -> list[str]:
        keys = ["exp_avg_sq_row", "exp_avg_sq_col"] if segment.factored else ["exp_avg_sq"]
        if self.param_groups[0]["beta1"] is not None:
            keys.append("exp_avg")
        if self._compensated(p):
            keys.append("compensation")
        return keys + ["RMS"]


def _all_reduce(buffer: Tensor, pg) -> None:
    """Sum `buffer` over the process group in place (nothing to do when nothing is sharded)."""
    if pg is None:
        return
    if buffer.device.type == "cpu" and dist.get_backend(pg) == "nccl":  # shards offloaded to the host
        on_device = buffer.cuda()
        dist.all_reduce(on_device, group=pg)
        buffer.copy_(on_device)
        return
    dist.all_reduce(buffer, group=pg)
