"""What the person at the terminal sees and does: one progress bar, and Ctrl-C as "save and stop".

The bar runs on the main process only: step, smoothed loss, learning rate, it/s and ETA. SIGINT and
SIGTERM (a scheduler preempting the job) only set a flag; the loop checks it at the next step boundary,
agrees on it across processes, writes a checkpoint and stops. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.loss: float | None = None
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, loss: float, lr: float) -> None:
        self.loss = loss if self.loss is None else self.smoothing * self.loss + (1 - self.smoothing) * loss
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self._bar.update(1)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class StopSignal:
    """Turns the first SIGINT / SIGTERM into a request to stop cleanly; restores the old handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, notify=None):
        self.requested = False
        self._notify = notify
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self._notify:
            self._notify("stopping after this step and saving a checkpoint (Ctrl-C again to quit without saving)")

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
