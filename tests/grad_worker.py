"""Run under torchrun by the tests: one optimizer step's gradients (not applied) and dtype facts.

Usage: torchrun ... tests/grad_worker.py OUT.pt [--clip] -- <ftloop.train flags>
With --clip, the gradients are clipped as the loop clips them (ftloop.steps.clip_gradients, --max-grad-norm)
and "grad_norm" holds the norm it returned, from before clipping.
Rank 0 saves {"grads": {name: full fp32 gradient}, "loss": step mean loss, "dtypes": {...},
"micro_batch_targets": [supervised tokens of each micro-batch, this rank], "unsharded_grad_between_micro_batches":
whether any FSDP unit held a gradient of its unsharded size when a later micro-batch started, "unit_grads":
{unit: (its flat parameter's requires_grad, whether it holds a gradient)}, "images_per_rank": [whether each rank's
micro-batches held an image], "planned_units" / "wrapped_units": the sizes of the units the memory plan counts and
of those FSDP made, "sharding": {"strategy": what FSDP wrapped with, "optimizer_groups": the sizes of the groups
the optimizer's tensors are sharded over}} to OUT.pt; "dtypes" holds "reduce_scatter", the dtypes FSDP's gradient
reduce-scatters were seen to run in.
Gradients are gathered from the flat shards (or the original parameters with --use-orig-params).
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.config import parse_args
from ftloop.distributed import all_reduce_sum, init_distributed, leave
from ftloop.fsdp.internals import clean_name
from ftloop.steps import clip_gradients
from ftloop.data.loaders import count_step
from ftloop.model import build_skeleton
from ftloop.optim.build import build_optimizer
from ftloop.plan import fsdp_units
from ftloop.train import accumulate_gradients, prepare


def gathered_gradients(model, units, d) -> dict:
    """{original parameter name: full fp32 gradient} from the flat-parameter shards of every unit."""
    grads = {}
    paths = {m: n for n, m in model.named_modules()}
    for unit in units:
        flat = unit._handle.flat_param
        shard = flat.grad.detach().float() if flat.grad is not None else torch.zeros(flat.numel())
        pieces = [torch.empty_like(shard) for _ in range(d.world_size)]
        dist.all_gather(pieces, shard.contiguous()) if d.world_size > 1 else pieces.__setitem__(0, shard)
        full = torch.cat(pieces)[:flat._unpadded_unsharded_size.numel()]
        prefix = paths[unit] + "." if paths[unit] else ""
        for name, shape, chunk in zip(flat._fqns, flat._shapes, full.split(list(flat._numels))):
            grads[clean_name(prefix + name)] = chunk.view(shape).clone()
    return grads


def main() -> None:
    out, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    cfg = parse_args(flags)
    d = init_distributed()
    s = prepare(cfg, d)
    model = s.model

    matmul_input_dtypes = set()
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, args, out_: matmul_input_dtypes.add(str(args[0].dtype)))

    units = [m for m in FSDP.fsdp_modules(model) if m._handle is not None]
    unsharded_between = []

    def before_forward(module, args, kwargs):  # is any unit holding a full-size gradient from the last micro-batch?
        flats = [u._handle.flat_param for u in units]
        unsharded_between.append(any(f.grad is not None and f.grad.numel() > f._local_shard.numel()
                                     and d.world_size > 1 for f in flats))

    model.register_forward_pre_hook(before_forward, with_kwargs=True)
    reduced_in = set()  # the dtypes FSDP's gradient reduce-scatters run in, observed
    reduce_scatter = dist.reduce_scatter_single

    def observed_reduce_scatter(output, input, *args, **kwargs):
        reduced_in.add(str(input.dtype))
        return reduce_scatter(output, input, *args, **kwargs)

    dist.reduce_scatter_single = observed_reduce_scatter
    batches = iter(s.train_loader)
    micro_batches = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
    targets = count_step(micro_batches, d, len(micro_batches))[0].targets
    loss_sum = accumulate_gradients(model, micro_batches, targets, d)
    loss = float(all_reduce_sum(loss_sum.view(1), d.device)) / float(targets)
    grad_norm = clip_gradients(model, cfg.optim.max_grad_norm) if "--clip" in sys.argv[2:sys.argv.index("--")] else None
    facts = {
        "master": sorted({str(p.dtype) for p in model.parameters()}),
        "grad": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None}),
        "matmul_input": sorted(matmul_input_dtypes),
        "reduce_scatter": sorted(reduced_in),
    }
    # How the run shards: the strategy FSDP wraps with, and the ranks each tensor the optimizer steps is split over
    # (1: whole on every rank).
    layout = build_optimizer(model, cfg.optim, d.device).layout
    sharding = {"strategy": model.sharding_strategy.name,
                "optimizer_groups": sorted({dist.get_world_size(t.group) if t.group is not None else 1
                                            for t in layout})}
    paths = {m: n for n, m in model.named_modules()}
    # Which units got a gradient (FSDP allocates and reduce-scatters one only for a flat parameter that trains).
    unit_grads = {clean_name(paths[u]): (u._handle.flat_param.requires_grad, u._handle.flat_param.grad is not None)
                  for u in units}
    # The units the memory plan counts for these flags, and the ones FSDP made: the same sizes.
    planned = sorted(u.numel for u in fsdp_units(build_skeleton(cfg, s.hf_config)))
    wrapped = sorted(u._handle.flat_param._unpadded_unsharded_size.numel() for u in units)
    images_per_rank = [None] * d.world_size  # whether each rank's micro-batches held an image
    dist.all_gather_object(images_per_rank, any(b.get("pixel_values") is not None for b in micro_batches))
    grads = gathered_gradients(model, units, d) if not cfg.fsdp.use_orig_params else None
    if grads is None:
        with FSDP.summon_full_params(model, with_grads=True, rank0_only=False, writeback=False):
            grads = {clean_name(name): p.grad.detach().float().clone()
                     for name, p in model.named_parameters() if p.grad is not None}
    if d.rank == 0:
        torch.save({"grads": grads, "loss": loss, "dtypes": facts, "grad_norm": grad_norm, "unit_grads": unit_grads,
                    "images_per_rank": images_per_rank, "planned_units": planned, "wrapped_units": wrapped,
                    "sharding": sharding,
                    "micro_batch_targets": [int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches],
                    "unsharded_grad_between_micro_batches": any(unsharded_between[1:])}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
