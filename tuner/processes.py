"""The processes of one multi-process run, and which one was lost when a collective fails.

Each process records its pid and host under `<run>/.processes/` as it starts. When a peer dies (killed, out of
memory), the survivors' next collective fails: gloo at once ("Connection reset by peer"), NCCL after
`train.ddp_timeout`. The survivors then look up which recorded processes are gone and stop with one message
naming them and the last good checkpoint, instead of a backend trace or a hang.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from tuner.errors import TrainingStopped

FOLDER = ".processes"
_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection (reset|closed)|broken pipe|timed out|timeout|socket|peer|processgroup|watchdog", re.I
)


def register_process(run_dir: Path, rank: int, world: int) -> None:
    if world == 1:
        return
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}
    (folder / f"rank-{rank}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")


def lost_process(exc: BaseException, accelerator, run_dir: Path, last_good: Path | None) -> TrainingStopped | None:
    """The stop message when `exc` is a failed collective of a multi-process run; None for any other error."""
    world = accelerator.num_processes
    if world == 1 or not isinstance(exc, RuntimeError) or not _COLLECTIVE_FAILURE.search(str(exc)):
        return None
    gone, unknown = [], []
    for rank in range(world):
        if rank == accelerator.process_index:
            continue
        status = _status(Path(run_dir) / FOLDER / f"rank-{rank}.json")
        (gone if status == "gone" else unknown if status == "unknown" else []).append(rank)
    if gone:
        who = ", ".join(f"process {r}" for r in gone) + (" was" if len(gone) == 1 else " were")
        lost = f"{who} lost (killed or crashed; its log says why)"
    else:
        others = ", ".join(map(str, unknown)) or "?"
        lost = f"a process was lost (ranks {others} run on other hosts or could not be checked)"
    safe = (
        f"the last good checkpoint is {last_good}; continue with --resume latest"
        if last_good
        else "no checkpoint was written yet; start again"
    )
    first_line = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0])  # drop the source location
    first_line = first_line.split(". ")[0][:160]
    return TrainingStopped(
        f"{lost} while training with {world} processes, so process {accelerator.process_index} stopped too "
        f"({first_line}). {safe[0].upper()}{safe[1:]}"
    )


def _status(record_path: Path) -> str:
    """'gone', 'alive' or 'unknown' (no record, or a process on another host)."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    if record.get("host") != socket.gethostname():
        return "unknown"
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return "gone"
    except (PermissionError, KeyError, ValueError, TypeError):
        return "unknown"
    return "alive" if not _zombie(int(record["pid"])) else "gone"


def _zombie(pid: int) -> bool:
    """A killed child not yet reaped by its launcher still answers `kill(pid, 0)`; /proc tells."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
