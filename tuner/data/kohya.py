"""Read a kohya-style dataset TOML (`[[datasets]]` / `[[datasets.subsets]]`) into `SubsetConfig`s.

Only the per-folder keys map onto subsets; dataset-wide kohya keys have `data.*` equivalents, and the error
for one names it, so a kohya file never half-applies silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tomllib
from pydantic import ValidationError

from tuner.config import SubsetConfig
from tuner.errors import DataError

logger = logging.getLogger("tuner.data")

SUBSET_KEYS = {"image_dir": "path", "num_repeats": "num_repeats", "class_tokens": "class_tokens",
               "caption_prefix": "caption_prefix", "is_reg": "is_reg"}  # fmt: skip
# kohya keys this suite takes from [data] instead (same meaning, one value per run).
RUN_WIDE = {
    "resolution": "data.resolution", "enable_bucket": "data.enable_bucket", "min_bucket_reso": "data.min_bucket_reso",
    "max_bucket_reso": "data.max_bucket_reso", "bucket_reso_steps": "data.bucket_reso_steps",
    "bucket_no_upscale": "data.bucket_no_upscale", "shuffle_caption": "data.shuffle_tags",
    "keep_tokens": "data.keep_tokens", "caption_extension": "data.caption_extension",
    "caption_dropout_rate": "data.caption_dropout_rate", "flip_aug": "data.random_flip",
    "random_crop": "data.crop", "batch_size": "train.train_batch_size", "caption_suffix": "data.caption_suffix",
}  # fmt: skip


def read_kohya_toml(path: Path) -> list[SubsetConfig]:
    """Subsets of every `[[datasets]]` table; relative `image_dir`s are relative to the TOML file."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"data.path = {str(path)!r}: not a readable kohya dataset TOML ({exc})") from None
    ignored: set[str] = set()
    subsets: list[SubsetConfig] = []
    for d, dataset in enumerate(doc.get("datasets", [])):
        for s, raw in enumerate(dataset.get("subsets", [])):
            where = f"{path} datasets[{d}].subsets[{s}]"
            values = {}
            for key, value in raw.items():
                if key in SUBSET_KEYS:
                    values[SUBSET_KEYS[key]] = value
                elif key in RUN_WIDE:
                    ignored.add(f"{key} (use {RUN_WIDE[key]})")
                else:
                    raise DataError(f"{where}: key {key!r} is not supported; supported: {', '.join(SUBSET_KEYS)}")
            if "path" not in values:
                raise DataError(f"{where}: `image_dir` is missing")
            image_dir = Path(values["path"]).expanduser()
            values["path"] = str(image_dir if image_dir.is_absolute() else path.parent / image_dir)
            try:
                subsets.append(SubsetConfig(**values))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise DataError(f"{where}: {problems}") from None
        ignored |= {f"{k} (use {RUN_WIDE[k]})" for k in dataset if k in RUN_WIDE}
    ignored |= {f"{k} (use {RUN_WIDE[k]})" for k in doc.get("general", {}) if k in RUN_WIDE}
    if not subsets:
        raise DataError(f"data.path = {str(path)!r}: no [[datasets.subsets]] with an image_dir")
    if ignored:
        keys = ", ".join(sorted(ignored))
        logger.warning("%s: run-wide keys are read from [data], not from this file: %s", path, keys)
    return subsets
