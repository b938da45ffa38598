"""Publishing a finished run to a model hub: what is uploaded, the staged folder, and the upload itself.

Reads the run folder (`artifact.json`, `config.json`, `grids/`, `metrics.json`) and changes nothing in it but
`README.md`, whose text comes from `tuner.model_card`. Uploads go through `huggingface_hub` (imported lazily)
to huggingface.co or any Hub-compatible server (`--endpoint` / `HF_ENDPOINT`). The token is scrubbed from
every message, staged file and card, and so are the training machine's paths (`tuner.public`): staged records and
safetensors headers name folders relative to the run or by their last component, a local base as
`hub.base_model` / `--base-model` or "a local model".
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tuner.errors import TunerError
from tuner.model_card import CARD_MARKER, localize, render_card
from tuner.public import (
    copy_with_metadata,
    is_hub_id,
    private_paths,
    public_base_model,
    public_config,
    public_metadata,
    public_value,
    read_header,
    scrub_text,
)
from tuner.trainer import Artifact

if TYPE_CHECKING:
    import argparse

    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

ALLOWED_SUFFIXES = frozenset({".safetensors", ".json", ".md", ".png", ".txt"})
TEXT_SUFFIXES = frozenset({".json", ".md", ".txt"})
IMAGE_DIRS = ("grids", "samples", "validation")
EXCLUDED_NAMES = frozenset({"logs", "cache", ".tuner-cache", "__pycache__"})
EXCLUDED_PREFIXES = ("checkpoint-", "checkpoint_", "step_", "epoch_", ".")
RUN_FILES = ("config.json", "artifact.json", "metrics.json")
STAGING_DIR = ".hub-upload"
XET_HOSTS = ("huggingface.co", "hf.co")


class HubError(TunerError):
    """Publishing failed; the message says why and that the run folder is untouched."""


class NotAFinishedRun(HubError):
    """The folder has no `artifact.json`, so there is nothing trained to publish."""


class MissingToken(HubError):
    """No token from the argument, `HF_TOKEN` or the huggingface_hub login cache."""


class InvalidToken(HubError):
    """The hub answered 401: the token is wrong or expired."""


class CannotWrite(HubError):
    """The hub answered 403 (or hid the repo): the repo belongs to someone else or the token is read-only."""


class HubUnreachable(HubError):
    """The hub could not be reached or kept failing after every retry."""


@dataclass
class PublishResult:
    """What `publish` did: where the files went (or would go) and which files they were."""

    repo_id: str
    staged_dir: Path
    files: list[str]
    dry_run: bool
    url: str | None = None
    commit_url: str | None = None
    attempts: int = 0
    notes: list[str] = field(default_factory=list)


# --- reading the run -------------------------------------------------------------------------------------


def _read_run(run_dir: str | Path) -> tuple[Path, Artifact, dict[str, Any]]:
    run_dir = Path(run_dir)
    if not (run_dir / "artifact.json").is_file():
        raise NotAFinishedRun(
            f"{run_dir} is not a finished run: it has no artifact.json (train to the end, and pass the run folder, "
            "not a checkpoint-<step> folder)"
        )
    try:
        artifact = Artifact.read(run_dir)
        config_path = run_dir / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (ValueError, TypeError, KeyError) as exc:
        raise NotAFinishedRun(f"{run_dir}: artifact.json or config.json cannot be read ({exc})") from None
    return run_dir, artifact, config


def _excluded(rel: Path) -> bool:
    return any(part in EXCLUDED_NAMES or part.startswith(EXCLUDED_PREFIXES) for part in rel.parts)


def _walk(start: Path) -> Iterator[Path]:
    """Files under `start` in a stable order, without descending into symlinked folders."""
    if start.is_file():
        yield start
        return
    for folder, dirs, files in os.walk(start):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name


def upload_selection(run_dir: str | Path) -> dict[str, Path]:
    """Repo path -> source file, for everything that may leave the machine (README.md is added by staging).

    Only artifacts, run records and validation images, with allowed suffixes, never under checkpoints, logs,
    caches or hidden folders, and never through a symlink that leads out of the run folder.
    """
    run_dir, artifact, _ = _read_run(run_dir)
    root = run_dir.resolve()
    starts = []
    for f in artifact.files:
        if Path(f.path).is_absolute() or ".." in Path(f.path).parts or not (run_dir / f.path).exists():
            raise HubError(f"{run_dir}: artifact.json lists {f.path!r}, which is not a file or folder in the run")
        starts.append(run_dir / f.path)
    starts += [run_dir / name for name in RUN_FILES] + [run_dir / name for name in IMAGE_DIRS]
    starts += sorted(run_dir.glob("*.png"))
    chosen: dict[str, Path] = {}
    for start in starts:
        if not start.exists():
            continue
        for path in _walk(start):
            rel = path.relative_to(run_dir)
            if _excluded(rel) or path.suffix.lower() not in ALLOWED_SUFFIXES or rel.as_posix() == "README.md":
                if not _excluded(rel) and rel.as_posix() != "README.md":
                    logger.warning("not uploading %s: only %s files are published", rel, sorted(ALLOWED_SUFFIXES))
                continue
            if not path.resolve().is_relative_to(root):
                logger.warning("not uploading %s: it is a link to a file outside the run folder", rel)
                continue
            chosen[rel.as_posix()] = path
    return dict(sorted(chosen.items()))


def build_model_card(run_dir: str | Path, repo_id: str | None = None, base_model: str | None = None) -> ModelCard:
    """The hub card of a finished run; `repo_id` replaces the local path in the usage snippets, `base_model` (else
    `hub.base_model`) names a base that was trained from a local folder or file."""
    from huggingface_hub import ModelCard

    run_dir, artifact, config = _read_run(run_dir)
    repo_id = repo_id or config.get("hub", {}).get("repo_id")
    base_model = _base_model(config, base_model)
    text = render_card(run_dir, artifact, config, upload_selection(run_dir), repo_id, base_model=base_model)
    return ModelCard(scrub_text(text, _private(run_dir, artifact, config), run_dir))


def _base_model(config: dict[str, Any], base_model: str | None) -> str | None:
    base_model = base_model or (config.get("hub") or {}).get("base_model")
    if base_model and not is_hub_id(base_model):
        raise HubError(f"--base-model / hub.base_model = {base_model!r}: expected a hub id org/name")
    return base_model


def _private(run_dir: Path, artifact: Artifact, config: dict[str, Any]) -> list[str]:
    """Absolute paths of this machine that the run names (its config, its base model, the run folder)."""
    extra = {"base": artifact.base_model} if not is_hub_id(artifact.base_model) else {}
    return private_paths({**config, "__artifact__": extra}, run_dir)


def _user_card(run_dir: Path) -> str | None:
    """A README.md the user wrote (no tuner marker) wins over the generated card."""
    readme = run_dir / "README.md"
    if readme.is_file() and not readme.is_symlink():
        text = readme.read_text(encoding="utf-8", errors="replace")
        return None if CARD_MARKER in text else text
    return None


def write_model_card(
    run_dir: str | Path, repo_id: str | None = None, token: str | None = None, base_model: str | None = None
) -> Path:
    """Write RUN_DIR/README.md (trainers call this at the end of training); a user-written card is kept."""
    run_dir = Path(run_dir)
    path = run_dir / "README.md"
    if _user_card(run_dir) is None:
        card = str(build_model_card(run_dir, repo_id, base_model))
        path.write_text(_scrub(card, token or _known_token()), encoding="utf-8")
    return path


# --- staging ---------------------------------------------------------------------------------------------


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _contains(path: Path, needle: bytes, chunk: int = 8 << 20) -> bool:
    """Search a possibly huge file in chunks (overlapping by the needle's length)."""
    tail = b""
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            if needle in tail + block:
                return True
            tail = (tail + block)[-len(needle) :]
    return False


def _known_token() -> str | None:
    """The token the client would use, only to keep it out of files; never raises."""
    try:
        from huggingface_hub import get_token

        return os.environ.get("HF_TOKEN") or get_token()
    except Exception:
        return None


def public_run_record(
    name: str, run_dir: Path, artifact: Artifact, config: dict[str, Any], repo_id: str | None, base_model: str | None
) -> str | None:
    """The shared text of `config.json` / `artifact.json`: local paths made public, a local base named by
    `base_model` or "a local model", load lines pointing at the repo (or the run folder, "."). None for others."""
    if name == "config.json" and config:
        shared = public_config(config, run_dir, base_model)
        if base_model and isinstance(shared.get("hub"), dict):
            shared["hub"]["base_model"] = base_model
        return json.dumps(shared, indent=2, ensure_ascii=False) + "\n"
    if name == "artifact.json":
        from dataclasses import asdict

        record = asdict(artifact)
        record["base_model"] = public_base_model(artifact.base_model, base_model)
        for f in record["files"]:
            f["load"] = localize(f["load"], run_dir, config, repo_id) if f.get("load") else f.get("load")
        record["extra"] = public_value(record["extra"], run_dir)
        return json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    return None


def _stage_safetensors(src: Path, out: Path, run_dir: Path, private: list[str]) -> None:
    """Hard-link (or copy) a weights file; when its header names local paths, write a copy with them made
    public (the tensor bytes, and so kohya's and ModelSpec's hashes, are unchanged)."""
    try:
        _, header = read_header(src)
    except (OSError, ValueError, UnicodeDecodeError):
        header = {}
    metadata = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else None
    shared = public_metadata(metadata, run_dir, private) if metadata else None
    if shared is not None and shared != metadata:
        copy_with_metadata(src, out, shared)
        return
    try:
        os.link(src.resolve(), out)  # weights can be gigabytes; staged binaries are never modified
    except OSError:
        shutil.copyfile(src, out)


def stage_upload(run_dir: str | Path, dest: str | Path, *, repo_id: str | None = None, token: str | None = None,
                 base_model: str | None = None) -> list[Path]:  # fmt: skip
    """Write the exact folder that would be uploaded into `dest` (absent or empty) and return its files.

    Also writes the card into RUN_DIR/README.md. A staged file holding the token is scrubbed (text) or refused;
    the training machine's paths are made public in text, run records and safetensors headers (`tuner.public`).
    """
    run_dir, dest = Path(run_dir), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise HubError(f"staging folder {dest} is not empty; remove it or pick another")
    token = token or _known_token()
    _, artifact, config = _read_run(run_dir)
    base_model = _base_model(config, base_model)
    private = _private(run_dir, artifact, config)
    files = upload_selection(run_dir)
    card = _user_card(run_dir)
    if card is None:
        card = _scrub(str(build_model_card(run_dir, repo_id, base_model)), token)
        (run_dir / "README.md").write_text(card, encoding="utf-8")
    written = []
    for rel, src in {"README.md": None, **files}.items():
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src is None:
            out.write_text(_scrub(scrub_text(card, private, run_dir), token), encoding="utf-8")
        elif src.suffix.lower() in TEXT_SUFFIXES:
            record = public_run_record(rel, run_dir, artifact, config, repo_id, base_model)
            text = record if record is not None else src.read_text(encoding="utf-8", errors="surrogateescape")
            data = scrub_text(text, private, run_dir).encode("utf-8", errors="surrogateescape")
            out.write_bytes(data.replace(token.encode(), b"***") if token else data)
        else:
            if token and _contains(src, token.encode()):
                raise HubError(f"refusing to publish: {rel} contains your hub token; remove it from the file")
            if src.suffix.lower() == ".safetensors":
                _stage_safetensors(src, out, run_dir, private)
            else:
                for path in private:
                    if _contains(src, path.encode()):
                        raise HubError(
                            f"refusing to publish: {rel} contains the local path {path}; remove it from the file"
                        )
                try:
                    os.link(src.resolve(), out)
                except OSError:
                    shutil.copyfile(src, out)
        written.append(out)
    return written


# --- the upload ------------------------------------------------------------------------------------------


@contextmanager
def _hub_environment(endpoint: str | None) -> Iterator[str]:
    """Point huggingface_hub at `endpoint` and turn Xet off for non-Xet servers, for this call only.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_DISABLE_XET once, at import, into `constants`; the upload path
    (`is_xet_available`, `validate-yaml`, agent detection) reads those constants at call time, so they are
    patched here as well as the environment (for subprocesses), and both are restored afterwards.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it to publish")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    host = urlsplit(endpoint).hostname or ""
    xet = host in XET_HOSTS or host.endswith(".huggingface.co")
    saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET")}
    saved = (constants.ENDPOINT, constants.HF_HUB_DISABLE_XET)
    os.environ["HF_ENDPOINT"], constants.ENDPOINT = endpoint, endpoint
    if not xet:
        os.environ["HF_HUB_DISABLE_XET"], constants.HF_HUB_DISABLE_XET = "1", True
    try:
        yield endpoint
    finally:
        constants.ENDPOINT, constants.HF_HUB_DISABLE_XET = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _causes(exc: BaseException) -> Iterator[BaseException]:
    for _ in range(10):
        yield exc
        if exc.__cause__ is None and exc.__context__ is None:
            return
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _status(exc: BaseException) -> int | None:
    for e in _causes(exc):
        response = getattr(e, "response", None)
        if response is not None and isinstance(getattr(response, "status_code", None), int):
            return response.status_code
    return None


def _transient(exc: BaseException) -> bool:
    network = {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout"}
    for e in _causes(exc):
        if isinstance(e, (ConnectionError, TimeoutError)) or network & {c.__name__ for c in type(e).__mro__}:
            return True
    return _status(exc) in (408, 429, 500, 502, 503, 504)


def _reason(exc: BaseException, token: str | None) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return _scrub(" ".join(lines[:2])[:300] or type(exc).__name__, token)


def _failure(exc: Exception, repo_id: str, run_dir: Path, endpoint: str, attempts: int, token: str | None
             ) -> HubError:  # fmt: skip
    from huggingface_hub.errors import RepositoryNotFoundError

    kept = f"Nothing local was removed: {run_dir} is intact; run `tuner publish` again once fixed."
    status = _status(exc)
    if isinstance(exc, RepositoryNotFoundError):
        return CannotWrite(f"you cannot write to {repo_id}: the hub says it does not exist or is not yours. {kept}")
    if status == 401:
        return InvalidToken(
            "the hub rejected the token (401 Unauthorized): it is invalid or expired. Create a write token, then run "
            f"`huggingface-cli login` or set HF_TOKEN. {kept}"
        )
    if status == 403:
        return CannotWrite(
            f"you cannot write to {repo_id}: it belongs to another user or organization, or the token has no write "
            f"access (403 Forbidden). Pick a repo id in your own namespace. {kept}"
        )
    if _transient(exc):
        return HubUnreachable(
            f"could not reach the hub at {endpoint} after {attempts} attempt(s) ({_reason(exc, token)}). {kept}"
        )
    return HubError(f"publishing to {repo_id} failed: {_reason(exc, token)}. {kept}")


def _resolve_token(token: str | None) -> str:
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception as exc:
            raise MissingToken(f"could not read the hub login ({type(exc).__name__}); set HF_TOKEN") from None
    if not token:
        raise MissingToken("no hub token: run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN")
    return token


def publish(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    retries: int = 4,
    backoff: float = 1.0,
    max_delay: float = 30.0,
    base_model: str | None = None,
    out: Callable[[str], None] = print,
) -> PublishResult:
    """Stage the run into RUN_DIR/.hub-upload, create the repo if needed, and upload that folder in one commit.

    Transient failures (connection errors, timeouts, 429/5xx) are retried `retries` times, waiting
    `backoff * 2**i` seconds (at most `max_delay`). The run folder is never modified beyond README.md.
    `base_model` (else `hub.base_model`) is the hub id of a base that was trained from a local folder or file.
    """
    run_dir, retries = Path(run_dir), max(0, retries)
    _read_run(run_dir)
    if not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", repo_id or "") or ".." in repo_id:
        raise HubError(f"--repo-id {repo_id!r}: expected user/name (letters, digits, '-', '_', '.')")
    token = _resolve_token(token) if not dry_run else (token or _known_token())
    staged = run_dir / STAGING_DIR
    shutil.rmtree(staged, ignore_errors=True)
    files = [
        p.relative_to(staged).as_posix()
        for p in stage_upload(run_dir, staged, repo_id=repo_id, token=token, base_model=base_model)
    ]
    result = PublishResult(repo_id=repo_id, staged_dir=staged, files=files, dry_run=dry_run)
    if dry_run:
        visibility = "private" if private else "public"
        out(f"dry run: would upload {len(files)} files from {staged} to {repo_id} ({visibility}); nothing was sent")
        for rel in files:
            out(f"  {rel}")
        return result
    from huggingface_hub import HfApi

    with _hub_environment(endpoint) as url:
        api = HfApi(endpoint=url, token=token)
        for attempt in range(retries + 1):
            result.attempts = attempt + 1
            try:
                repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
                info = api.upload_folder(
                    repo_id=repo_id, folder_path=staged, repo_type="model", commit_message="Upload from tuner"
                )
                break
            except Exception as exc:  # noqa: BLE001 - every failure becomes a clean, token-free TunerError
                if not _transient(exc) or attempt == retries:
                    raise _failure(exc, repo_id, run_dir, url, attempt + 1, token) from None
                delay = min(max_delay, backoff * 2**attempt)
                out(f"hub error ({_reason(exc, token)}); retrying in {delay:.1f}s [{attempt + 1}/{retries}]")
                time.sleep(delay)
    result.url, result.commit_url = str(repo_url), getattr(info, "commit_url", str(info))
    shutil.rmtree(staged, ignore_errors=True)
    out(f"published {len(files)} files to {result.url}")
    return result


# --- command line (wired by tuner.cli) -------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`tuner publish`: defaults come from the run's [hub] table; errors are raised as TunerError."""
    _, _, config = _read_run(args.run_dir)
    hub = config.get("hub", {})
    repo_id = args.repo_id or hub.get("repo_id")
    if not repo_id:
        raise HubError("no repository: pass --repo-id user/name (or set hub.repo_id in the config)")
    private = bool(hub.get("private", False)) if args.private is None else args.private
    base_model = getattr(args, "base_model", None)
    publish(
        args.run_dir, repo_id, private=private, endpoint=args.endpoint, dry_run=args.dry_run, base_model=base_model
    )
    return 0
