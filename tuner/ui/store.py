"""The runs folder of `tuner ui`: one folder per run, its state in `ui.json`, its photos, and safe file access.

Layout of `<runs-dir>/<run>/`: `ui.json` (task and status), `photos/` (images and caption sidecars, what
`data.path` points at), `task.toml` (the user layer `tuner train --config` reads), `train.log`, `output/`
(`train.output_dir`: config.json, checkpoints, grids, logs, artifacts), `cache/` and `compare/`. Everything
the UI writes stays inside the run folder: names from a browser are reduced to a plain file name first.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.data.images import IMAGE_EXTENSIONS, ImageProblem, inspect_image
from tuner.errors import TunerError

STATE_FILE = "ui.json"
ACTIVE = ("queued", "running", "stopping")
MAX_NAME = 80
DEFAULT_MAX_PIXELS = 89_478_485  # data.max_image_pixels' default: the same bomb limit the data check applies


def safe_name(name: str, fallback: str = "file") -> str:
    """A browser-supplied name as a plain file name: last path component, safe characters, no leading dots."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")
    stem, dot, suffix = base.rpartition(".")
    if dot and len(base) > MAX_NAME:
        base = stem[: MAX_NAME - len(suffix) - 1] + "." + suffix
    return base[:MAX_NAME] or fallback


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


@dataclass
class UploadResult:
    """One uploaded file: stored under `name`, or refused with the data check's reason and detail."""

    original: str
    name: str | None
    reason: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"original": self.original, "name": self.name, "reason": self.reason, "detail": self.detail}


class Run:
    """One run folder and its `ui.json` state."""

    def __init__(self, root: Path):
        self.root = root
        self.name = root.name

    photos = property(lambda self: self.root / "photos")
    output = property(lambda self: self.root / "output")
    log = property(lambda self: self.root / "train.log")
    task_file = property(lambda self: self.root / "task.toml")

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"status": "new", "task": {}}

    def update(self, **values: Any) -> dict[str, Any]:
        state = {**self.state(), **values}
        tmp = self.root / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.root / STATE_FILE)
        return state

    def checkpoints(self) -> list[str]:
        if not self.output.is_dir():
            return []
        found = [p.name for p in self.output.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
        return sorted(found, key=lambda name: int(name[11:]))

    def finished(self) -> bool:
        return (self.output / "artifact.json").is_file()

    def file(self, rel: str) -> Path:
        """A file inside this run, for serving; refuses anything that resolves outside the run folder."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            raise TunerError(f"{rel!r}: no such file in run {self.name}")
        return path

    # --- photos -----------------------------------------------------------------------------------------------
    def list_photos(self) -> list[dict[str, Any]]:
        if not self.photos.is_dir():
            return []
        out = []
        for path in sorted(self.photos.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                caption = path.with_suffix(".txt")
                text = caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file() else ""
                out.append({"name": path.name, "caption": text})
        return out

    def add_photo(self, original: str, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> UploadResult:
        """Store one upload if the data pipeline's own image check accepts it; never overwrite another photo."""
        name = safe_name(original, "photo.png")
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
            return UploadResult(original, None, "not an image", f"the name must end in one of {allowed}")
        try:
            inspect_image(data, max_pixels)
        except ImageProblem as exc:
            return UploadResult(original, None, exc.reason, exc.detail)
        self.photos.mkdir(parents=True, exist_ok=True)
        target = self.photos / name
        stem, suffix, n = target.stem, target.suffix, 1
        while target.exists():
            target = self.photos / f"{stem}-{n}{suffix}"
            n += 1
        tmp = self.photos / f".{target.name}.upload"
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return UploadResult(original, target.name)

    def add_caption_file(self, original: str, data: bytes) -> UploadResult:
        """A dropped `NAME.txt` beside the photos: the caption of the photo with that stem."""
        name = safe_name(original)
        photos = {p["name"].rsplit(".", 1)[0]: p["name"] for p in self.list_photos()}
        photo = photos.get(name.rsplit(".", 1)[0])
        if photo is None:
            return UploadResult(original, None, "missing file", f"no photo named {Path(name).stem}.* for this caption")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return UploadResult(original, None, "unreadable caption encoding", "captions must be UTF-8 text")
        self.set_caption(photo, text)
        return UploadResult(original, name)

    def set_caption(self, photo: str, text: str) -> None:
        path = self.photos / safe_name(photo)
        if path.name != photo or not path.is_file():
            raise TunerError(f"caption: no photo named {photo!r} in run {self.name}")
        path.with_suffix(".txt").write_text(text.strip() + "\n", encoding="utf-8")

    def remove_photo(self, photo: str) -> None:
        path = self.photos / safe_name(photo)
        if path.name != photo or not path.is_file():
            raise TunerError(f"no photo named {photo!r} in run {self.name}")
        path.unlink()
        path.with_suffix(".txt").unlink(missing_ok=True)


class RunStore:
    """All runs under one folder; a run left `running` by a server that is gone reads as `interrupted`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for run in self.runs():
            state = run.state()
            if state.get("status") in ACTIVE and not pid_alive(state.get("pid")):
                run.update(status="interrupted", pid=None, message="the server stopped while this run was going")

    def runs(self) -> list[Run]:
        found = [Run(p) for p in self.root.iterdir() if p.is_dir() and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda r: r.state().get("created", 0), reverse=True)

    def get(self, name: str) -> Run:
        if safe_name(name) != name or not (self.root / name / STATE_FILE).is_file():
            raise TunerError(f"no run named {name!r} in {self.root}")
        return Run(self.root / name)

    def create(self, label: str = "") -> Run:
        stem = safe_name(label, "") or time.strftime("run-%Y%m%d-%H%M%S")
        path, n = self.root / stem, 1
        while path.exists():
            path = self.root / f"{stem}-{n}"
            n += 1
        path.mkdir(parents=True)
        run = Run(path)
        run.update(status="new", created=time.time(), task={})
        return run
