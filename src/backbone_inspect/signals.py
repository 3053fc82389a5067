"""Stopping a run cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, a scheduler's or service manager's stop, a closed terminal: each stops a run cleanly."""


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM (or by hand): the run finishes the files it has in hand and stops."""

    signal_number: int | None = None
    finishing: bool = False
    """Set once the run only finishes what it has in hand: a second Ctrl-C then has nothing to cut short."""
    shielded: bool = False
    """Set while the run records what is written (``shield``): a second Ctrl-C waits for its end."""
    interrupted: bool = False
    """A second Ctrl-C came while shielded."""

    def __call__(self) -> bool:
        return self.signal_number is not None

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """A block a second Ctrl-C does not cut in two: it interrupts right after the block instead.

        A ``KeyboardInterrupt`` can otherwise land between writing a file and recording it (a
        file on disk that the manifest never names), or between starting a write and keeping
        track of it.
        """
        outer, self.shielded = self.shielded, True
        try:
            yield
        finally:
            self.shielded = outer
        if self.interrupted and not outer and not self.finishing:
            self.interrupted = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals(*, ignore_after_stop: bool = False) -> Iterator[StopRequest]:
    """The first SIGINT, SIGTERM or SIGHUP asks for a clean stop; a second SIGINT interrupts at once.

    On leaving, the previous handlers come back; with ``ignore_after_stop`` (a process that only
    reports and exits after a stop) signals are ignored from then on instead, once one came.
    Outside the main thread, where signals cannot be handled, the request only stops by hand.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(number: int, _frame: object) -> None:
        if request.signal_number is not None and number == signal.SIGINT and not request.finishing:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third Ctrl-C must not cut the clean-up short
            if request.shielded:
                request.interrupted = True
                return
            raise KeyboardInterrupt
        request.signal_number = number

    previous = {number: signal.signal(number, handle) for number in STOP_SIGNALS}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            stopped = request.signal_number is not None
            signal.signal(number, signal.SIG_IGN if stopped and ignore_after_stop else handler)
