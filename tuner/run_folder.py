"""The run folder's rules: one run at a time (a lock), a finished run is never retrained by accident, and an
unwritable folder is reported before any model loads.

A finished run is a folder with `artifact.json` (written last, atomically, by the trainer's `save`). Resuming it
does nothing unless `train.max_train_steps` grew past its final checkpoint (then it trains on); a new run into
it is refused unless `--overwrite` is given.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tuner.checkpoint import checkpoint_step, list_checkpoints
from tuner.errors import TunerError

logger = logging.getLogger(__name__)

LOCK_NAME = ".tuner.lock"
FINISHED_MARKER = "artifact.json"
KEPT_ON_OVERWRITE = {"cache", LOCK_NAME}  # cached latents and class images are still valid for a new run


class FolderInUse(TunerError):
    """Another live run holds the folder's lock."""


class RunLock:
    """An advisory lock (`flock`) on `<folder>/.tuner.lock`, held for a run's life.

    The kernel drops a `flock` when its process dies, however it dies, so a lock can never outlive its run; the
    file's text (pid, host, start time) only names the holder. A file still holding text when the lock is free
    was left by a run that did not end cleanly (killed, power loss): it is taken over with a note."""

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunLock:
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _describe(_read_holder(self.path))
            raise FolderInUse(
                f"{self.what} {self.folder} is in use by another run ({holder}); wait for it to finish or stop it, "
                f"or use another folder"
            ) from None
        left = _read_holder(self.path)
        if left and left.get("pid") != os.getpid():
            logger.warning(
                "note: %s %s: took over the lock left by a run that did not end cleanly (%s, no longer running)",
                self.what,
                self.folder,
                _describe(left),
            )
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # a full or vanished disk: the lock still goes with the descriptor
            os.ftruncate(self._fd, 0)  # empty: a clean end, nothing to take over
        # A run that stopped before writing anything (a mistyped model, a bad config) leaves no folder behind.
        # Unlinked while still locked: another run's non-blocking attempt meanwhile is refused, not queued.
        with contextlib.suppress(OSError):
            if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                for folder in self._created:  # the folders this lock made, innermost first, while they are empty
                    folder.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(path: Path) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "pid unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


# --- finished runs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedRun:
    """A run that wrote its artifacts: how far it trained, and its newest checkpoint (None if it kept none)."""

    folder: Path
    steps: int | None
    checkpoint: Path | None


def finished_run(run_dir: str | Path) -> FinishedRun | None:
    run_dir = Path(run_dir)
    if not (run_dir / FINISHED_MARKER).is_file():
        return None
    checkpoints = list_checkpoints(run_dir)
    newest = checkpoints[-1] if checkpoints else None
    steps = checkpoint_step(newest) if newest else _configured_steps(run_dir)
    return FinishedRun(run_dir, steps, newest)


def _configured_steps(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["train"]["max_train_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refuse_new_run(run_dir: Path, done: FinishedRun) -> TunerError:
    steps = f"{done.steps} steps" if done.steps is not None else "finished"
    extend = (
        "; train it further with --resume latest --set train.max_train_steps=N" if done.checkpoint is not None else ""
    )
    return TunerError(
        f"train.output_dir = {str(run_dir)!r} holds a finished run ({steps}, {FINISHED_MARKER}); nothing was changed. "
        f"Pass --overwrite to replace it, or pick another output_dir{extend}"
    )


def clear_for_overwrite(run_dir: Path) -> list[str]:
    """Remove an earlier run's outputs (checkpoints, artifacts, grids, logs, card); keep its caches."""
    removed = []
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if entry.name in KEPT_ON_OVERWRITE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


# --- writable before loading ----------------------------------------------------------------------------------


def check_writable(folder: str | Path, field: str) -> None:
    """The folder can be created and written (probed with a real temporary file, which root's `access()` would
    not tell on a read-only mount); the message names the field and the first blocking folder."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TunerError(f"{field} = {str(folder)!r}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tuner-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)"}
        why = reason.get(exc.errno, f"cannot be written ({exc.strerror})")
        raise TunerError(f"{field} = {str(folder)!r}: {existing} {why}; pick a writable folder") from None
