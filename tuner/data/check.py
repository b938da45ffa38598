"""Decide, file by file, what the run will use, skip or refuse and why; `check_data` is the public entry point.

Refused: the file itself is unusable (zero bytes, not an image, corrupt, truncated, decompression bomb,
unreadable caption, missing). Skipped: a good file the run leaves out (duplicate content, too small for the
resolution, no caption and no fallback). Bad input never raises a trace: it becomes a line of the report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from tuner.config import DataConfig, RunConfig
from tuner.data.buckets import Bucketer, Size
from tuner.data.captions import format_caption, template_needs_caption
from tuner.data.images import ImageProblem, inspect_image
from tuner.data.report import DataReport, FileRecord
from tuner.data.sources import Item, Listing, list_sources

REFUSED = ("zero bytes", "not an image", "corrupt", "truncated", "decompression bomb", "unreadable caption encoding",
           "missing file", "unreadable file")  # fmt: skip
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
    if base is None and template_needs_caption(data):
        return None
    return format_caption(data, base or "", item.prefix)


def inspect_items(
    items: list[Item], data: DataConfig, bucketer: Bucketer, progress: Callable | None = None
) -> tuple[list[Entry], list[FileRecord]]:
    """Hash and decode every item once; return the usable entries and one record per item."""
    entries: list[Entry] = []
    records: list[FileRecord] = []
    first_by_hash: dict[str, str] = {}
    smallest = min_side(data)
    iterator = progress(items) if progress else items
    for item in iterator:

        def record(status: str, reason: str | None = None, detail: str = "", item: Item = item) -> None:
            records.append(FileRecord(item.name, item.origin, status, reason, detail, item.is_class))

        if item.problem and item.problem[0] == "missing file":
            record("refused", *item.problem)
            continue
        try:
            raw = item.read_bytes()
        except OSError as exc:
            record("refused", "unreadable file", exc.strerror or str(exc))
            continue
        try:
            info = inspect_image(raw, data.max_image_pixels)
        except ImageProblem as exc:
            record("refused", exc.reason, exc.detail)
            continue
        if item.problem:
            record("refused", *item.problem)
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in first_by_hash:
            record("skipped", "duplicate", f"same content as {first_by_hash[digest]}")
            continue
        size = (info.width, info.height)
        bucket = bucketer.bucket_for(size) if min(size) >= smallest else None
        if bucket is None:
            record(
                "skipped", "too small", f"{info.width}x{info.height}; the shorter side must be at least {smallest} "
                f"(data.min_image_side) to train at resolution {data.resolution}"
            )  # fmt: skip
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
        record("used", None, f"{info.width}x{info.height} {info.mode} -> bucket {bucket[0]}x{bucket[1]}")
    return entries, records


def check_data(config: RunConfig, parts=None, *, listing: Listing | None = None) -> DataReport:
    """Inspect the data of `config` without training: what would be used, skipped or refused, and why.

    No model is needed; with `parts` the bucket steps are checked against its VAE factor. Class images that
    prior preservation would generate are counted, not generated.
    """
    from tuner.data.prior import class_listing

    data = config.data
    bucketer = Bucketer(data, parts.vae_scale_factor if parts is not None else 8)
    listing = listing or list_sources(config)
    class_info = class_listing(config, listing)
    entries, records = inspect_items(listing.items, data, bucketer)
    return DataReport.build(config, listing, entries, records, class_info=class_info)
