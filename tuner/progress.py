"""What the person at the terminal sees and does: the run summary, one progress bar, Ctrl-C as "save and stop".

The bar runs on the main process only: step, smoothed loss, learning rate, it/s and ETA. SIGINT and
SIGTERM (a scheduler preempting the job) only set a flag; the loop checks it at the next step boundary,
agrees on it across processes, writes a checkpoint and stops. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuner.config import RunConfig


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


def run_summary(config: RunConfig, parts, optimizer, data, world: int, resume_from: Path | None) -> str:
    """The resolved config in a few lines, printed before training starts."""
    tc, oc = config.train, config.optimizer
    global_batch = tc.train_batch_size * tc.gradient_accumulation_steps * world
    groups = ", ".join(
        f"{g['name']} {sum(p.numel() for p in g['params']):,} @ {g.get('initial_lr', g['lr']):g}"
        for g in optimizer.param_groups
    )
    epochs = math.ceil(tc.max_train_steps * tc.gradient_accumulation_steps / max(data.batches_per_epoch, 1))
    sources = config.data.path or " + ".join(subset.path for subset in config.data.subsets)
    lines = [
        f"tuner train · method {config.method} · model {parts.source} ({parts.family.name}, {parts.prediction_type})",
        f"  data {sources} · {data.batches_per_epoch} batches/epoch · ~{epochs} epoch(s)",
        f"  {tc.max_train_steps} steps × batch {tc.train_batch_size} × accumulation {tc.gradient_accumulation_steps} "
        f"× {world} process(es) = {global_batch} images/step",
        f"  optimizer {oc.name} ({oc.lr_scheduler}, warmup {oc.lr_warmup_steps}) · trainable: {groups}",
        f"  precision {tc.mixed_precision} · gradient checkpointing {'on' if tc.gradient_checkpointing else 'off'} "
        f"· attention {tc.attention} · EMA {'on' if tc.use_ema else 'off'} · seed {tc.seed}"
        + (" · text encoders freed (embeddings cached)" if getattr(parts, "encoders_offloaded", False) else ""),
        f"  output {tc.output_dir} · checkpoint every {tc.checkpointing_steps} (keep {tc.checkpoints_total_limit})"
        + (f" · resuming from {resume_from}" if resume_from else ""),
    ]
    return "\n".join(lines)
