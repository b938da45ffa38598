"""Decide, file by file, what the run will use, skip or refuse and why; `check_data` is the public entry point.

Refused: the file itself is unusable (zero bytes, not an image, corrupt, truncated, decompression bomb,
unreadable caption, missing). Skipped: a good file the run leaves out (duplicate content, too small for the
resolution, no caption and no fallback). Bad input never raises a trace: it becomes a line of the report.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tuner.config import DataConfig, RunConfig
from tuner.data.buckets import Bucketer, Size
from tuner.data.cache import default_cache_dir
from tuner.data.captions import format_caption, template_needs_caption
from tuner.data.images import ImageProblem, inspect_image
from tuner.data.report import DataReport, FileRecord
from tuner.data.sources import Item, list_sources
from tuner.errors import ConfigError

REFUSED = ("zero bytes", "not an image", "corrupt", "truncated", "decompression bomb", "unreadable caption encoding",
           "missing file", "unreadable file", "unsupported mode")  # fmt: skip
SKIPPED = ("duplicate", "too small", "missing caption")


@dataclass
class Entry:
    """A usable image: its item, content hash, upright size, static caption and bucket."""

    item: Item
    sha256: str
    size: Size
    caption: str
    bucket: Size

    @property
    def name(self) -> str:
        return self.item.name


def min_side(data: DataConfig) -> int:
    return data.min_image_side or max(1, data.resolution // 4)


def _caption(data: DataConfig, item: Item) -> str | None:
    base = item.caption if item.caption is not None else item.fallback
    if item.is_class:  # class prompts stay as written: the instance template would leak the token into them
        return " ".join(p for p in (item.prefix, base) if p) if base is not None else None
    if base is None and template_needs_caption(data):
        return None
    return format_caption(data, base or "", item.prefix)


class InspectMemo:
    """What inspecting a file found, keyed by (path, size, mtime): a re-run neither hashes nor decodes it again."""

    def __init__(self, path: Path | None, max_pixels: int):
        self.path, self.max_pixels = path, max_pixels
        self.rows: dict[str, dict] = {}
        self.dirty = False
        if path is not None and path.is_file():
            try:
                self.rows = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.rows = {}

    def key(self, item: Item) -> str | None:
        if item.path is None or item.data is not None:
            return None
        try:
            stat = item.path.stat()
        except OSError:
            return None
        return f"{item.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.max_pixels}"

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.rows), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only data folder only costs the re-inspection next time


def _inspect(item: Item, max_pixels: int, memo: InspectMemo | None) -> dict:
    """{"sha256", "width", "height", "mode"} or {"reason", "detail"} for one item, from the memo if possible."""
    key = memo.key(item) if memo else None
    if key and key in memo.rows:
        return memo.rows[key]
    try:
        raw = item.read_bytes()
    except OSError as exc:
        return {"reason": "unreadable file", "detail": exc.strerror or str(exc)}
    try:
        info = inspect_image(raw, max_pixels)
        found = {"sha256": hashlib.sha256(raw).hexdigest(), "width": info.width, "height": info.height,
                 "mode": info.mode}  # fmt: skip
    except ImageProblem as exc:
        found = {"reason": exc.reason, "detail": exc.detail}
    if key:
        memo.rows[key] = found
        memo.dirty = True
    return found


def inspect_items(
    items: list[Item],
    data: DataConfig,
    bucketer: Bucketer,
    memo: InspectMemo | None = None,
    first_by_hash: dict[str, str] | None = None,
) -> tuple[list[Entry], list[FileRecord]]:
    """Hash and decode every item once; return the usable entries and one record per item.

    `first_by_hash` (content hash -> name) carries duplicate detection across calls.
    """
    from tqdm.auto import tqdm

    entries: list[Entry] = []
    records: list[FileRecord] = []
    first_by_hash = {} if first_by_hash is None else first_by_hash
    smallest = min_side(data)
    for item in tqdm(items, desc="Checking images", unit="img", disable=len(items) < 500):

        def record(status: str, reason: str | None = None, detail: str = "", item: Item = item) -> None:
            records.append(FileRecord(item.name, item.origin, status, reason, detail, item.is_class))

        if item.problem and item.problem[0] == "missing file":
            record("refused", *item.problem)
            continue
        found = _inspect(item, data.max_image_pixels, memo)
        if "reason" in found:
            record("refused", found["reason"], found["detail"])
            continue
        if item.problem:
            record("refused", *item.problem)
            continue
        digest, size = found["sha256"], (found["width"], found["height"])
        if digest in first_by_hash:
            record("skipped", "duplicate", f"same content as {first_by_hash[digest]}")
            continue
        bucket = bucketer.bucket_for(size) if min(size) >= smallest else None
        if bucket is None:
            why = (
                f"the shorter side must be at least {smallest} (data.min_image_side) at resolution {data.resolution}"
                if min(size) < smallest
                else f"with bucket_no_upscale each side must reach data.bucket_reso_steps = {bucketer.step}"
            )
            record("skipped", "too small", f"{size[0]}x{size[1]}; {why}")
            continue
        caption = _caption(data, item)
        if caption is None:
            record(
                "skipped", "missing caption",
                f"no {data.caption_extension} sidecar or metadata text, and no instance prompt / class tokens",
            )  # fmt: skip
            continue
        first_by_hash[digest] = item.name
        entries.append(Entry(item, digest, size, caption, bucket))
        record("used", None, f"{size[0]}x{size[1]} {found['mode']} -> bucket {bucket[0]}x{bucket[1]}")
    if memo:
        memo.save()
    return entries, records


def check_data(config: RunConfig, parts=None, *, dataset=None, remember: bool = True) -> DataReport:
    """Inspect the data of `config` without training: what would be used, skipped or refused, and why.

    No model is needed; with `parts` the bucket steps are checked against its VAE factor. `dataset` (an
    in-memory `datasets.Dataset`) replaces `data.path`. Class images that prior preservation would generate are
    counted, not generated. `remember`: keep what inspecting each file found in the cache folder (`inspect.json`),
    so training does not decode them again; without it nothing is written anywhere.
    """
    from tuner.data.prior import class_listing

    data = config.data
    bucketer = Bucketer(data, parts.vae_scale_factor if parts is not None else 8)
    listing = list_sources(config, dataset)
    class_info = class_listing(config, listing)
    memo = InspectMemo(default_cache_dir(config) / "inspect.json" if remember else None, data.max_image_pixels)
    entries, records = inspect_items(listing.items, data, bucketer, memo)
    return DataReport.build(config, listing, entries, records, class_info=class_info)


def check_paths(config: RunConfig) -> None:
    """The data folders exist and can be read (hub dataset ids aside): a cheap look, so a mistyped `--data` is
    reported before any model loads. What is inside them is the data check's job."""
    from tuner.data.sources import _looks_like_hub_id
    from tuner.errors import DataError

    data = config.data
    if data.path and data.source_format in ("auto", "folder"):
        local = Path(data.path).expanduser()
        # `org/name` may be a hub dataset; a bare name (`photos`) is far more often a mistyped folder.
        hub_shaped = data.source_format == "auto" and "/" in data.path and _looks_like_hub_id(data.path)
        if not local.exists() and not hub_shaped:
            hint = "" if "/" in data.path else "; a hub dataset id? add --set data.source_format=datasets"
            raise DataError(f"data.path = {data.path!r}: no such folder (--data takes a folder of images){hint}")
        _listable(local, "data.path")
    for index, subset in enumerate(data.subsets):
        if not Path(subset.path).expanduser().is_dir():
            raise DataError(f"data.subsets[{index}].path = {subset.path!r}: no such folder")
        _listable(Path(subset.path).expanduser(), f"data.subsets[{index}].path")


