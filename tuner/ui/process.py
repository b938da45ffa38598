"""Training runs of `tuner ui` as child processes: one at a time, the rest queued; progress read from the run's files.

A run is `tuner train --preset P --config task.toml` (the same command line, config resolution and
`tuner.loop.train` as in a terminal), so a crash in training cannot take the server down. Stop sends SIGTERM,
which the loop already turns into "save a checkpoint and stop" (`tuner.progress.StopSignal`); Resume is the same
command with `--resume latest`. Progress (step, loss, lr) comes from `output/logs/metrics.jsonl`, which the
loop writes every `train.logging_steps` steps (the UI sets 1); it/s and ETA from when each step appeared.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from tuner.ui.store import Run, RunStore

POLL_SECONDS = 0.25
TAIL_BYTES = 16_384


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM (= save a checkpoint and stop) when the server's process ends."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def train_command(run: Run, resume: bool) -> list[str]:
    task = run.state().get("task") or {}
    cmd = [sys.executable, "-m", "tuner.cli", "train", "--preset", task["preset"], "--config", str(run.task_file)]
    if task.get("vram"):
        cmd += ["--vram", str(task["vram"])]
    return cmd + (["--resume", "latest"] if resume else [])


def log_tail(run: Run, lines: int = 30) -> list[str]:
    """The last lines of `train.log`, each as a terminal would show it (tqdm redraws a line with `\\r`)."""
    try:
        with run.log.open("rb") as f:
            f.seek(max(0, run.log.stat().st_size - TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    shown = [line.rstrip().split("\r")[-1] for line in text.splitlines()]
    return [line for line in shown if line.strip()][-lines:]


def _metrics(run: Run) -> list[dict[str, Any]]:
    path = run.output / "logs" / "metrics.jsonl"
    rows = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line being written
    except OSError:
        pass
    return rows


def _max_steps(run: Run) -> int | None:
    try:
        return int(json.loads((run.output / "config.json").read_text(encoding="utf-8"))["train"]["max_train_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunQueue:
    """Starts queued runs one after another in a thread of its own, and watches the one that is going."""

    def __init__(self, store: RunStore):
        self.store = store
        self.queue: collections.deque[tuple[str, bool]] = collections.deque()
        self.current: tuple[Run, subprocess.Popen] | None = None
        self.stop_asked: set[str] = set()
        self.stamps: dict[str, dict[int, float | None]] = {}  # step -> when it appeared
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tuner-ui-runs", daemon=True)
        self._thread.start()

    # --- requests from the page ----------------------------------------------------------------------------
    def enqueue(self, run: Run, resume: bool) -> dict[str, Any]:
        with self._lock:
            busy = self.current is not None or bool(self.queue)
            self.queue.append((run.name, resume))
            ahead = len(self.queue) - 1 + (self.current is not None)
            message = f"queued behind {ahead} run(s)" if busy else "starting"
            return run.update(status="queued", message=message, resume=resume)

    def stop(self, run: Run) -> dict[str, Any]:
        """Going: SIGTERM (checkpoint, then exit). Queued: leave the queue."""
        with self._lock:
            if self.current is not None and self.current[0].name == run.name:
                self.stop_asked.add(run.name)
                self.current[1].send_signal(signal.SIGTERM)
                return run.update(status="stopping", message="saving a checkpoint after this step")
            for item in list(self.queue):
                if item[0] == run.name:
                    self.queue.remove(item)
            status = "stopped" if run.checkpoints() else "new"
            return run.update(status=status, message="removed from the queue")

    def close(self, timeout: float = 60.0) -> None:
        """Stop the watcher; a run still going is asked to save a checkpoint and stop, and waited for."""
        self._closing.set()
        self._thread.join(timeout=5)
        if self.current is not None:
            run, proc = self.current
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._finish(run, proc.returncode, interrupted=True)

    # --- progress -------------------------------------------------------------------------------------------
    def progress(self, run: Run) -> dict[str, Any]:
        rows = _metrics(run)
        last = rows[-1] if rows else {}
        total = _max_steps(run)
        step = int(last.get("step", 0))
        lr = next((v for k, v in last.items() if k.startswith("lr")), None)
        out: dict[str, Any] = {"step": step, "total": total, "loss": last.get("loss"), "lr": lr,
                               "it_s": None, "eta_s": None}  # fmt: skip
        stamps = self.stamps.get(run.name, {})
        seen = sorted(s for s, t in stamps.items() if s <= step and t is not None)[-20:]
        if len(seen) >= 2 and stamps[seen[-1]] > stamps[seen[0]]:
            rate = (seen[-1] - seen[0]) / (stamps[seen[-1]] - stamps[seen[0]])
            out["it_s"] = round(rate, 3)
            if total:
                out["eta_s"] = round(max(0, total - step) / rate, 1)
        return out

    def position(self, name: str) -> int | None:
        names = [n for n, _ in self.queue]
        return names.index(name) + 1 if name in names else None

    # --- the watcher ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                self._tick()
            time.sleep(POLL_SECONDS)

    def _tick(self) -> None:
        if self.current is not None:
            run, proc = self.current
            self._stamp(run)
            if proc.poll() is not None:
                self._finish(run, proc.returncode)
        while self.current is None and self.queue:
            name, resume = self.queue.popleft()
            try:
                run = self.store.get(name)
                self.current = (run, self._start(run, resume))
            except Exception as exc:  # noqa: BLE001 - a run that cannot start says why and the queue goes on
                Run(self.store.root / name).update(status="failed", message=f"could not start: {exc}", pid=None)

    def _stamp(self, run: Run) -> None:
        stamps = self.stamps.setdefault(run.name, {})
        now = time.monotonic()
        for row in _metrics(run):
            step = row.get("step")
            if isinstance(step, int) and step not in stamps:
                stamps[step] = now

    def _start(self, run: Run, resume: bool) -> subprocess.Popen:
        resume = resume and bool(run.checkpoints())
        cmd = train_command(run, resume)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with run.log.open("ab") as log:
            log.write(("\n$ tuner " + " ".join(cmd[3:]) + "\n").encode())
            log.flush()
            # its own session: a Ctrl-C at the server's terminal reaches the server, which then stops the run itself
            kwargs = {"preexec_fn": _die_with_parent} if sys.platform == "linux" else {}
            kwargs["start_new_session"] = True
            proc = subprocess.Popen(cmd, cwd=run.root, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, **kwargs)  # fmt: skip
        self.stamps[run.name] = {int(row["step"]): None for row in _metrics(run) if "step" in row}  # not timed
        run.update(status="running", pid=proc.pid, message="resuming from the latest checkpoint" if resume else
                   "loading the model and the data", started=time.time())  # fmt: skip
        return proc

    def _finish(self, run: Run, code: int, interrupted: bool = False) -> None:
        self.current = None
        stopped = run.name in self.stop_asked or interrupted
        self.stop_asked.discard(run.name)
        if code == 0 and run.finished():
            run.update(status="finished", pid=None, message="done")
        elif stopped:
            saved = run.checkpoints()
            message = (
                f"{saved[-1]} saved; Resume continues from it" if saved else "stopped before the first checkpoint"
            )
            run.update(status="interrupted" if interrupted else "stopped", pid=None, message=message)
        else:
            errors = [line for line in log_tail(run, 200) if line.startswith("error:")]
            message = errors[-1] if errors else f"training exited with status {code}; see the log"
            run.update(status="failed", pid=None, message=message)
