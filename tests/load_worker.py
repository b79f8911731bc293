"""Run under torchrun by the tests: load a model through ftloop's rank-0 path and report what each rank saw.

Usage: torchrun ... tests/load_worker.py OUT_PREFIX -- <ftloop.train flags>
Each rank writes OUT_PREFIX.rank<R>.json with its RSS before loading, its peak RSS after FSDP wrapping and the
bytes of the tensors it broadcast or received;
rank 0 also writes OUT_PREFIX.state.pt, the full state dict gathered from all ranks' shards.
"""

import json
import resource
import sys

import torch
import torch.distributed as dist

from ftloop.config import parse_args
from ftloop.distributed import init_distributed, leave
from ftloop.train import prepare
from scripts.support import full_state_dict


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    prefix, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    cfg = parse_args(flags)
    d = init_distributed()
    import transformers  # noqa: F401  (imported before the baseline, like everything prepare() needs)
    before = rss_mib()
    broadcast, sent = dist.broadcast, []
    dist.broadcast = lambda tensor, *a, **k: sent.append(tensor.numel() * tensor.element_size()) or broadcast(
        tensor, *a, **k)
    setup = prepare(cfg, d)
    dist.broadcast = broadcast
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"{prefix}.rank{d.rank}.json", "w") as f:
        json.dump({"before_mib": before, "peak_mib": peak, "broadcast_bytes": sum(sent)}, f)
    state = full_state_dict(setup.model)
    if d.rank == 0:
        torch.save(state, f"{prefix}.state.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
