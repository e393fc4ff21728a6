"""Ctrl-C at a step boundary: the loops of ``train`` and ``finetune`` save where they stopped, then exit.

A signal can arrive in the middle of an optimiser step, when weights, optimiser
state and RNGs disagree; a checkpoint written there would not resume bit-exactly.
So the first Ctrl-C only sets a flag the loop reads between steps.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """SIGINT handler for a training loop: the first Ctrl-C asks the loop to save and stop at
    the next step; a second one interrupts at once. Installed only in the main thread (Python's
    rule) and when ``enabled`` (the caller's choice: there is a run directory to save into)."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous: Any = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if self._enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._enabled:
            signal.signal(signal.SIGINT, self._previous)
