"""Preemption and Ctrl-C: finish the optimizer step, save a checkpoint, exit.

A signal handler may run between any two bytecodes, in the middle of a collective; so it only records the
request, and the training loop acts on it at the next step boundary, after every rank has agreed (the request
travels in the step's all-reduce: a signal that reached only some ranks still stops them all at the same step).
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Set by SIGTERM or SIGINT. A second SIGINT stops at once (KeyboardInterrupt), as users expect."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
