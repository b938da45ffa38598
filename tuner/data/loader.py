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
from tuner.data.buckets import Bucketer, Placement, Size, apply
from tuner.data.cache import TensorCache, default_cache_dir, digest, text_identity, vae_identity
from tuner.data.captions import step_caption, varies
from tuner.data.check import Entry
from tuner.data.images import open_rgb, parse_color, to_tensor_array
from tuner.data.report import DataReport
from tuner.errors import DataError

logger = logging.getLogger("tuner.data")

# Purposes of the per-example generators: one stream each, so adding one never shifts the others.
_ORDER, _FLIP, _CROP, _CAPTION, _CLASS, _SAMPLE = range(6)


def rng_for(seed: int, epoch: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, epoch, index, purpose])


@dataclass(frozen=True)
class Row:
    """One example as a batch sees it: which image, where it sits in its bucket, flipped or not, its caption."""

    entry: Entry
    placement: Placement
    flip: bool
    caption: str
    is_prior: bool = False


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
        self.background = parse_color(self.data.background_color)
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

        self.want_latents = "latents" in self.needs
        self.latents_cached = self.want_latents and self.data.cache_latents and self.data.crop != "random"
        self.want_pixels = "pixels" in self.needs or (self.want_latents and not self.latents_cached)
        self.want_text = "text_embeds" in self.needs
        self.text_cached = self.want_text and self.data.cache_text_embeds and not self.data.shuffle_tags
        self.want_ids = "input_ids" in self.needs
        root = default_cache_dir(config)
        self.cache_dir = root
        self.latent_cache = TensorCache(root, "latents") if self.latents_cached else None
        self.text_cache = TensorCache(root, "text") if self.text_cached else None
        self._vae_id = vae_identity(config, parts) if self.latents_cached else None
        self._text_id = text_identity(config, parts) if self.text_cached else None

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
        for entry in rest:  # largest shortfall against the bucket's share of instance examples first
            bucket = max(buckets, key=lambda b: len(self._by_bucket[b]) / total - len(pool[b]) / len(rest or [1]))
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
        order = rng_for(self.seed, epoch, bucket[0] * 100_003 + bucket[1], _CLASS).permutation(len(pool))
        entry = pool[int(order[slot % len(pool)])]
        rng = rng_for(self.seed, epoch, slot, _CLASS + 100)
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

    # --- tensors ------------------------------------------------------------------------------------------
    def pixels(self, row: Row) -> torch.Tensor:
        img = open_rgb(row.entry.item.read_bytes(), self.background, self.data.max_image_pixels)
        return torch.from_numpy(to_tensor_array(apply(img, row.placement, row.flip)))

    def _latent_key(self, row: Row) -> str:
        p = row.placement
        return digest(
            {"image": row.entry.sha256, "model": self._vae_id, "bucket": p.bucket, "resize": p.resized,
             "crop": [p.left, p.top], "flip": row.flip, "mode": self.data.latent_cache_mode}
        )  # fmt: skip

    def _encode_rows(self, rows: list[Row], keys: list[str]) -> list[dict[str, torch.Tensor]]:
        from tuner.conditioning import encode_pixels

        pixels = torch.stack([self.pixels(r) for r in rows])
        with torch.no_grad():
            mean, std = encode_pixels(self.parts, pixels)
        mean, std = mean.detach().cpu(), std.detach().cpu()
        out = []
        for i, key in enumerate(keys):
            if self.data.latent_cache_mode == "sample":
                generator = torch.Generator().manual_seed(int(key[:15], 16))
                noise = torch.randn(mean[i].shape, generator=generator, dtype=torch.float32).to(mean.dtype)
                value = {"latents": mean[i] + std[i] * noise}
            else:
                value = {"latent_mean": mean[i], "latent_std": std[i]}
            self.latent_cache.put(key, value, {"image": rows[i].entry.name})
            out.append(value)
        return out

    def latents(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        keys = [self._latent_key(r) for r in rows]
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key in dict.fromkeys(keys):
            cached = self.latent_cache.get(key)
            if cached is not None:
                found[key] = cached
        missing = [(r, k) for r, k in zip(rows, keys) if k not in found]
        if missing:
            unique = list({k: r for r, k in missing}.items())
            for (key, _), value in zip(unique, self._encode_rows([r for _, r in unique], [k for k, _ in unique])):
                found[key] = value
        names = found[keys[0]].keys()
        return {name: torch.stack([found[k][name] for k in keys]) for name in names}

    def _text_key(self, caption: str) -> str:
        return digest({"caption": caption, "model": self._text_id})

    def _encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        from tuner.conditioning import encode_captions

        with torch.no_grad():
            embeds, pooled = encode_captions(self.parts, captions)
        return embeds.detach().cpu(), None if pooled is None else pooled.detach().cpu()

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if not self.text_cached:
            embeds, pooled = self._encode_captions(captions)
            return {"prompt_embeds": embeds} | ({} if pooled is None else {"pooled_prompt_embeds": pooled})
        found: dict[str, dict[str, torch.Tensor]] = {}
        for caption in dict.fromkeys(captions):
            cached = self.text_cache.get(self._text_key(caption))
            if cached is not None:
                found[caption] = cached
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            found.update(self._fill_text(missing))
        names = found[captions[0]].keys()
        return {name: torch.stack([found[c][name] for c in captions]) for name in names}

    def _fill_text(self, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        embeds, pooled = self._encode_captions(captions)
        out = {}
        for i, caption in enumerate(captions):
            value = {"prompt_embeds": embeds[i]} | ({} if pooled is None else {"pooled_prompt_embeds": pooled[i]})
            self.text_cache.put(self._text_key(caption), value)
            out[caption] = value
        return out

    def collate(self, rows: list[Row]) -> dict[str, Any]:
        captions = [r.caption for r in rows]
        batch: dict[str, Any] = {
            "captions": captions,
            "original_size": torch.tensor([[r.entry.size[1], r.entry.size[0]] for r in rows], dtype=torch.long),
            "crop_top_left": torch.tensor([r.placement.crop_top_left(r.flip) for r in rows], dtype=torch.long),
            "target_size": torch.tensor([[r.placement.bucket[1], r.placement.bucket[0]] for r in rows]),
        }
        if self.want_pixels:
            batch["pixel_values"] = torch.stack([self.pixels(r) for r in rows])
        if self.latents_cached:
            batch.update(self.latents(rows))
        if self.want_text:
            batch.update(self.text(captions))
        if self.want_ids:
            from tuner.conditioning import tokenize

            batch["input_ids"] = tokenize(self.parts, captions)
        if self.with_prior_preservation:
            batch["is_prior"] = torch.tensor([r.is_prior for r in rows], dtype=torch.bool)
        return batch

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's batches of `epoch`, skipping the first `start` (the resume position)."""
        if not 0 <= start <= self.batches_per_epoch:
            raise DataError(f"start = {start}: must be in [0, batches_per_epoch = {self.batches_per_epoch}]")
        for batch_index in range(start, self.batches_per_epoch):
            yield self.collate(self.rows(epoch, batch_index))

    def __len__(self) -> int:
        return self.batches_per_epoch

    # --- warm-up ------------------------------------------------------------------------------------------
    def fill_caches(self) -> dict[str, int]:
        """Encode every cacheable latent and caption not on disk yet (this rank's share), with a progress bar."""
        from tqdm.auto import tqdm

        made = {"latents": 0, "text": 0}
        if self.latents_cached:
            todo = [(r, k) for r in self._static_rows() if not self.latent_cache.has(k := self._latent_key(r))]
            todo = list({k: r for r, k in todo}.items())[self.rank :: self.world_size]
            by_bucket: dict[Size, list[tuple[str, Row]]] = defaultdict(list)
            for key, row in todo:
                by_bucket[row.placement.bucket].append((key, row))
            chunk = max(self.batch_size, 8)
            with tqdm(total=len(todo), desc="Caching latents", unit="img", disable=not todo) as bar:
                for group in by_bucket.values():
                    for i in range(0, len(group), chunk):
                        part = group[i : i + chunk]
                        self._encode_rows([r for _, r in part], [k for k, _ in part])
                        bar.update(len(part))
            made["latents"] = len(todo)
        if self.text_cached:
            captions = sorted({c for c in self._static_captions() if not self.text_cache.has(self._text_key(c))})
            captions = captions[self.rank :: self.world_size]
            with tqdm(
                total=len(captions), desc="Caching text embeddings", unit="caption", disable=not captions
            ) as bar:
                for i in range(0, len(captions), 16):
                    self._fill_text(captions[i : i + 16])
                    bar.update(len(captions[i : i + 16]))
            made["text"] = len(captions)
        return made

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
                HeldOutExample(entry.name, entry.caption, self.pixels(row), (entry.size[1], entry.size[0]),
                               (entry.bucket[1], entry.bucket[0]))
            )  # fmt: skip
        return out
