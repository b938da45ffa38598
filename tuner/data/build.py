"""`build_training_data`: list sources, make class images, check every file, apply the policy, warm the caches.

The order is the promise to the user: nothing trains before the report is printed, and with
`bad_file_policy = "error"` nothing trains while a file is unusable.
"""

from __future__ import annotations

import hashlib
import logging

from tuner.config import RunConfig
from tuner.data.buckets import Bucketer
from tuner.data.cache import default_cache_dir
from tuner.data.check import Entry, InspectMemo, inspect_items
from tuner.data.loader import TrainingData
from tuner.data.prior import check_prior_config, class_listing, ensure_class_images
from tuner.data.report import DataReport
from tuner.data.sources import Listing, list_sources
from tuner.errors import DataError

logger = logging.getLogger("tuner.data")


def _describe_location(config: RunConfig) -> str:
    data = config.data
    places = [repr(data.path)] if data.path else []
    places += [repr(s.path) for s in data.subsets]
    return ", ".join(places) or "(no data.path)"


def apply_policy(config: RunConfig, report: DataReport) -> None:
    """`skip`: warn listing every unused file; `error`: stop with the same list."""
    problems = report.problem_lines()
    if not problems:
        return
    listing = "\n  ".join(problems)
    if config.data.bad_file_policy == "error":
        raise DataError(
            f"data.bad_file_policy = 'error': {len(problems)} file(s) in {_describe_location(config)} cannot be used:"
            f"\n  {listing}\nFix or remove them, or set data.bad_file_policy = 'skip' to train without them"
        )
    message = f"{len(problems)} file(s) skipped or refused (data.bad_file_policy = 'skip'):\n  {listing}"
    report.warnings.append(f"{len(problems)} file(s) not used; see the list above")
    logger.warning(message)


def split_holdout(config: RunConfig, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """Hold out `holdout_fraction` of the instance images, chosen by content hash and seed (stable across runs)."""
    fraction = config.data.holdout_fraction
    if fraction <= 0 or len(entries) < 2:
        return entries, []
    count = min(len(entries) - 1, max(1, round(fraction * len(entries))))
    seed = config.train.seed
    ranked = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e.sha256}".encode()).hexdigest())
    chosen = {id(e) for e in ranked[:count]}
    return [e for e in entries if id(e) not in chosen], [e for e in entries if id(e) in chosen]


def _refuse_early(config: RunConfig, report: DataReport, train: list[Entry], show: bool) -> None:
    """Policy `error` with unusable files, or nothing usable: print the report and stop."""
    blocked = not train or (config.data.bad_file_policy == "error" and report.problems)
    if not blocked:
        return
    if show:
        print(report.to_text(), flush=True)
    apply_policy(config, report)
    reasons = ", ".join(f"{n} {r}" for r, n in report.reasons().items()) or "no image files"
    raise DataError(
        f"data.path = {_describe_location(config)}: no usable training images "
        f"(found {report.found} file(s): {reasons}); see `tuner check-data` for the list"
    )


def build_training_data(
    config: RunConfig,
    parts,
    needs: frozenset[str],
    *,
    rank: int = 0,
    world_size: int = 1,
    verbose: bool = True,
    dataset=None,
) -> TrainingData:
    """Everything a training run needs from its data; the report is printed (rank 0) and logged first.

    `dataset`, an in-memory `datasets.Dataset`, replaces `data.path` (library use).
    """
    data = config.data
    bucketer = Bucketer(data, parts.vae_scale_factor)
    listing = list_sources(config, dataset)
    check_prior_config(config, listing)
    memo = InspectMemo(default_cache_dir(config) / "inspect.json", data.max_image_pixels)
    seen: dict[str, str] = {}
    entries, records = inspect_items(listing.items, data, bucketer, memo, seen)
    train, holdout = split_holdout(config, [e for e in entries if not e.item.is_class])
    # Refuse bad instance data before spending time on class images.
    early = DataReport.build(config, listing, entries, records)
    _refuse_early(config, early, train, verbose and rank == 0)

    ensure_class_images(config, parts, rank=rank, world_size=world_size)
    class_list = Listing()
    class_info = class_listing(config, listing, into=class_list)
    class_new, class_records = inspect_items(class_list.items, data, bucketer, memo, seen)
    listing.items += class_list.items
    listing.sources += class_list.sources
    listing.ignored_files += class_list.ignored_files
    report = DataReport.build(config, listing, entries + class_new, records + class_records, class_info=class_info)
    report.holdout = len(holdout)
    apply_policy(config, report)
    class_entries = [e for e in entries + class_new if e.item.is_class]
    training = TrainingData(
        config, parts, needs, train, class_entries, holdout, report, bucketer, rank=rank, world_size=world_size
    )
    if verbose and rank == 0:
        print(report.to_text(), flush=True)
    logger.info("data: %d images used, %d batches per epoch", report.used, training.batches_per_epoch)
    training.fill_caches()
    return training
