"""Where training metrics go: `<run>/logs/metrics.jsonl` always, plus tensorboard (default) or wandb.

Only the main process logs; on other processes every method is a no-op.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tuner.errors import ConfigError


def check_backend(report_to: str) -> None:
    """Fail before training, not after the first logging step, when the chosen backend is missing."""
    module, pip_name = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}.get(
        report_to, (None, None)
    )
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(
            f"train.report_to = {report_to!r}: the `{pip_name}` package is not installed; "
            f"`pip install {pip_name}`, or set train.report_to = 'none'"
        ) from None


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


class Tracker:
    def __init__(self, run_dir: Path, report_to: str, enabled: bool, config: dict[str, Any], resume_step: int = 0):
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        jsonl = logs / "metrics.jsonl"
        if jsonl.exists():  # resumed: drop what a killed run logged after the checkpoint it resumes from
            kept = [line for line in jsonl.read_text(encoding="utf-8").splitlines() if _step(line) <= resume_step]
            jsonl.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._jsonl = jsonl.open("a", encoding="utf-8")
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after the checkpoint we resumed from.
            self._tb = SummaryWriter(str(logs), purge_step=resume_step + 1 if resume_step else None)
        elif report_to == "wandb":
            import wandb

            self._wandb = wandb.init(project="tuner", name=run_dir.name, dir=str(logs), config=config, resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_image(self, key: str, image: Any, step: int) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
