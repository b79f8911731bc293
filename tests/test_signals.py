"""SIGTERM/SIGINT only record a stop request (the loop acts at the step boundary); a second Ctrl-C stops at once."""

import os
import signal
import time

import pytest

from ftloop.errors import Stopped
from ftloop.signals import StopRequest


def test_first_signal_is_recorded_second_ctrl_c_interrupts():
    stop = StopRequest()
    try:
        assert stop.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_one_ctrl_c_arriving_twice_is_one_request_a_later_one_interrupts(monkeypatch):
    """Sent to every process, a SIGINT reaches a rank directly and again from torchrun: one request. A second
    Ctrl-C, later, still stops at once."""
    import ftloop.signals

    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same delivery, passed on by the launcher
        assert stop.signum == signal.SIGINT
        monkeypatch.setattr(ftloop.signals, "SAME_DELIVERY_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def test_stop_signals_are_held_while_loader_workers_start_and_ignored_in_them():
    from ftloop.signals import ignore_stop_signals, stop_signals_held

    stop = StopRequest()
    try:
        with stop_signals_held():  # held in this thread, and so in a worker forked from it
            pid = os.fork()
            if pid == 0:  # a worker, whose handler kills it (as DataLoader's C handler does), signalled at once
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)  # held: it waits
                ignore_stop_signals()  # dropped, then let through: the worker survives
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            os.kill(os.getpid(), signal.SIGTERM)
        # This process still gets it: at the end of the block, or through another thread that does not hold it,
        # whose C-level handler may run a moment later (the Python handler then runs here, in the main thread).
        deadline = time.monotonic() + 10
        while stop.signum == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.signum == signal.SIGTERM
    finally:
        stop.restore()


def test_stopped_exits_128_plus_the_signal_and_says_how_to_continue():
    stopped = Stopped(signal.SIGINT)  # raised where the ranks vote (ftloop.data.loaders.StepBatches)
    stopped.step, stopped.checkpoint = 12, "out/checkpoint-12"  # filled in by the loop, which saves
    assert stopped.exit_code == 130
    assert str(stopped) == ("stopped by SIGINT after step 12; checkpoint out/checkpoint-12 saved; continue with "
                            "--resume-from-checkpoint auto")
