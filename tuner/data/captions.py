"""Captions: reading sidecars, choosing a fallback, and the per-step transforms (template, dropout, shuffle).

Every random choice takes a generator built from (seed, epoch, example index), so a resumed run sees the
same captions as the uninterrupted one.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from tuner.config import DataConfig


class CaptionProblem(Exception):
    """A sidecar that exists but cannot be read as text."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_sidecar(image: Path, extension: str) -> str | None:
    """First non-empty line of `<stem><extension>` (UTF-8, BOM allowed); None when absent or blank."""
    extension = extension if extension.startswith(".") else f".{extension}"
    path = image.with_suffix(extension)
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionProblem("unreadable caption encoding", f"{path.name} is not UTF-8 ({exc.reason})") from None
    except OSError as exc:
        raise CaptionProblem("unreadable caption encoding", f"{path.name}: {exc.strerror}") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def template_needs_caption(data: DataConfig) -> bool:
    return "{caption}" in data.caption_template


def format_caption(data: DataConfig, caption: str, prefix: str = "") -> str:
    """The static part: template, subset prefix, data prefix/suffix (what the text cache can key on)."""
    if data.token_in_captions and data.token and data.token not in caption:
        caption = re.sub(rf"(?<!\w){re.escape(data.token_in_captions)}(?!\w)", lambda _: data.token, caption)
    text = data.caption_template.replace("{caption}", caption).replace("{token}", data.token or "")
    parts = [p for p in (data.caption_prefix, prefix, text, data.caption_suffix) if p]
    return " ".join(" ".join(parts).split())


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep: int, rng: np.random.Generator) -> str:
    """Shuffle comma-separated tags, keeping the first `keep` in place."""
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    order = rng.permutation(len(tail)) if tail else []
    return ", ".join(head + [tail[i] for i in order])


def varies(data: DataConfig) -> bool:
    """Whether a caption can differ from step to step (then it is not one fixed string per image)."""
    return data.caption_dropout_rate > 0 or data.shuffle_tags


def step_caption(data: DataConfig, static: str, rng: np.random.Generator | None) -> str:
    """The caption one step sees: tag shuffle (keeping `keep_tokens`), then dropout to the empty caption."""
    if rng is None:
        return static
    caption = static
    if data.shuffle_tags:
        caption = shuffle_tags(caption, data.keep_tokens, rng)
    if data.caption_dropout_rate > 0 and rng.random() < data.caption_dropout_rate:
        caption = ""
    return caption


def caption_stats(captions: list[str], top: int = 10) -> dict:
    """Count, mean length in words and characters, empty ones, and the most common comma tags."""
    if not captions:
        return {"count": 0, "mean_words": 0.0, "mean_chars": 0.0, "empty": 0, "distinct": 0, "top_tags": []}
    tags = Counter(tag.lower() for caption in captions for tag in split_tags(caption))
    return {
        "count": len(captions),
        "mean_words": round(sum(len(c.split()) for c in captions) / len(captions), 2),
        "mean_chars": round(sum(len(c) for c in captions) / len(captions), 2),
        "empty": sum(1 for c in captions if not c.strip()),
        "distinct": len(set(captions)),
        "top_tags": [[tag, count] for tag, count in tags.most_common(top)],
    }
