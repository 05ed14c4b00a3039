"""Signals: the first Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary and save; a
second Ctrl-C interrupts at once (exit 130 from the command line)."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from gptrain.train.loop import stop_on_signals


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in the main thread between bytecodes


def test_a_first_signal_asks_to_stop_and_a_second_ctrl_c_interrupts():
    run = SimpleNamespace(should_stop=False, stop_signal=None)
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(run):
        _deliver(signal.SIGTERM)
        assert run.should_stop and run.stop_signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_ctrl_c_alone_only_asks():
    run = SimpleNamespace(should_stop=False, stop_signal=None)
    with stop_on_signals(run):
        _deliver(signal.SIGINT)
        assert run.should_stop and run.stop_signal == signal.SIGINT


def test_an_interrupt_is_exit_130(monkeypatch, capsys):
    import gptrain.cli as cli

    def interrupted(args, extra):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert cli.main(["train"]) == 130 and "interrupted" in capsys.readouterr().err
