"""Turn a batch's rows into tensors: pixels, cached or freshly encoded latents and text embeddings, input ids.

Split in two so DataLoader workers can help: `cpu_part` (decode, crop, read cache files) needs no model and
runs in a worker; `complete` (encode whatever the cache lacked, tokenize) runs in the main process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuner.config import RunConfig
from tuner.data.buckets import Placement, apply
from tuner.data.cache import TensorCache, default_cache_dir, digest, text_identity, vae_identity
from tuner.data.check import Entry
from tuner.data.images import ImageProblem, open_rgb, parse_color, to_tensor_array
from tuner.errors import DataError


@dataclass(frozen=True)
class Row:
    """One example as a batch sees it: which image, where it sits in its bucket, flipped or not, its caption."""

    entry: Entry
    placement: Placement
    flip: bool
    caption: str
    is_prior: bool = False


class Assembler:
    """Knows what a batch must carry (from `needs` and the config) and where each tensor comes from."""

    def __init__(self, config: RunConfig, parts, needs: frozenset[str]):
        data = self.data = config.data
        self.parts = parts
        self.background = parse_color(data.background_color)
        self.want_latents = "latents" in needs
        self.latents_cached = self.want_latents and data.cache_latents and data.crop != "random"
        self.want_pixels = "pixels" in needs or (self.want_latents and not self.latents_cached)
        self.want_text = "text_embeds" in needs
        self.text_cached = self.want_text and data.cache_text_embeds and not data.shuffle_tags
        self.want_ids = "input_ids" in needs
        self.cache_dir = default_cache_dir(config)
        self.latent_cache = TensorCache(self.cache_dir, "latents") if self.latents_cached else None
        self.text_cache = TensorCache(self.cache_dir, "text") if self.text_cached else None
        self.vae_id = vae_identity(config, parts) if self.latents_cached else None
        self.text_id = text_identity(config, parts) if self.text_cached else None

    def __getstate__(self) -> dict:
        """Workers get everything but the models (they never encode)."""
        return {**self.__dict__, "parts": None}

    # --- pixels and latents ---------------------------------------------------------------------------------
    def pixels(self, row: Row) -> torch.Tensor:
        try:
            raw = row.entry.item.read_bytes()
            img = open_rgb(raw, self.background, self.data.max_image_pixels)
        except (OSError, ImageProblem) as exc:
            raise DataError(
                f"{row.entry.name}: changed or removed since the data check ({exc}); restore it, or restart the run "
                "so the check runs again"
            ) from None
        return torch.from_numpy(to_tensor_array(apply(img, row.placement, row.flip)))

    def latent_key(self, row: Row) -> str:
        p = row.placement
        return digest(
            {"image": row.entry.sha256, "model": self.vae_id, "bucket": p.bucket, "resize": p.resized,
             "crop": [p.left, p.top], "flip": row.flip, "mode": self.data.latent_cache_mode}
        )  # fmt: skip

    def encode_rows(self, rows: list[Row], keys: list[str]) -> list[dict[str, torch.Tensor]]:
        """Encode rows with the VAE (no grad) and store each result under its key."""
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
            elif self.data.latent_cache_mode == "mean":
                value = {"latents": mean[i]}
            else:
                value = {"latent_mean": mean[i], "latent_std": std[i]}
            self.latent_cache.put(key, value, {"image": rows[i].entry.name})
            out.append(value)
        return out

    def latents(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """Stacked cached latents of `rows`; misses are encoded (once per distinct key) and stored."""
        return self._stack_latents(rows, [self.latent_cache.get(self.latent_key(r)) for r in rows])

    def _stack_latents(self, rows: list[Row], values: list[dict | None]) -> dict[str, torch.Tensor]:
        keys = [self.latent_key(r) for r in rows]
        found = {k: v for k, v in zip(keys, values) if v is not None}
        missing = {k: r for k, r in zip(keys, rows) if k not in found}
        if missing:
            found.update(zip(missing, self.encode_rows(list(missing.values()), list(missing))))
        names = found[keys[0]].keys()
        return {name: torch.stack([found[k][name] for k in keys]) for name in names}

    # --- text -----------------------------------------------------------------------------------------------
    def text_key(self, caption: str) -> str:
        return digest({"caption": caption, "model": self.text_id})

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from tuner.conditioning import encode_captions

        with torch.no_grad():
            embeds, pooled = encode_captions(self.parts, captions)
        out = {"prompt_embeds": embeds.detach().cpu()}
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled.detach().cpu()
        return out

    def fill_text(self, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        encoded = self.encode_captions(captions)
        out = {}
        for i, caption in enumerate(captions):
            out[caption] = {name: value[i] for name, value in encoded.items()}
            self.text_cache.put(self.text_key(caption), out[caption])
        return out

    def text(self, captions: list[str], cached: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
        if not self.text_cached:
            return self.encode_captions(captions)
        if cached is None:
            cached = {c: self.text_cache.get(self.text_key(c)) for c in dict.fromkeys(captions)}
        found = {c: v for c, v in cached.items() if v is not None}
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            found.update(self.fill_text(missing))
        names = found[captions[0]].keys()
        return {name: torch.stack([found[c][name] for c in captions]) for name in names}

    # --- batches --------------------------------------------------------------------------------------------
    def cpu_part(self, rows: list[Row]) -> dict[str, Any]:
        """Everything that needs no model: captions, sizes, pixels, cache reads (misses left as None)."""
        batch: dict[str, Any] = {
            "captions": [r.caption for r in rows],
            "original_size": torch.tensor([[r.entry.size[1], r.entry.size[0]] for r in rows], dtype=torch.long),
            "crop_top_left": torch.tensor([r.placement.crop_top_left(r.flip) for r in rows], dtype=torch.long),
            "target_size": torch.tensor([[r.placement.bucket[1], r.placement.bucket[0]] for r in rows]),
        }
        if self.want_pixels:
            batch["pixel_values"] = torch.stack([self.pixels(r) for r in rows])
        if self.latents_cached:
            batch["_latents"] = [self.latent_cache.get(self.latent_key(r)) for r in rows]
        if self.text_cached:
            batch["_text"] = {c: self.text_cache.get(self.text_key(c)) for c in dict.fromkeys(batch["captions"])}
        return batch

    def complete(self, batch: dict[str, Any], rows: list[Row], with_prior: bool) -> dict[str, Any]:
        """Fill in what the cache lacked (encoders, no grad) and the tokenized captions."""
        if self.latents_cached:
            batch.update(self._stack_latents(rows, batch.pop("_latents")))
        if self.want_text:
            batch.update(self.text(batch["captions"], batch.pop("_text", None)))
        if self.want_ids:
            from tuner.conditioning import tokenize

            batch["input_ids"] = tokenize(self.parts, batch["captions"])
        if with_prior:
            batch["is_prior"] = torch.tensor([r.is_prior for r in rows], dtype=torch.bool)
        return batch
