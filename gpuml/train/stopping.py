"""Stopping a training loop on Ctrl-C or SIGTERM: the signal only raises a flag, which the loop
polls between steps, so the checkpoint it then writes is consistent."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class StopRequested(Exception):
    """Raised by the loop between steps once a stop was requested."""


class StopFlag:
    """Set by SIGINT or SIGTERM while `installed()`; a second Ctrl-C aborts at once
    (KeyboardInterrupt), keeping the last checkpoint already written."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.signum = 0

    def __bool__(self) -> bool:
        return self.signum != 0

    @property
    def reason(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "terminated"

    @property
    def exit_code(self) -> int:
        """The shell convention for death by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(self.signum)

    def request(self, signum: int) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{self.reason}: stopping after this step (Ctrl-C again to abort)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to `request` for the block (main thread only: Python
        delivers signals there, and other threads may not install handlers)."""
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: Any) -> None:
            self.request(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
