"""Run under torchrun by the tests: one optimizer step's gradients (not applied) and dtype facts.

Usage: torchrun ... tests/grad_worker.py OUT.pt -- <ftloop.train flags>
Rank 0 saves {"grads": {name: full fp32 gradient}, "loss": step mean loss, "dtypes": {...}} to OUT.pt.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.config import parse_args
from ftloop.distributed import all_reduce_sum, init_distributed
from ftloop.optim.segments import clean_name
from ftloop.train import accumulate_gradients, count_step_tokens, prepare


def main() -> None:
    out, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    cfg = parse_args(flags)
    d = init_distributed()
    s = prepare(cfg, d)
    model = s.model

    matmul_input_dtypes = set()
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, args, out_: matmul_input_dtypes.add(str(args[0].dtype)))

    batches = iter(s.train_loader)
    micro_batches = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
    targets, *_ = count_step_tokens(micro_batches, d)
    loss_sum = accumulate_gradients(model, micro_batches, targets, d)
    loss = float(all_reduce_sum(loss_sum.view(1), d.device)) / float(targets)
    facts = {
        "master": sorted({str(p.dtype) for p in model.parameters()}),
        "grad": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None}),
        "matmul_input": sorted(matmul_input_dtypes),
    }
    with FSDP.summon_full_params(model, with_grads=True, rank0_only=False, writeback=False):
        grads = {clean_name(name): p.grad.detach().float().clone()
                 for name, p in model.named_parameters() if p.grad is not None}
    if d.rank == 0:
        torch.save({"grads": grads, "loss": loss, "dtypes": facts}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
