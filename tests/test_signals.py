"""A second Ctrl-C interrupts a run at once, except inside a shield, where it waits for the block's end."""

from __future__ import annotations

import os
import signal

import pytest

from backbone_inspect.signals import stop_on_signals


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread before the next bytecode


def test_the_first_ctrl_c_asks_for_a_stop_and_the_second_interrupts() -> None:
    with stop_on_signals() as stop:
        ctrl_c()
        assert stop() and stop.signal_number == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()


def test_inside_a_shield_the_second_ctrl_c_interrupts_right_after_the_block() -> None:
    done: list[str] = []
    with stop_on_signals() as stop:
        ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            with stop.shield():
                ctrl_c()
                done.append("written")
                with stop.shield():  # nested: only the outermost block's end interrupts
                    done.append("recorded")
                done.append("tracked")
        assert done == ["written", "recorded", "tracked"] and not stop.interrupted


def test_a_shield_lets_an_exception_through_and_finishing_runs_are_not_interrupted() -> None:
    with stop_on_signals() as stop:
        ctrl_c()
        with pytest.raises(ValueError), stop.shield():
            ctrl_c()
            raise ValueError("the block's own failure")
    with stop_on_signals() as stop:
        ctrl_c()
        stop.finishing = True
        ctrl_c()  # nothing left to cut short: no interrupt
        with stop.shield():
            pass
        assert stop.signal_number == signal.SIGINT
