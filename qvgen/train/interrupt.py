"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, stop cleanly.

A cluster scheduler's SIGTERM or a user's Ctrl-C should cost at most the step under way, never the
run. The first signal asks for a stop at the end of the current step; a second one stops at once
(Python's usual KeyboardInterrupt), which is still safe because checkpoints are written atomically.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing the checkpoint of `step`; the same command resumes."""

    def __init__(self, step: int, signum: int, checkpoint: str) -> None:
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after step {step}, checkpoint {checkpoint}; resume with the same command")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager that turns the first SIGINT/SIGTERM into `requested` (main thread only)."""

    def __init__(self, say=print) -> None:
        self.signum: int | None = None
        self._say = say
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self._say(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop now)")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
