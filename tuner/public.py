"""What may leave the training machine: configs, artifact records and file headers without its local paths.

A run's own folder keeps full paths (resume and the CLI read them). Whatever is shared — the `tuner.config`
header inside every `.safetensors` (written at train time), the staged `config.json`, `artifact.json` and model
card — names folders relative to the run, or by their last component, and a local base model as
`hub.base_model` when set, else "a local model". Also: written files get the user's normal file mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LOCAL_MODEL = "a local model"
"""How a base model that is a local folder or file (the built-in micro model included) is named in public."""
BUILTIN_PREFIX = "builtin:"
MODEL_FIELDS = ("pretrained_model_name_or_path",)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WINDOWS = re.compile(r"[A-Za-z]:[\\/]")


# --- names ----------------------------------------------------------------------------------------------


def is_hub_id(value: str | None) -> bool:
    """`org/name` that is not a local file or folder (a hub id the world can resolve)."""
    if not value or value.startswith((".", "/", "~", BUILTIN_PREFIX)) or "\\" in value or value.count("/") != 1:
        return False
    return bool(_HUB_ID.fullmatch(value)) and not Path(value).exists()


def is_local_model(value: str | None) -> bool:
    """A base model only this machine has: a folder, a single file, or a built-in model of this install."""
    return bool(value) and not is_hub_id(value)


def public_base_model(value: str | None, base_model: str | None = None) -> str:
    """The base as the world may see it: `base_model` (hub.base_model) when given, a hub id as is, else
    "a local model"."""
    if base_model:
        return base_model
    return value if value and is_hub_id(value) else LOCAL_MODEL


def _looks_like_path(value: str) -> bool:
    if not value or "\n" in value or len(value) > 4096:
        return False
    if value.startswith(("/", "~", "./", "../", "file:")) or _WINDOWS.match(value) or value.startswith("\\\\"):
        return True
    try:
        return ("/" in value or os.sep in value) and Path(value).exists()
    except (OSError, ValueError):
        return False


def public_path(value: str, run_dir: str | Path | None = None) -> str:
    """A local path as it may be shared: relative to the run folder when inside it ("." for the run itself),
    else its last component. Anything that is not a local path is returned unchanged."""
    if not _looks_like_path(value):
        return value
    path = Path(value.removeprefix("file:")).expanduser()
    try:
        resolved = path.resolve()
        if run_dir is not None:
            root = Path(run_dir).expanduser().resolve()
            if resolved == root or resolved.is_relative_to(root):
                return resolved.relative_to(root).as_posix() or "."
    except (OSError, ValueError, RuntimeError):
        resolved = path
    name = resolved.name or path.name
    return name or "."


def public_value(value: Any, run_dir: str | Path | None = None) -> Any:
    """`value` (any JSON value) with every local path made public, recursively."""
    if isinstance(value, str):
        return public_path(value, run_dir)
    if isinstance(value, dict):
        return {k: public_value(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v, run_dir) for v in value]
    return value


def public_config(config: dict[str, Any], run_dir: str | Path | None = None, base_model: str | None = None
                  ) -> dict[str, Any]:  # fmt: skip
    """A resolved config (`RunConfig.to_dict()` or a run's config.json) safe to share.

    The base model becomes `base_model` / `hub.base_model` or "a local model" when it is local; every other
    local path becomes relative to the run (`run_dir`, default `train.output_dir`) or its last component.
    """
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    run_dir = run_dir if run_dir is not None else train.get("output_dir")
    hub = config.get("hub") if isinstance(config.get("hub"), dict) else {}
    base_model = base_model or hub.get("base_model")
    out = public_value(config, run_dir)
    model = config.get("model")
    if isinstance(model, dict):
        for key in MODEL_FIELDS:
            if isinstance(model.get(key), str):
                out["model"][key] = public_base_model(model[key], base_model)
    if isinstance(out.get("train"), dict) and "output_dir" in out["train"]:
        output_dir = train.get("output_dir")
        out["train"]["output_dir"] = public_path(str(output_dir), None) if output_dir else None
    return out


def private_paths(config: dict[str, Any], run_dir: str | Path | None = None) -> list[str]:
    """Absolute local paths a run's config names (data, class, cache, output folders, local base, ...), longest
    first, for a last scrub of text that did not come from the config itself."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str) and _looks_like_path(value):
            path = Path(value.removeprefix("file:")).expanduser()
            found.add(str(path))
            with contextlib.suppress(OSError, RuntimeError):
                found.add(str(path.resolve()))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(config)
    if run_dir is not None:
        walk(str(Path(run_dir).resolve()))
    return sorted((p for p in found if p not in ("/", ".", "")), key=len, reverse=True)


def scrub_text(text: str, paths: Iterable[str], run_dir: str | Path | None = None) -> str:
    """Replace each of `paths` (and anything under it) in free text by its public form."""
    for path in paths:
        if path in text:
            pattern = re.compile(re.escape(path) + r"(?P<rest>(?:/[^\s\"'`),\]}]*)?)")
            text = pattern.sub(lambda m: public_path(m.group(0), run_dir) if m.group(0) else m.group(0), text)
    return text


# --- safetensors headers --------------------------------------------------------------------------------


def public_metadata(metadata: dict[str, str], run_dir: str | Path | None = None,
                    paths: Iterable[str] = ()) -> dict[str, str]:  # fmt: skip
    """A safetensors `__metadata__` without local paths: JSON values (`tuner.config`) are made public field by
    field, other values that are paths become public paths, and known private paths in free text are scrubbed."""
    paths = list(paths)
    out: dict[str, str] = {}
    for key, value in metadata.items():
        new = value
        if isinstance(value, str) and value[:1] in "{[":
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("model"), dict):
                shared = public_config(parsed, run_dir)
            else:
                shared = public_value(parsed, run_dir) if parsed is not None else None
            if parsed is not None and shared != parsed:  # re-serialized only when something changed
                new = json.dumps(shared, sort_keys=isinstance(shared, dict), ensure_ascii=False)
        elif isinstance(value, str):
            new = public_path(value, run_dir)
        out[key] = scrub_text(new, paths, run_dir) if isinstance(new, str) else new
    return out


def read_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(header length, header JSON) of a safetensors file, reading only the header."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return length, json.loads(fh.read(length))


def copy_with_metadata(src: str | Path, dest: str | Path, metadata: dict[str, str]) -> None:
    """Copy a safetensors file with its `__metadata__` replaced; the tensor bytes are copied unchanged."""
    length, header = read_header(src)
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fin.seek(8 + length)
        fout.write(struct.pack("<Q", len(blob)) + blob)
        while chunk := fin.read(16 << 20):
            fout.write(chunk)


# --- file modes -----------------------------------------------------------------------------------------


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(*paths: str | Path) -> None:
    """Give files (and folders, recursively) the mode a plain `open(..., "w")` / `mkdir` would: 0666 / 0777 less
    the umask. Some writers (safetensors' atomic save) create files 0600, which other users and servers cannot
    read. Symlinks are left alone; paths that do not exist are skipped."""
    mask = umask()
    for start in paths:
        start = Path(start)
        if start.is_symlink() or not start.exists():
            continue
        items = [start] if start.is_file() else [start, *start.rglob("*")]
        for item in items:
            if item.is_symlink():
                continue
            mode = stat.S_IMODE(item.stat().st_mode)
            executable = item.is_dir() or mode & 0o111
            wanted = (0o777 if executable else 0o666) & ~mask
            if mode != wanted:
                with contextlib.suppress(OSError):
                    os.chmod(item, wanted)
