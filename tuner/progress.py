"""What the person at the terminal sees and does: the run summary, one progress bar, Ctrl-C as "save and stop".

The bar runs on the main process only: step, smoothed loss, learning rate, it/s and ETA. SIGINT and
SIGTERM (a scheduler preempting the job) only set a flag; the loop checks it at the next step boundary,
agrees on it across processes, writes a checkpoint and stops. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import json
import math
import re
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
    from tuner import runtime, speed

    tc, oc = config.train, config.optimizer
    global_batch = tc.train_batch_size * tc.gradient_accumulation_steps * world
    by_name: dict[str, list] = {}  # a fused-backward optimizer has one group per parameter
    for g in optimizer.param_groups:
        entry = by_name.setdefault(g.get("name", "params"), [0, g.get("initial_lr", g["lr"])])
        entry[0] += sum(p.numel() for p in g["params"])
    groups = ", ".join(f"{name} {count:,} @ {lr:g}" for name, (count, lr) in by_name.items())
    epochs = math.ceil(tc.max_train_steps * tc.gradient_accumulation_steps / max(data.batches_per_epoch, 1))
    sources = config.data.path or " + ".join(subset.path for subset in config.data.subsets)
    lines = [
        f"tuner train · method {config.method} · model {parts.source} ({parts.family.name}, {parts.prediction_type})",
        f"  data {sources} · {data.batches_per_epoch} batches/epoch · ~{epochs} epoch(s)",
        f"  {tc.max_train_steps} steps × batch {tc.train_batch_size} × accumulation {tc.gradient_accumulation_steps} "
        f"× {world} process(es) = {global_batch} images/step",
        f"  optimizer {oc.name} ({oc.lr_scheduler}, warmup {oc.lr_warmup_steps}) · trainable: {groups}",
        f"  precision {tc.mixed_precision} · gradient checkpointing {'on' if tc.gradient_checkpointing else 'off'} "
        f"· EMA {'on' if tc.use_ema else 'off'} · seed {tc.seed}",
        f"  speed: {speed.describe(config, parts)}",
        f"  freed after caching: {runtime.describe_freed(parts.freed)} "
        f"({'moved to the CPU' if parts.device.type != 'cpu' else 'spilled to disk'}, back for validation)"
        if parts.freed
        else "  freed after caching: nothing (a training step still calls every loaded part)",
        f"  output {tc.output_dir} · checkpoint every {tc.checkpointing_steps} (keep {tc.checkpoints_total_limit})"
        + (f" · resuming from {resume_from}" if resume_from else ""),
    ]
    return "\n".join(lines)


def closing_summary(
    run_dir: str | Path,
    *,
    details: list[tuple[str, str]] | None = None,
    headline: str = "Done.",
    prompt: str | None = None,
    size: int | None = None,
    repo_id: str = "you/NAME",
) -> str:
    """What `tuner train` and `tuner demo` print last: where each artifact is and which tools load it, the grid and
    the model card, the Python that loads the result into a stock diffusers pipeline, and the publish command.

    `details`: more (label, value) rows (the demo's photos and judge figures); `prompt`/`size`: the sample line.
    """
    from tuner.trainer import Artifact

    run = Path(run_dir).resolve()
    try:
        artifact = Artifact.read(run)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # the run itself succeeded: say where it is anyway
        return f"\n{headline} Everything is in {run} (artifact.json unreadable: {exc})"
    rows = list(details or [])
    for f in artifact.files:
        tools = f" ({', '.join(f.tools)})" if f.tools else ""
        rows.append((f"{f.format}{tools}", str(run / f.path)))
    grids = sorted((run / "grids").glob("*.png")) if (run / "grids").is_dir() else []
    final = run / "grids" / "final.png"
    grid = str(final if final in grids else grids[-1]) if grids else "(none: validation was off)"
    rows.append(("validation grid", grid))
    if (run / "README.md").is_file():
        rows.append(("model card", str(run / "README.md")))
    width = max(len(label) for label, _ in rows) + 1
    lines = ["", f"{headline} Everything is in {run}"]
    lines += [f"  {(label + ':').ljust(width)} {value}" for label, value in rows]

    loads = [f.load for f in artifact.files if "pipe" in f.load or ".from_" in f.load]  # models, not metrics.json
    if loads:
        code = [f"  {loads[0]}"] + [f"  # or: {line}" for line in loads[1:]]
        if "pipe = " not in loads[0]:
            code.insert(0, f'  pipe = DiffusionPipeline.from_pretrained("{_base_path(artifact.base_model)}")')
        classes = sorted(set(re.findall(r"\b([A-Z]\w+)\.from_", "\n".join(code))))
        modules = sorted(set(re.findall(r"\b(safetensors\.torch)\.", "\n".join(code))))
        lines += ["", "Load it in diffusers:", f"  from diffusers import {', '.join(classes)}"]
        lines += [f"  import {module}" for module in modules] + code
        prompt = (prompt or artifact.instance_prompt or "").replace("{token}", artifact.trigger or "")
        size = size or _resolution(run)
        if prompt:
            shape = f", height={size}, width={size}" if size else ""
            lines.append(f"  image = pipe({json.dumps(prompt)}{shape}).images[0]")
    lines += ["", f"Publish it: tuner publish {run} --repo-id {repo_id}"]
    return "\n".join(lines)


def _resolution(run: Path) -> int | None:
    """The resolution the run trained at (from its `config.json`), the size to sample at."""
    try:
        return int(json.loads((run / "config.json").read_text(encoding="utf-8"))["data"]["resolution"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _base_path(base: str) -> str:
    """A `builtin:` base as the folder it lives in (what `from_pretrained` takes); anything else as given."""
    try:
        from tuner.models import resolve_model_path

        return str(resolve_model_path(base))
    except Exception:  # noqa: BLE001 - a missing built-in still reads well as its name
        return base
