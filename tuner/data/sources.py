"""Find the images of a run and their captions: folders with sidecars, metadata files, `datasets`, kohya subsets.

A source only lists `Item`s (where the bytes are, which caption, which subset); whether an item is usable is
decided later by the check, so that every file ends up in the report with a reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tuner.config import DataConfig, RunConfig, SubsetConfig
from tuner.data.captions import CaptionProblem, read_sidecar
from tuner.data.images import IMAGE_EXTENSIONS
from tuner.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SKIPPED_DIRS = {".tuner-cache", "__pycache__"}


@dataclass
class Item:
    """One image a source lists, before inspection."""

    name: str
    """Display name (path relative to its source root, or `dataset[row]`); unique within a run."""
    origin: str
    """Config field it came from: `data.path`, `data.subsets[1]`, `data.class_data_dir`."""
    path: Path | None = None
    data: bytes | None = None
    caption: str | None = None
    """Caption from a sidecar, a metadata row or a dataset column."""
    fallback: str | None = None
    """Caption when `caption` is missing (subset class tokens, instance or class prompt)."""
    prefix: str = ""
    repeats: int = 1
    is_class: bool = False
    problem: tuple[str, str] | None = None
    """(reason, detail) found while listing: unreadable caption, file named in metadata but missing."""

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class Listing:
    """What the sources found: items, plus each source's description for the report."""

    items: list[Item] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    ignored_files: int = 0


# --- folders -------------------------------------------------------------------------------------------


