"""Run under torchrun by tests/test_vision_mixing.py: one optimizer step's gradients for hand-built
micro-batches that mix images, videos and text differently on each rank.

Usage: torchrun ... tests/mix_worker.py SCENARIOS.json OUT.pt -- <ftloop.train flags>
SCENARIOS.json: {name: [micro-batch, ...]}, each micro-batch a list of rows' fields (ftloop.data.rows.Row:
messages, images, videos). With W processes, rank r takes micro-batches r, r + W, ... of every scenario, in order; one process
takes them all as accumulation steps. Rank 0 saves {name: {"grads": {name: full fp32 gradient}, "loss": step
mean loss}} to OUT.pt. The model comes from `prepare` (FSDP, as training builds it).
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.config import parse_args
from ftloop.data.encode import chat_format
from ftloop.data.batches import SFTDataset, make_collate
from ftloop.data.rows import Row
from ftloop.distributed import all_reduce_sum, init_distributed, leave
from ftloop.fsdp.internals import clean_name
from ftloop.data.loaders import count_step
from ftloop.steps import accumulate_gradients
from ftloop.train import prepare


def main() -> None:
    scenarios_path, out = sys.argv[1], sys.argv[2]
    cfg = parse_args(sys.argv[sys.argv.index("--") + 1:])
    d = init_distributed()
    s = prepare(cfg, d)
    model = s.model
    pad = s.tokenizer.pad_token_id
    collate = make_collate(pad, s.hf_config.image_token_id, s.hf_config.video_token_id)
    with open(scenarios_path) as f:
        scenarios = json.load(f)
    results = {}
    for name, micro_rows in scenarios.items():
        mine = micro_rows[d.rank::d.world_size]
        micro_batches = []
        for fields in mine:
            rows = [Row(**row) for row in fields]
            dataset = SFTDataset(rows, s.tokenizer, s.image_processor, cfg.data.max_seq_length,
                                 chat_format(cfg.data.system_prompt, s.hf_config.model_type, cfg.data.empty_think), name)
            micro_batches.append(collate([dataset[i] for i in range(len(rows))]))
        model.zero_grad(set_to_none=True)
        targets = count_step(micro_batches, d, len(micro_batches))[0].targets
        loss_sum = accumulate_gradients(model, micro_batches, targets, d)
        loss = float(all_reduce_sum(loss_sum.view(1), d.device)) / float(targets)
        with FSDP.summon_full_params(model, with_grads=True, rank0_only=False, writeback=False):
            grads = {clean_name(n): p.grad.detach().float().clone()
                     for n, p in model.named_parameters() if p.grad is not None}
        results[name] = {"grads": grads, "loss": loss}
    if d.rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
