"""Process-group setup and the few collective helpers the loop needs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. Without them (`python -m ftloop.train`)
we start a one-process group on a free local port, so the same code path runs everywhere.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

from ftloop.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of the run, and the device it computes on."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    local_world_size: int
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE): HYBRID_SHARD shards over them."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device = torch.device("cpu")) -> World:
        """One process and no process group (code that runs in a run and alone: the data check, a test)."""
        return cls(rank=0, local_rank=0, world_size=1, device=device, backend="none", local_world_size=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800) -> World:
    """gloo on the CPU, nccl with one CUDA device per local rank. `timeout_s` (--ddp-timeout): how long any
    collective may wait for the other ranks before it fails."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Every micro-batch has another length, so the caching allocator's fixed-size blocks fragment: expandable
    # segments grow one mapping instead. Set before CUDA starts (it is read once); a user's own setting wins.
    if "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # After torchrun --max-restarts restarts the workers, they meet in the agent's key-value store,
            # which still holds the previous attempt's process-group addresses under the same keys: gloo then
            # dials dead peers. A key prefix per attempt keeps the attempts apart.
            agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                        is_master=False)
            kwargs["store"] = dist.PrefixStore(f"ftloop/attempt-{restart}", agent_store)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    quiet_library_chatter(rank)
    return World(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend,
                 local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def make_deterministic() -> None:
    """--full-determinism: the same results from the same inputs on CUDA too, at some speed. cuBLAS gets a fixed
    workspace (no split-K reductions whose order varies), torch's deterministic algorithms replace the atomic
    scatter-adds of embedding / index_put / SDPA backward (an op without one raises), flash-attention's backward
    runs its deterministic kernel (transformers reads FLASH_ATTENTION_DETERMINISTIC), cuDNN does not pick kernels by
    timing. Call before CUDA starts. Unlike transformers' enable_full_determinism, no CUDA_LAUNCH_BLOCKING: launching
    every kernel synchronously would also stop NCCL's transfers from overlapping compute."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def quiet_library_chatter(rank: int) -> None:
    """Rank 0 speaks for the run; the other ranks keep only errors. Everywhere, drop FSDP1's notices that its
    state-dict API and ShardedTensor are deprecated in favour of FSDP2's DTensor: ftloop is FSDP1 by design;
    and gloo's note that a CPU process group also registers other backends."""
    warnings.filterwarnings("ignore", message=r"FSDP\.state_dict_type\(\) and FSDP\.set_state_dict_type\(\)")
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor")
    warnings.filterwarnings("ignore", message=r"Multiple backends are registered with this ProcessGroup")
    if rank != 0:
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def leave(code: int) -> NoReturn:
    """End this process now with `code`, without the interpreter's teardown. There, the C++ threads of a gloo
    process group that something still holds (FSDP modules live in reference cycles, so destroy_process_group
    does not free it) are destroyed with the interpreter and can abort it: SIGABRT, "terminate called without an
    active exception" (pytorch/pytorch#190489; seen in this project's suite). Everything ftloop writes is
    closed before; standard output and error are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def agree(world: World, attempt: Callable[[], T], ranks: str = "every rank", share: bool = False,
          gather: bool = False) -> T | list | None:
    """Run `attempt()` on `ranks` ("every rank" or "rank 0") and agree on how it went, in one collective: a
    ConfigError it raises on any rank is raised on every rank, with the first such rank's line, so that no rank
    is left waiting in a later collective for one that stopped. Returns the attempt's result where it ran (None
    elsewhere); with `share`, rank 0's result on every rank; with `gather`, every rank's results, in rank order,
    on every rank (they must pickle)."""
    result, problem = None, None
    if ranks == "every rank" or world.is_main:
        try:
            result = attempt()
        except ConfigError as err:
            problem = str(err)
    outcomes = [(problem, result)]
    if world.world_size > 1:
        outcomes = [None] * world.world_size
        dist.all_gather_object(outcomes, (problem, result if gather or (share and world.is_main) else None))
        problem = next((p for p, _ in outcomes if p), None)
        result = outcomes[0][1] if share else result
    if problem:
        raise ConfigError(problem)
    return [r for _, r in outcomes] if gather else result


def print0(*args, **kwargs) -> None:
    """Rank 0 speaks; the other ranks stay quiet unless something is wrong."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small vector of statistics over all ranks in one collective (fp64 so counts stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_rows(values: list[float], device: torch.device) -> torch.Tensor:
    """Every rank's small vector of statistics, one row per rank, in one collective (fp64: counts stay exact)."""
    mine = torch.as_tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine[None]
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows)
