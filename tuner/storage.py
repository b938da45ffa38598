"""A full disk, told plainly: the folder, the space needed and what is safe, instead of a writer's trace.

Writers report a full disk in different ways: Python's `OSError` (errno ENOSPC, or EDQUOT for a quota), and
safetensors' Rust writer as a `SafetensorError` whose text ends in "(os error 28)". `is_no_space` knows both.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from pathlib import Path

from tuner.errors import TrainingStopped

logger = logging.getLogger(__name__)

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXT = re.compile(rf"No space left on device|Disk quota exceeded|os error ({errno.ENOSPC}|{errno.EDQUOT})\b")


class DiskFull(TrainingStopped):
    """Writing an output failed for lack of space; the message says what was kept and how to go on."""


def is_no_space(exc: BaseException) -> bool:
    """True for a full disk or an exhausted quota, whichever library raised it."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if _NO_SPACE_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: str | Path) -> int:
    """Free space (for this user) on the file system that holds `path`, or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_full(folder: Path, what: str, last_good: Path | None, needed: int | None = None) -> DiskFull:
    """The stop message: which folder, what was being written, how much space, what is safe on disk."""
    need = f"; about {size_text(needed)} is needed" if needed else ""
    safe = (
        f"The last good checkpoint is {last_good}; free space, then continue with --resume latest"
        if last_good
        else "No checkpoint was written yet; free space, then start again"
    )
    return DiskFull(
        f"no space left on the disk of {folder} while writing {what} ({size_text(free_bytes(folder))} free{need}). "
        f"What was half written has been removed. {safe}"
    )


def save_checkpoint(state, run_dir: Path, limit: int | None, is_main: bool, barrier, last_good: Path | None) -> Path:
    """`state.save` with a room check: refuse before writing when the checkpoint cannot fit (its size is the
    newest checkpoint's, else the state's tensor bytes), turn a full disk mid-write into `DiskFull` (the half
    folder is already gone), and warn while there is still time when the next one would not fit."""
    from tuner.checkpoint import PREFIX, list_checkpoints

    done = list_checkpoints(run_dir)
    needed = tree_bytes(done[-1]) if done else state.estimated_bytes()
    what = f"{PREFIX}{state.position.global_step}"
    if free_bytes(run_dir) < needed:
        raise disk_full(run_dir, what, last_good, needed)
    try:
        saved = state.save(run_dir, limit, is_main, barrier)
    except Exception as exc:
        if is_no_space(exc):
            raise disk_full(run_dir, what, last_good, needed) from None
        raise
    free = free_bytes(run_dir)
    if is_main and free < tree_bytes(saved):
        logger.warning(
            "warning: the next checkpoint (about %s) will not fit in the %s free on the disk of %s; free space, "
            "or lower train.checkpoints_total_limit, before step %d",
            size_text(tree_bytes(saved)),
            size_text(free),
            run_dir,
            state.position.global_step + 1,
        )
    return saved
