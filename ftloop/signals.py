"""Preemption and Ctrl-C: finish the optimizer step, save a checkpoint, exit.

A signal handler may run between any two bytecodes, in the middle of a collective; so it only records the
request, and the training loop acts on it at the next step boundary, after every rank has agreed (the request
travels in the step's all-reduce: a signal that reached only some ranks still stops them all at the same step).

Schedulers signal the whole process group (SLURM's scancel, Kubernetes, torchrun passing its own SIGTERM on),
DataLoader workers included. A worker killed by it would take its rank down before the rank can save (the
loader raises on a dead worker), so workers ignore the stop signals and leave it to their rank, which shuts
them down (and they leave by themselves if it dies). The signals are held while workers are forked, so that
none can reach a worker before it ignores them.

A worker whose torchrun agent dies (`kill -9`, an OOM kill) would train on alone, holding the output folder, while a
scheduler's requeue starts another run there. `watch_launcher` treats the agent's death as a SIGTERM: the ranks stop
together at the next step boundary, save a whole checkpoint and leave.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A signal sent to every process of the run reaches a rank twice: directly, and again from torchrun, which passes
# its own on. The same signal again within this many seconds is that one delivery, not a second Ctrl-C.
SAME_DELIVERY_S = 2.0


class StopRequest:
    """Set by SIGTERM or SIGINT. A second SIGINT stops at once (KeyboardInterrupt), as users expect, unless it is
    the first one arriving again (SAME_DELIVERY_S)."""

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
        elif signum == signal.SIGINT:
            if signum != self.signum or time.monotonic() - self._first_at > SAME_DELIVERY_S:
                raise KeyboardInterrupt

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@contextlib.contextmanager
def stop_signals_held():
    """Hold SIGTERM and SIGINT in this thread while DataLoader workers start (around `iter(loader)`): a worker,
    forked from it, inherits them held and ignores them before letting them through (`ignore_stop_signals`).
    This process still gets them (through another thread, or when the block ends)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the stop signals are its rank's to act on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # a signal held since the fork is dropped here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


LAUNCHER_POLL_S = 1.0


def watch_launcher() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), send this process SIGTERM when its parent, the torchrun agent, is
    gone (this process is reparented: polled every LAUNCHER_POLL_S from a daemon thread; a parent-death signal
    would fire when the agent's spawning thread ends, not the agent)."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(LAUNCHER_POLL_S)
        print(f"ftloop: [rank {os.environ.get('RANK', '?')}] the torchrun agent (pid {agent}) is gone; stopping at "
              "the next step with a checkpoint", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ftloop-launcher-watch", daemon=True).start()
