"""SIGTERM/SIGINT only record a stop request (the loop acts at the step boundary); a second Ctrl-C stops at once."""

import os
import signal

import pytest

from ftloop.errors import Stopped
from ftloop.signals import StopRequest


def test_first_signal_is_recorded_second_ctrl_c_interrupts():
    stop = StopRequest()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stopped_exits_128_plus_the_signal_and_says_how_to_continue():
    stopped = Stopped(signal.SIGINT, 12, "out/checkpoint-12")
    assert stopped.exit_code == 130
    assert str(stopped) == ("stopped by SIGINT after step 12; checkpoint out/checkpoint-12 saved; continue with "
                            "--resume-from-checkpoint auto")
