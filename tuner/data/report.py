"""The data report: what was found, used, skipped or refused and why, buckets, batching and caption statistics.

One object, rendered as text for people (`to_text`) and JSON for machines (`to_json`); `tuner check-data`
prints it and training prints it before the first step.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from tuner.data.captions import caption_stats


@dataclass
class FileRecord:
    """One file's fate: `used`, `skipped` or `refused`, with a reason code and a human detail."""

    name: str
    origin: str
    status: str
    reason: str | None = None
    detail: str = ""
    is_class: bool = False


@dataclass
class DataReport:
    sources: list[dict]
    files: list[FileRecord]
    buckets: dict[str, dict[str, int]]
    captions: dict[str, Any]
    class_images: dict[str, Any] | None = None
    batching: dict[str, Any] = field(default_factory=dict)
    holdout: int = 0
    ignored_files: int = 0
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, config, listing, entries, records, class_info=None) -> DataReport:
        buckets: dict[str, dict[str, int]] = {}
        for entry in sorted(entries, key=lambda e: e.bucket):
            slot = buckets.setdefault(f"{entry.bucket[0]}x{entry.bucket[1]}", {"images": 0, "examples": 0})
            slot["images"] += 1
            slot["examples"] += entry.item.repeats
        return cls(
            sources=list(listing.sources),
            files=list(records),
            buckets=buckets,
            captions=caption_stats([e.caption for e in entries]),
            class_images=class_info,
            ignored_files=listing.ignored_files,
        )

    # --- counts -------------------------------------------------------------------------------------------
    def _count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def found(self) -> int:
        return len(self.files)

    @property
    def used(self) -> int:
        return self._count("used")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def refused(self) -> int:
        return self._count("refused")

    @property
    def problems(self) -> list[FileRecord]:
        """Every file not used (skipped or refused), in listing order."""
        return [f for f in self.files if f.status != "used"]

    def reasons(self) -> dict[str, int]:
        return dict(Counter(f.reason for f in self.problems if f.reason))

    @property
    def dropped_from_buckets(self) -> int:
        return int(self.batching.get("dropped_from_buckets", 0))

    # --- rendering ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": {
                "found": self.found,
                "used": self.used,
                "skipped": self.skipped,
                "refused": self.refused,
                "reasons": self.reasons(),
                "ignored_files": self.ignored_files,
                "holdout": self.holdout,
            },
            "sources": self.sources,
            "files": [asdict(f) for f in self.files],
            "buckets": self.buckets,
            "batching": self.batching,
            "captions": self.captions,
            "class_images": self.class_images,
            "warnings": self.warnings,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def problem_lines(self) -> list[str]:
        width = max((len(f.name) for f in self.problems), default=0)
        return [f"{f.name:<{width}}  {f.status}: {f.reason}: {f.detail}".rstrip(": ") for f in self.problems]

    def to_text(self) -> str:
        lines = ["Data check"]
        for source in self.sources:
            lines.append(
                f"  source {source['origin']}: {source['kind']} {source['location']} ({source['images']} images)"
            )
        lines.append(
            f"  images: {self.found} found, {self.used} used, {self.skipped} skipped, {self.refused} refused"
            + (f", {self.holdout} held out for evaluation" if self.holdout else "")
        )
        if self.ignored_files:
            lines.append(f"  other files ignored (not images or captions): {self.ignored_files}")
        for status in ("refused", "skipped"):
            chosen = [f for f in self.files if f.status == status]
            if chosen:
                lines.append(f"  {status}:")
                width = max(len(f.name) for f in chosen)
                lines.extend(f"    {f.name:<{width}}  {f.reason}: {f.detail}" for f in chosen)
        if self.buckets:
            shown = ", ".join(f"{k}: {v['images']} ({v['examples']} examples)" for k, v in self.buckets.items())
            lines.append(f"  buckets (w x h): {shown}")
        if self.batching:
            b = self.batching
            lines.append(
                f"  batching: {b.get('examples', 0)} examples per epoch, {b.get('batches_per_epoch', 0)} batches of "
                f"{b.get('global_batch_size', 0)} (per process {b.get('batch_size', 0)} x {b.get('world_size', 1)}); "
                f"dropped from buckets: {b.get('dropped_from_buckets', 0)}; "
                f"padded by repeating: {b.get('padded_examples', 0)} examples"
            )
        c = self.captions
        if c.get("count"):
            tags = ", ".join(f"{t} ({n})" for t, n in c.get("top_tags", [])[:8])
            lines.append(
                f"  captions: {c['count']}, {c['distinct']} distinct, mean {c['mean_words']} words "
                f"({c['mean_chars']} chars), {c['empty']} empty" + (f"; top tags: {tags}" if tags else "")
            )
        if self.class_images:
            ci = self.class_images
            lines.append(
                "  class images: "
                + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ci.items() if v is not None and v != "")
            )
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)