def _walk(root: Path, recursive: bool) -> Iterable[Path]:
    if not recursive:
        yield from sorted((p for p in root.iterdir() if p.is_file()), key=lambda p: p.name)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _metadata_rows(meta: Path, data: DataConfig) -> Iterable[tuple[int, dict]]:
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{meta}: cannot read as UTF-8 text ({exc})") from None
    if meta.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{meta} row {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{meta} row {number}: expected an object with `file_name`, got {line[:60]!r}")
            yield number, row
    else:
        for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            yield number, row


def read_metadata(folder: Path, data: DataConfig) -> dict[Path, tuple[str | None, str]]:
    """{resolved image path: (caption, "metadata.jsonl row N")} from the folder's metadata file, if any.

    A `file_name` that leaves the folder (`../../etc/passwd`, an absolute path) is an error naming the row.
    """
    meta = next((folder / n for n in METADATA_FILES if (folder / n).is_file()), None)
    if meta is None:
        return {}
    root = folder.resolve()
    captions: dict[Path, tuple[str | None, str]] = {}
    for number, row in _metadata_rows(meta, data):
        name = row.get("file_name")
        where = f"{meta} row {number}"
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: `file_name` is missing or empty; each row names an image in {folder}")
        target = (folder / name).resolve()
        if Path(name).is_absolute() or not target.is_relative_to(root):
            raise DataError(
                f"{where}: file_name = {name!r} points outside the dataset folder {folder}; "
                "only paths inside it are allowed"
            )
        text = row.get(data.caption_column)
        captions[target] = (str(text).strip() if text is not None and str(text).strip() else None, where)
    return captions


def _image_item(path: Path, root: Path, data: DataConfig, origin: str, caption: str | None, **fields) -> Item:
    relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    name = str(relative) if origin == "data.path" else f"{root.name}/{relative}"
    item = Item(name=name, origin=origin, path=path, caption=caption, **fields)
    if item.caption is None:
        try:
            item.caption = read_sidecar(path, data.caption_extension)
        except CaptionProblem as exc:
            item.problem = (exc.reason, exc.detail)
    return item


def scan_folder(
    root: Path,
    data: DataConfig,
    origin: str,
    *,
    recursive: bool,
    listing: Listing,
    exclude: tuple[Path, ...] = (),
    **fields,
) -> None:
    """List every file with an image extension under `root` (bad ones too: the check reports them).

    `fields` (fallback, prefix, repeats, is_class) go onto every item; folders in `exclude` are skipped.
    """
    if not root.is_dir():
        field_name = "data.path" if origin == "data.path" else f"{origin}.path"
        raise DataError(f"{field_name} = {str(root)!r}: no such folder")
    excluded = {p.resolve() for p in exclude}
    metadata: dict[Path, tuple[str | None, str]] = {}
    folders = [root] if not recursive else [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    for folder in folders:
        if any(part in SKIPPED_DIRS or part.startswith(".") for part in folder.relative_to(root).parts):
            continue
        metadata.update(read_metadata(folder, data))
    sidecar = data.caption_extension if data.caption_extension.startswith(".") else f".{data.caption_extension}"
    seen: set[Path] = set()
    count = 0
    for path in _walk(root, recursive):
        if any(path.resolve().is_relative_to(ex) for ex in excluded):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            if path.name not in METADATA_FILES and path.suffix not in (sidecar, ".txt", ".caption"):
                listing.ignored_files += 1
            continue
        resolved = path.resolve()
        seen.add(resolved)
        listing.items.append(_image_item(path, root, data, origin, metadata.get(resolved, (None,))[0], **fields))
        count += 1
    for target, (caption, where) in metadata.items():
        if target in seen:
            continue
        if target.is_file():  # named by metadata in a sub-folder the (non-recursive) walk did not enter
            listing.items.append(_image_item(target, root.resolve(), data, origin, caption, **fields))
            count += 1
        else:
            name = str(target.relative_to(root.resolve()))
            problem = ("missing file", f"named in {where} but not found")
            listing.items.append(Item(name=name, origin=origin, path=target, problem=problem, **fields))
    listing.sources.append({"origin": origin, "kind": "folder", "location": str(root), "images": count})


_LEGACY = re.compile(r"^(\d+)_(.+)$")


def legacy_subsets(folder: Path) -> list[SubsetConfig]:
    """kohya's folder convention `<repeats>_<class tokens>/` (e.g. `10_sks dog`), used when the folder itself
    holds no images but such sub-folders."""
    if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
        return []
    subsets = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _LEGACY.match(sub.name)
        if match and int(match.group(1)) >= 1:
            subsets.append(SubsetConfig(path=str(sub), num_repeats=int(match.group(1)), class_tokens=match.group(2)))
    return subsets


# --- `datasets` ----------------------------------------------------------------------------------------


def _looks_like_hub_id(value: str) -> bool:
    if value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1:
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in value.split("/"))


def load_hf_dataset(data: DataConfig, path: str):
    """A `datasets.Dataset` from a saved folder, a local imagefolder or a hub id; offline a clear error."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("reading a Hugging Face dataset needs `pip install datasets`") from None
    local = Path(path)
    try:
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))
        elif local.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(local), split=data.dataset_split)
        else:
            ds = datasets.load_dataset(path, split=data.dataset_split)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader/hub failure becomes one message
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise DataError(
            f"data.path = {path!r}: not a local folder, and it could not be loaded as a Hugging Face dataset "
            f"({reason}). Give an existing folder of images, or check the dataset id and your network"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if data.dataset_split not in ds:
            raise DataError(f"data.dataset_split = {data.dataset_split!r}: not in {path!r}; splits: {list(ds)}")
        ds = ds[data.dataset_split]
    return ds


def add_dataset(ds, data: DataConfig, label: str, listing: Listing, *, fallback: str | None = None) -> None:
    """List the rows of a `datasets.Dataset` (images as raw bytes, so the check sees the real file)."""
    import datasets

    columns = list(ds.column_names)
    if data.image_column not in columns:
        raise DataError(f"data.image_column = {data.image_column!r}: not a column of {label}; columns: {columns}")
    has_text = data.caption_column in columns
    if not has_text and "{caption}" in data.caption_template and fallback is None:
        raise DataError(
            f"data.caption_column = {data.caption_column!r}: not a column of {label}; columns: {columns} "
            "(or set data.instance_prompt for images without captions)"
        )
    if isinstance(ds.features[data.image_column], datasets.Image):
        ds = ds.cast_column(data.image_column, datasets.Image(decode=False))
    for index, row in enumerate(ds):
        cell = row[data.image_column]
        item = Item(name=f"{label}[{index}]", origin="data.path", fallback=fallback)
        if isinstance(cell, dict):
            if cell.get("bytes"):
                item.data = cell["bytes"]
            elif cell.get("path"):
                item.path = Path(cell["path"])
            if cell.get("path"):
                item.name = f"{label}[{index}] {Path(cell['path']).name}"
        elif hasattr(cell, "save"):  # an already decoded PIL image
            buffer = io.BytesIO()
            cell.save(buffer, format="PNG")
            item.data = buffer.getvalue()
        if item.data is None and item.path is None:
            item.problem = ("not an image", f"column {data.image_column!r} holds {type(cell).__name__}")
        text = row.get(data.caption_column) if has_text else None
        item.caption = str(text).strip() if text is not None and str(text).strip() else None
        listing.items.append(item)
    listing.sources.append({"origin": "data.path", "kind": "datasets", "location": label, "images": len(ds)})


# --- the run's sources ---------------------------------------------------------------------------------


def _subset_items(subset: SubsetConfig, origin: str, data: DataConfig, listing: Listing) -> None:
    scan_folder(
        Path(subset.path).expanduser(),
        data,
        origin,
        recursive=data.recursive,
        fallback=subset.class_tokens or (None if subset.is_reg else data.instance_prompt),
        prefix=subset.caption_prefix,
        repeats=subset.num_repeats,
        is_class=subset.is_reg,
        listing=listing,
    )


def list_sources(config: RunConfig, dataset=None) -> Listing:
    """Every item of `data.path` (or of `dataset`, an in-memory `datasets.Dataset`) and of `data.subsets`.

    Class images of `class_data_dir` are added by `prior`.
    """
    data = config.data
    listing = Listing()
    if not data.path and not data.subsets and dataset is None:
        raise DataError("data.path is not set and data.subsets is empty: nothing to read; pass --data DIR")
    if dataset is not None:
        add_dataset(dataset, data, "dataset", listing, fallback=data.instance_prompt)
    elif data.path:
        path = data.path
        local = Path(path).expanduser()
        if local.is_file() and local.suffix == ".toml":
            from tuner.data.kohya import read_kohya_toml

            for index, subset in enumerate(read_kohya_toml(local)):
                _subset_items(subset, f"{local.name} subset {index}", data, listing)
        elif data.source_format in ("imagefolder", "datasets") or (
            data.source_format == "auto"
            and (
                (local.is_dir() and (local / "dataset_info.json").is_file())
                or (not local.exists() and _looks_like_hub_id(path))
            )
        ):
            add_dataset(load_hf_dataset(data, path), data, local.name or path, listing, fallback=data.instance_prompt)
        elif local.is_dir() and (legacy := legacy_subsets(local)):
            for subset in legacy:
                _subset_items(subset, f"data.path subset {Path(subset.path).name!r}", data, listing)
        elif local.is_dir():
            exclude = (Path(data.class_data_dir).expanduser(),) if data.class_data_dir else ()
            scan_folder(
                local,
                data,
                "data.path",
                recursive=data.recursive,
                fallback=data.instance_prompt,
                repeats=data.num_repeats,
                listing=listing,
                exclude=exclude,
            )
        elif local.exists():
            raise DataError(f"data.path = {path!r}: a file, not a folder; give a folder of images or a kohya .toml")
        else:
            raise DataError(f"data.path = {path!r}: no such folder")
    for index, subset in enumerate(data.subsets):
        _subset_items(subset, f"data.subsets[{index}]", data, listing)
    return listing