def _listable(folder: Path, field: str) -> None:
    from tuner.errors import DataError

    if not folder.is_dir():
        return
    try:
        next(os.scandir(folder), None)
    except PermissionError:
        raise DataError(
            f"{field} = {str(folder)!r}: permission denied (this user cannot read the folder); fix its permissions "
            "or copy the images somewhere readable"
        ) from None


def check_config(
    path: str | None,
    config_file: str | None = None,
    sets: list[str] | None = None,
    preset: str | None = None,
    vram: float | None = None,
) -> RunConfig:
    """The run config `tuner check-data` inspects: the preset's (at its `vram` tier), the file's (any method) or
    data-only defaults, then PATH and --set. A preset's required fields and scaling rules are not applied: they
    decide how a run trains, not which files it can use."""
    from pydantic import ValidationError

    from tuner.config import build_config, deep_merge, format_validation_error, parse_set, read_toml

    layers: list[tuple[str, dict]] = []
    if preset:
        from tuner.presets import read_preset

        label, layer, _ = read_preset(preset).layer(vram)
        layers.append((label, layer))
    elif vram is not None:
        raise ConfigError(f"--vram {vram:g}: picks a memory tier of a preset; give --preset NAME too")
    if config_file:
        layers.append((str(config_file), read_toml(config_file)))
    if path:
        layers.append(("PATH", {"data": {"path": str(path)}}))
    layers += [(f"--set {s}", parse_set(s)) for s in sets or []]
    merged: dict = {}
    for _, layer in layers:
        merged = deep_merge(merged, layer)
    if merged.get("method"):
        return build_config(layers)
    try:
        return RunConfig.model_validate({**merged, "method": "check-data"})
    except ValidationError as exc:
        sources = " < ".join(label for label, _ in layers) or "check-data"
        raise ConfigError(format_validation_error(exc, RunConfig, sources)) from None


def check_data_main(
    path: str | None,
    config_file: str | None = None,
    sets: list[str] | None = None,
    as_json: bool = False,
    preset: str | None = None,
    vram: float | None = None,
) -> int:
    """`tuner check-data`: print the report (text or JSON); exit status 1 when training would refuse this data.

    It writes nothing, into the data folder or anywhere else, unless `data.cache_dir` names a cache folder."""
    config = check_config(path, config_file, sets, preset, vram)
    check_paths(config)
    report = check_data(config, remember=config.data.cache_dir is not None)
    print(report.to_json() if as_json else report.to_text())
    blocked = report.used == 0 or (config.data.bad_file_policy == "error" and report.problems)
    return 1 if blocked else 0
