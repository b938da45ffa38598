"""The HTTP API of `tuner ui`, one route per thing the page does; every route calls the suite's library.

Bad input comes back as `{"error": message}` with status 400 (a `TunerError`), never as a trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from tuner.errors import TunerError
from tuner.ui import results
from tuner.ui.process import log_tail
from tuner.ui.store import Run
from tuner.ui.task import DEFAULT_TASK, METHODS, advanced_fields, check_report, memory_note, presets_by_method, resolve

router = APIRouter()
SERVED = ("photos/", "output/grids/", "compare/")  # what the page may show of a run folder
IMPORT_LIMIT = 200


def _store(request: Request):
    return request.app.state.store


def _run(request: Request, name: str) -> Run:
    return _store(request).get(name)


def _task(run: Run) -> dict[str, Any]:
    return {**DEFAULT_TASK, **(run.state().get("task") or {})}


@router.get("/")
def page() -> FileResponse:
    from tuner.ui.server import STATIC

    return FileResponse(STATIC / "index.html")


@router.get("/api/meta")
def meta(request: Request) -> dict[str, Any]:
    return {"methods": {k: v[0] for k, v in METHODS.items()}, "presets": presets_by_method(),
            "default_task": DEFAULT_TASK, "max_upload": request.app.state.max_upload}  # fmt: skip


@router.get("/api/fields")
def fields(preset: str, vram: float | None = None) -> dict[str, Any]:
    return {"tables": advanced_fields(preset, vram), "memory": memory_note(preset, vram)}


# --- runs -------------------------------------------------------------------------------------------------
class NewRun(BaseModel):
    name: str = ""


def _summary(run: Run) -> dict[str, Any]:
    state = run.state()
    return {"name": run.name, "status": state.get("status"), "message": state.get("message", ""),
            "created": state.get("created"), "preset": (state.get("task") or {}).get("preset"),
            "checkpoints": run.checkpoints(), "finished": run.finished()}  # fmt: skip


@router.get("/api/runs")
def list_runs(request: Request) -> list[dict[str, Any]]:
    return [_summary(run) for run in _store(request).runs()]


@router.post("/api/runs")
def new_run(request: Request, body: NewRun) -> dict[str, Any]:
    return _summary(_store(request).create(body.name))


@router.get("/api/runs/{name}")
def show_run(request: Request, name: str) -> dict[str, Any]:
    run = _run(request, name)
    queue = request.app.state.queue
    grids = sorted(p.name for p in (run.output / "grids").glob("*.png")) if (run.output / "grids").is_dir() else []
    return {**_summary(run), "task": _task(run), "photos": run.list_photos(), "progress": queue.progress(run),
            "log": log_tail(run), "grids": [f"output/grids/{g}" for g in grids], "queue": queue.position(name),
            "prompt": results.default_prompt(run) if run.finished() else ""}  # fmt: skip


@router.get("/api/runs/{name}/file")
def run_file(request: Request, name: str, path: str) -> FileResponse:
    if not path.startswith(SERVED) or ".." in Path(path).parts:
        raise TunerError(f"{path!r}: not a file the page shows")
    return FileResponse(_run(request, name).file(path), headers={"Cache-Control": "no-store"})


# --- photos -----------------------------------------------------------------------------------------------
@router.put("/api/runs/{name}/photos")
async def upload(request: Request, name: str, filename: str) -> dict[str, Any]:
    """One file as the raw request body, read up to the size limit; stored only if the image check accepts it."""
    run = _run(request, name)
    limit = request.app.state.max_upload
    declared = request.headers.get("content-length")
    too_big = {"original": filename, "name": None, "reason": "too large",
               "detail": f"uploads are limited to {limit / 1048576:g} MB (tuner ui --max-upload-mb)"}  # fmt: skip
    if declared and declared.isdigit() and int(declared) > limit:
        return too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_big
        chunks.append(chunk)
    if filename.lower().endswith(".txt"):
        return run.add_caption_file(filename, b"".join(chunks)).to_dict()
    return run.add_photo(filename, b"".join(chunks), _max_pixels(run)).to_dict()


def _max_pixels(run: Run) -> int:
    from tuner.config import DataConfig

    value = (_task(run).get("advanced") or {}).get("data.max_image_pixels")
    return int(value) if value else DataConfig().max_image_pixels


class Folder(BaseModel):
    path: str


@router.post("/api/runs/{name}/import")
def import_folder(request: Request, name: str, body: Folder) -> list[dict[str, Any]]:
    """Copy the images of a folder on the server (and their `.txt` captions) into the run, each checked."""
    from tuner.data.images import IMAGE_EXTENSIONS

    run = _run(request, name)
    folder = Path(body.path).expanduser()
    if not folder.is_dir():
        raise TunerError(f"{body.path!r}: no such folder on the server")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(images) > IMPORT_LIMIT:
        raise TunerError(f"{body.path!r}: {len(images)} images; the page imports at most {IMPORT_LIMIT}")
    out = []
    for path in images:
        if path.stat().st_size > request.app.state.max_upload:
            out.append({"original": path.name, "name": None, "reason": "too large", "detail": "over the upload limit"})
            continue
        result = run.add_photo(path.name, path.read_bytes(), _max_pixels(run))
        caption = path.with_suffix(".txt")
        if result.name and caption.is_file():
            run.set_caption(result.name, caption.read_text(encoding="utf-8", errors="replace"))
        out.append(result.to_dict())
    return out


class Caption(BaseModel):
    photo: str
    text: str


@router.put("/api/runs/{name}/caption")
def caption(request: Request, name: str, body: Caption) -> dict[str, str]:
    _run(request, name).set_caption(body.photo, body.text)
    return {"ok": "saved"}


@router.delete("/api/runs/{name}/photos/{photo}")
def remove(request: Request, name: str, photo: str) -> dict[str, str]:
    _run(request, name).remove_photo(photo)
    return {"ok": "removed"}


# --- task, check, train -------------------------------------------------------------------------------------
class Task(BaseModel):
    kind: str = "subject"
    trigger: str = ""
    class_word: str = ""
    method: str = "dreambooth-lora"
    model: str = "builtin:micro"
    preset: str
    vram: float | None = None
    advanced: dict[str, Any] = {}


def _editable(run: Run) -> None:
    status = run.state().get("status")
    if status in ("queued", "running", "stopping") or run.finished() or run.checkpoints():
        raise TunerError(f"run {run.name} is {status}: its task is fixed; start a new run to change it")


@router.put("/api/runs/{name}/task")
def set_task(request: Request, name: str, body: Task) -> dict[str, Any]:
    run = _run(request, name)
    _editable(run)
    task = body.model_dump()
    run.update(task=task)
    config = resolve(task, run.photos, run.root)
    return {"steps": config.train.max_train_steps, "method": config.method,
            "instance_prompt": config.data.instance_prompt}  # fmt: skip


@router.post("/api/runs/{name}/check")
def check(request: Request, name: str) -> dict[str, Any]:
    run = _run(request, name)
    return check_report(_task(run), run.photos, run.root)


@router.post("/api/runs/{name}/train")
def train(request: Request, name: str) -> dict[str, Any]:
    run = _run(request, name)
    _editable(run)
    if not run.list_photos():
        raise TunerError("no photos yet: add some in step 1")
    resolve(_task(run), run.photos, run.root)  # a bad field is reported here, not after the model loaded
    return request.app.state.queue.enqueue(run, resume=False)


@router.post("/api/runs/{name}/stop")
def stop(request: Request, name: str) -> dict[str, Any]:
    return request.app.state.queue.stop(_run(request, name))


@router.post("/api/runs/{name}/resume")
def resume(request: Request, name: str) -> dict[str, Any]:
    run = _run(request, name)
    if run.finished():
        raise TunerError(f"run {run.name} has finished; nothing to resume")
    if run.state().get("status") in ("queued", "running", "stopping"):
        raise TunerError(f"run {run.name} is already {run.state().get('status')}")
    return request.app.state.queue.enqueue(run, resume=True)


# --- compare, publish ---------------------------------------------------------------------------------------
class Compare(BaseModel):
    prompt: str
    seeds: list[int] = [0, 1]
    scale: float = 1.0
    steps: int = 20
    guidance: float = 4.0


@router.post("/api/runs/{name}/compare")
def compare(request: Request, name: str, body: Compare) -> dict[str, Any]:
    grids = results.compare(_run(request, name), body.prompt, body.seeds, body.scale, body.steps, body.guidance)
    return {"grids": grids}


class Publish(BaseModel):
    repo_id: str
    private: bool = False
    base_model: str = ""
    license: str = ""
    token: str = ""
    dry_run: bool = True


@router.post("/api/runs/{name}/publish")
def publish(request: Request, name: str, body: Publish) -> dict[str, Any]:
    token, body.token = body.token, ""
    return results.publish(_run(request, name), body.repo_id, private=body.private, base_model=body.base_model,
                           license_=body.license, token=token, dry_run=body.dry_run)  # fmt: skip
