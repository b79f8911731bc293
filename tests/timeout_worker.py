"""Run under torchrun by tests/test_cli.py: --ddp-timeout reaches the process group.

Usage: torchrun --nproc_per_node 2 tests/timeout_worker.py TIMEOUT_S SLEEP_S
Rank 1 sleeps SLEEP_S before the barrier; rank 0 waits in it, and must give up after about TIMEOUT_S.
"""

import sys
import time

import torch.distributed as dist

from ftloop.distributed import init_distributed, leave

d = init_distributed(float(sys.argv[1]))
if d.rank == 1:
    time.sleep(float(sys.argv[2]))
started = time.perf_counter()
try:
    dist.barrier()
except RuntimeError as err:
    print(f"rank {d.rank} gave up after {time.perf_counter() - started:.1f}s: {str(err).splitlines()[0]}", flush=True)
    leave(3)  # not through the interpreter's teardown, which can abort with gloo threads alive
dist.destroy_process_group()
leave(0)
