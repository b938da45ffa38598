"""`TrainingData`: deterministic bucketed batches for one rank, filled from the caches or computed on the fly.

Order and augmentation depend only on (train seed, epoch, example index), never on global RNG, so
`iterate(epoch, start)` after a resume yields exactly the batches the interrupted run would have seen.
Every global batch (B x world) comes from one bucket; a bucket's last batch is padded by repeating its
own examples, so no image is dropped.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from tuner.config import RunConfig
from tuner.data.assemble import Assembler, Row
from tuner.data.buckets import Bucketer, Placement, Size
from tuner.data.captions import step_caption, varies
from tuner.data.check import Entry
from tuner.data.report import DataReport
from tuner.errors import DataError

logger = logging.getLogger("tuner.data")

# Purposes of the per-example generators: one stream each, so adding one never shifts the others.
_ORDER, _FLIP, _CROP, _CAPTION, _CLASS_PICK, _CLASS_AUGMENT = range(6)


def rng_for(seed: int, epoch: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, epoch, index, purpose])


@dataclass
class HeldOutExample:
    """An image kept out of training (decoder evaluation): center crop to its bucket, no flip."""

    name: str
    caption: str
    pixel_values: torch.Tensor
    original_size: tuple[int, int]
    target_size: tuple[int, int]


class TrainingData:
    """The run's examples, their bucketed order per epoch, and the batches of one rank."""

    def __init__(
        self,
        config: RunConfig,
        parts,
        needs: frozenset[str],
        entries: list[Entry],
        class_entries: list[Entry],
        holdout: list[Entry],
        report: DataReport,
        bucketer: Bucketer,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise DataError(f"rank = {rank}: must be in [0, world_size = {world_size})")
        self.config, self.parts, self.needs = config, parts, frozenset(needs)
        self.data = config.data
        self.rank, self.world_size = rank, world_size
        self.batch_size = config.train.train_batch_size
        self.global_batch = self.batch_size * world_size
        self.seed = config.train.seed
        self.bucketer = bucketer
        self.report = report
        self.with_prior_preservation = self.data.with_prior_preservation
        self.entries, self.class_entries, self._holdout_entries = entries, class_entries, holdout
        self.examples: list[Entry] = [e for e in entries for _ in range(e.item.repeats)]
        self.num_examples = len(self.examples)
        self._by_bucket: dict[Size, list[int]] = defaultdict(list)
        for index, entry in enumerate(self.examples):
            self._by_bucket[entry.bucket].append(index)
        self.batches_per_epoch = sum(math.ceil(len(v) / self.global_batch) for v in self._by_bucket.values())
        self.padded_examples = sum(-len(v) % self.global_batch for v in self._by_bucket.values())
        self._class_pool = self._assign_class_buckets()
        self._schedule_cache: tuple[int, list[tuple[Size, int, np.ndarray]]] | None = None

        self.assembler = Assembler(config, parts, self.needs)
        self.cache_dir = self.assembler.cache_dir

        report.batching = {
            "examples": self.num_examples,
            "batch_size": self.batch_size,
            "world_size": world_size,
            "global_batch_size": self.global_batch,
            "batches_per_epoch": self.batches_per_epoch,
            "padded_examples": self.padded_examples,
            "dropped_from_buckets": 0,
            "prior_preservation": self.data.prior_mode if self.with_prior_preservation else None,
            "class_examples": len(self.class_entries),
        }

    # --- order --------------------------------------------------------------------------------------------
    def _assign_class_buckets(self) -> dict[Size, list[Entry]]:
        """Give each instance bucket its own class images (proportional, at least one), so a batch's class
        half shares the instance half's bucket and every class image is encoded for one bucket only."""
        if not (self.with_prior_preservation and self.data.prior_mode == "images"):
            return {}
        if not self.class_entries:
            raise DataError(
                "prior preservation has no usable class images: data.class_data_dir / is_reg subsets hold none "
                "(see the report), so no class half can be built"
            )
        buckets = sorted(self._by_bucket, key=lambda b: (-len(self._by_bucket[b]), b))
        pool: dict[Size, list[Entry]] = {b: [] for b in buckets}
        native = defaultdict(list)
        for entry in self.class_entries:
            native[entry.bucket].append(entry)
        rest = [e for e in self.class_entries if e.bucket not in pool]
        for bucket in buckets:
            pool[bucket].extend(native.get(bucket, []))
        total = sum(len(v) for v in self._by_bucket.values())
        for entry in rest:  # to the bucket furthest below its share of the instance examples
            bucket = max(buckets, key=lambda b: len(self._by_bucket[b]) / total - len(pool[b]) / len(rest))
            pool[bucket].append(entry)
        for i, bucket in enumerate(buckets):
            if not pool[bucket]:
                pool[bucket].append(self.class_entries[i % len(self.class_entries)])
        return pool

    def schedule(self, epoch: int) -> list[tuple[Size, int, np.ndarray]]:
        """Global batches of `epoch`: (bucket, ordinal within the bucket, example indices [B x world])."""
        if self._schedule_cache and self._schedule_cache[0] == epoch:
            return self._schedule_cache[1]
        rng = rng_for(self.seed, epoch, 0, _ORDER)
        batches: list[tuple[Size, int, np.ndarray]] = []
        for bucket in sorted(self._by_bucket):
            order = rng.permutation(np.asarray(self._by_bucket[bucket]))
            size = math.ceil(len(order) / self.global_batch) * self.global_batch
            order = np.resize(order, size)  # pads by cycling this bucket's own examples
            batches += [(bucket, k, order[k * self.global_batch : (k + 1) * self.global_batch]) for k in
                        range(size // self.global_batch)]  # fmt: skip
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._schedule_cache = (epoch, batches)
        return batches

    # --- rows ---------------------------------------------------------------------------------------------
    def _placement(self, entry: Entry, bucket: Size, rng: np.random.Generator) -> Placement:
        return self.bucketer.place(entry.size, bucket, rng if self.data.crop == "random" else None)

    def _instance_row(self, epoch: int, index: int) -> Row:
        entry = self.examples[index]
        flip = self.data.random_flip > 0 and rng_for(self.seed, epoch, index, _FLIP).random() < self.data.random_flip
        placement = self._placement(entry, entry.bucket, rng_for(self.seed, epoch, index, _CROP))
        rng = rng_for(self.seed, epoch, index, _CAPTION) if varies(self.data) else None
        return Row(entry, placement, flip, step_caption(self.data, entry.caption, rng))

    def _class_row(self, epoch: int, bucket: Size, slot: int, instance: Row) -> Row:
        if self.data.prior_mode == "model":
            return Row(instance.entry, instance.placement, instance.flip, self.data.class_prompt or "", True)
        pool = self._class_pool[bucket]
        order = rng_for(self.seed, epoch, bucket[0] * 100_003 + bucket[1], _CLASS_PICK).permutation(len(pool))
        entry = pool[int(order[slot % len(pool)])]
        rng = rng_for(self.seed, epoch, slot, _CLASS_AUGMENT)
        flip = self.data.random_flip > 0 and rng.random() < self.data.random_flip
        return Row(entry, self._placement(entry, bucket, rng), flip, entry.caption, True)

    def rows(self, epoch: int, batch_index: int) -> list[Row]:
        """This rank's rows of global batch `batch_index` (instance half, then class half)."""
        bucket, ordinal, indices = self.schedule(epoch)[batch_index]
        mine = indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = [self._instance_row(epoch, int(i)) for i in mine]
        if self.with_prior_preservation:
            first = ordinal * self.global_batch + self.rank * self.batch_size
            rows += [self._class_row(epoch, bucket, first + j, row) for j, row in enumerate(rows)]
        return rows

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's batches of `epoch`, skipping the first `start` (the resume position)."""
        if not 0 <= start <= self.batches_per_epoch:
            raise DataError(f"start = {start}: must be in [0, batches_per_epoch = {self.batches_per_epoch}]")
        workers = self.data.dataloader_num_workers
        indices = range(start, self.batches_per_epoch)
        if workers == 0 or len(indices) < 2:
            for index in indices:
                rows = self.rows(epoch, index)
                yield self.assembler.complete(self.assembler.cpu_part(rows), rows, self.with_prior_preservation)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(_EpochBatches(self, epoch, start), batch_size=None, num_workers=workers)
        for index, partial in zip(indices, loader):
            yield self.assembler.complete(partial, self.rows(epoch, index), self.with_prior_preservation)

    def collate(self, rows: list[Row]) -> dict[str, Any]:
        """The batch of given rows (all in one bucket)."""
        return self.assembler.complete(self.assembler.cpu_part(rows), rows, self.with_prior_preservation)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getstate__(self) -> dict:
        """DataLoader workers started by spawn get no models (they only decode and read caches)."""
        return {**self.__dict__, "parts": None}

    # --- warm-up ------------------------------------------------------------------------------------------
    def fill_caches(self) -> dict[str, int]:
        """Encode every cacheable latent and caption not on disk yet (this rank's share), with a progress bar."""
        from tqdm.auto import tqdm

        made = {"latents": 0, "text": 0}
        asm = self.assembler
        if asm.latents_cached:
            todo = [(r, k) for r in self._static_rows() if not asm.latent_cache.has(k := asm.latent_key(r))]
            todo = list({k: r for r, k in todo}.items())[self.rank :: self.world_size]
            by_bucket: dict[Size, list[tuple[str, Row]]] = defaultdict(list)
            for key, row in todo:
                by_bucket[row.placement.bucket].append((key, row))
            with tqdm(total=len(todo), desc="Caching latents", unit="img", disable=not todo) as bar:
                for (width, height), group in by_bucket.items():
                    chunk = self._encode_chunk(width * height)
                    for i in range(0, len(group), chunk):
                        part = group[i : i + chunk]
                        self.assembler.encode_rows([r for _, r in part], [k for k, _ in part])
                        bar.update(len(part))
            made["latents"] = len(todo)
        if asm.text_cached:
            captions = sorted({c for c in self._static_captions() if not asm.text_cache.has(asm.text_key(c))})
            captions = captions[self.rank :: self.world_size]
            with tqdm(
                total=len(captions), desc="Caching text embeddings", unit="caption", disable=not captions
            ) as bar:
                for i in range(0, len(captions), 16):
                    self.assembler.fill_text(captions[i : i + 16])
                    bar.update(len(captions[i : i + 16]))
            made["text"] = len(captions)
        return made

    def _encode_chunk(self, pixels: int) -> int:
        """Images per VAE call while filling: a pixel budget, since large CPU batches fall out of the caches
        (measured: 8 images of 128² cost 25% more per image than 4) while GPUs like them big."""
        on_gpu = getattr(self.parts, "device", torch.device("cpu")).type != "cpu"
        budget = 16 * 512 * 512 if on_gpu else 4 * 128 * 128
        return max(1, min(16, budget // pixels))

    def _static_rows(self) -> Iterator[Row]:
        flips = (False, True) if self.data.random_flip > 0 else (False,)
        for entry in self.entries:
            placement = self.bucketer.place(entry.size, entry.bucket)
            for flip in flips:
                yield Row(entry, placement, flip, entry.caption)
        for bucket, pool in self._class_pool.items():
            for entry in pool:
                placement = self.bucketer.place(entry.size, bucket)
                for flip in flips:
                    yield Row(entry, placement, flip, entry.caption, True)

    def _static_captions(self) -> set[str]:
        captions = {e.caption for e in self.entries}
        if self.data.caption_dropout_rate > 0:
            captions.add("")
        if self.with_prior_preservation:
            captions |= {e.caption for e in self.class_entries}
            if self.data.prior_mode == "model":
                captions.add(self.data.class_prompt or "")
        return captions

    # --- evaluation -----------------------------------------------------------------------------------------
    @cached_property
    def holdout(self) -> list[HeldOutExample]:
        out = []
        for entry in self._holdout_entries:
            placement = self.bucketer.place(entry.size, entry.bucket)
            row = Row(entry, placement, False, entry.caption)
            out.append(
                HeldOutExample(entry.name, entry.caption, self.assembler.pixels(row), (entry.size[1], entry.size[0]),
                               (entry.bucket[1], entry.bucket[0]))
            )  # fmt: skip
        return out


class _EpochBatches(torch.utils.data.Dataset):
    """The CPU half of one epoch's batches, for DataLoader workers (they get no models)."""

    def __init__(self, data: TrainingData, epoch: int, start: int):
        self.data, self.epoch, self.start = data, epoch, start
        self.data.schedule(epoch)  # computed once here, inherited by the workers

    def __len__(self) -> int:
        return self.data.batches_per_epoch - self.start

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.data.assembler.cpu_part(self.data.rows(self.epoch, self.start + k))
