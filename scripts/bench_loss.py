"""Peak memory of the supervised loss, chunked or not, on the CPU: `python scripts/bench_loss.py`.

    python scripts/bench_loss.py [--positions 2048] [--hidden 96] [--vocab 151936] [--chunk-sizes 0,1024,256]
                                 [--dtypes float32,bfloat16] [--bf16-divisor 16] [--threads 2]

For each lm_head dtype and --loss-chunk-size, in a fresh process: ftloop.loss.supervised_loss forward and backward
over one row of `positions` supervised positions (and a quarter as many ignored ones), lm_head a bias-free
(hidden x vocab) Linear whose weight takes a gradient, as in training. Two measures of the peak, both taken from
just before the loss to the end of its backward:
  - tracked: the most bytes alive at once among the tensors created meanwhile (a TorchDispatchMode below autograd
    sees every op's outputs; a storage counts from its creation to its release), all of them, and those with the
    logits' shape (rows x vocab: lm_head's output, its fp32 copy, the log-softmax and their gradients), whose peak
    is also given per entry of one chunk's (positions x vocab) logits (B/elem; all positions at chunk size 0);
  - RSS: the growth of the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs), which
    sees what the allocator really took (tensors this large are mmapped and given back when freed).
The ratio compares each row's tracked peak with its dtype's chunk size 0 (all positions at once). The bf16 rows
run `positions / --bf16-divisor` positions and chunk sizes divided likewise (the same fractions of the row): on
CPUs without bf16 matmul kernels the backward's (positions x vocab) @ (vocab x hidden) takes a hundred times
longer than in fp32. The matmuls' cost grows with --hidden, the logits' memory does not; lm_head's weight
gradient (vocab x hidden) is part of each peak. The times are of one forward and backward (the chunked ones
recompute the logits), on a shared CPU a rough guide. About two minutes and 4 GB at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ftloop.loss import IGNORE_INDEX, LOSS_CHUNK_SIZE, supervised_loss  # noqa: E402


class LiveTensors(TorchDispatchMode):
    """The bytes alive at once, at most, among the tensors the ops create while the mode is on (and those of them
    that `logits(tensor)` picks). Below autograd it sees forward, recomputation and backward alike; it counts each
    new storage (an op's output that shares no input's storage: views and in-place results are not new) until the
    storage is released. Tensors that existed before the mode are not counted."""

    def __init__(self, logits=lambda tensor: False):
        super().__init__()
        self.logits = logits
        self.now = self.peak = self.logits_now = self.logits_peak = 0
        self.largest_logits: tuple[int, ...] = ()  # the shape of the largest logits tensor created

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in inputs:
                    self._count(storage, tensor)
        return out

    def _count(self, storage, tensor: torch.Tensor) -> None:
        size, logits = storage.nbytes(), self.logits(tensor)
        self.now += size
        self.peak = max(self.peak, self.now)
        if logits:
            self.logits_now += size
            self.logits_peak = max(self.logits_peak, self.logits_now)
            if tensor.numel() > (torch.Size(self.largest_logits).numel() if self.largest_logits else 0):
                self.largest_logits = tuple(tensor.shape)
        weakref.finalize(storage, self._release, size, logits)

    def _release(self, size: int, logits: bool) -> None:
        self.now -= size
        if logits:
            self.logits_now -= size


def logits_shaped(vocab: int, hidden: int):
    """(rows x vocab) tensors: the logits and their gradients; not lm_head's weight gradient, which autograd
    computes transposed, (hidden x vocab): the rows tell them apart, unless a chunk has `hidden` rows."""
    return lambda t: t.dim() == 2 and t.shape[-1] == vocab and t.shape[0] != hidden


def chunk_rows(positions: int, chunk_size: int) -> set[int]:
    """The numbers of positions the chunks of supervised_loss hold."""
    if chunk_size == 0 or chunk_size >= positions:
        return {positions}
    return {chunk_size, positions % chunk_size} - {0}


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def worker(positions: int, hidden: int, vocab: int, chunk_size: int, dtype: str) -> dict:
    """One loss forward and backward in this process: its peaks, as `main` prints them."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dt)
    ignored = positions // 4
    targets = torch.randint(vocab, (positions + ignored,))
    targets[torch.randperm(positions + ignored)[:ignored]] = IGNORE_INDEX
    labels = torch.cat([torch.tensor([IGNORE_INDEX]), targets])[None]
    states = torch.randn(1, len(targets) + 1, hidden, dtype=dt, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS
    before = status_mib("VmRSS")
    tracker = LiveTensors(logits_shaped(vocab, hidden))
    started = time.perf_counter()
    with tracker:
        hidden_states = states * 1  # as the model's last norm hands it over: a tensor of the graph
        loss, count = supervised_loss(hidden_states, labels, lm_head, chunk_size)
        forward_peak = tracker.peak
        loss.backward()
    seconds = time.perf_counter() - started
    assert int(count) == positions and lm_head.weight.grad is not None
    return {"positions": positions, "chunk_size": chunk_size, "dtype": dtype, "seconds": seconds,
            "peak": tracker.peak, "forward_peak": forward_peak, "logits_peak": tracker.logits_peak,
            "largest_logits": list(tracker.largest_logits), "rss_peak_mib": status_mib("VmHWM") - before,
            "weight_grad": lm_head.weight.numel() * lm_head.weight.element_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=2048, help="supervised positions")
    parser.add_argument("--hidden", type=int, default=96,
                        help="not a chunk size: lm_head's weight gradient would count as logits")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-sizes", default=f"0,{LOSS_CHUNK_SIZE},256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--bf16-divisor", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # json of worker()'s arguments
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        divisor = args.bf16_divisor if dtype == "bfloat16" else 1
        for chunk_size in [int(c) // divisor for c in args.chunk_sizes.split(",")]:
            asked = dict(positions=args.positions // divisor, hidden=args.hidden, vocab=args.vocab,
                         chunk_size=chunk_size, dtype=dtype)
            if args.hidden in chunk_rows(asked["positions"], chunk_size):
                raise SystemExit(f"bench_loss: --hidden {args.hidden} is a chunk's number of rows: choose another")
            done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker",
                                   json.dumps(asked)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench_loss: worker failed:\n{done.stderr[-4000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    mib = 2 ** 20
    print(f"\nsupervised_loss forward + backward, hidden {args.hidden}, vocab {args.vocab}, {args.threads} threads; "
          f"MiB above what existed before the loss")
    print(f"{'lm_head':<9} {'positions':>9} {'chunk':>6} {'tracked':>8} {'forward':>8} {'logits':>8} "
          f"{'B/elem':>7} {'largest logits':>15} {'RSS':>7} {'ratio':>6} {'seconds':>8}")
    for row in rows:
        whole = next((r for r in rows if r["dtype"] == row["dtype"] and r["chunk_size"] == 0), row)
        rows_per_chunk = max(chunk_rows(row["positions"], row["chunk_size"]))
        per_element = row["logits_peak"] / (rows_per_chunk * args.vocab)
        print(f"{row['dtype']:<9} {row['positions']:>9} {row['chunk_size']:>6} {row['peak'] / mib:>8.0f} "
              f"{row['forward_peak'] / mib:>8.0f} {row['logits_peak'] / mib:>8.0f} {per_element:>7.2f} "
              f"{'x'.join(map(str, row['largest_logits'])):>15} {row['rss_peak_mib']:>7.0f} "
              f"{row['peak'] / whole['peak']:>6.3f} {row['seconds']:>8.1f}")
    print(f"(lm_head's weight gradient: {rows[0]['weight_grad'] / mib:.0f} MiB in {rows[0]['dtype']}, in every "
          f"tracked peak; B/elem: the logits-shaped peak per entry of one chunk's logits)")


if __name__ == "__main__":
    main()
