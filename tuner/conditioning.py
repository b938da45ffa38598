"""Turn a batch into denoiser inputs: scaled latents, and text embeddings made into the family's conditioning.

The data cache and the trainers call the same functions, so a cached tensor and a freshly computed one
are the same tensor. Family differences live in `parts.family` (`tuner.families`), not here or in trainers.
"""

from __future__ import annotations

from typing import Any

import torch

from tuner.models import Parts


def tokenize(parts: Parts, captions: list[str]) -> list[torch.Tensor]:
    """One padded `input_ids` tensor per tokenizer."""
    return parts.family.tokenize(parts, captions)


def encode_tokens(parts: Parts, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds, pooled_prompt_embeds) exactly as the family's stock pipeline computes them."""
    return parts.family.encode(parts, input_ids)


def encode_captions(parts: Parts, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    return encode_tokens(parts, tokenize(parts, captions))


def encode_pixels(parts: Parts, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for pixels in [-1, 1], before scaling."""
    vae = parts.unwrapped(parts.vae)
    dist = vae.encode(pixels.to(parts.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


def scale_latents(parts: Parts, latents: torch.Tensor) -> torch.Tensor:
    config = parts.unwrapped(parts.vae).config
    shift = getattr(config, "shift_factor", None) or 0.0
    return (latents - shift) * config.scaling_factor


def unscale_latents(parts: Parts, latents: torch.Tensor) -> torch.Tensor:
    config = parts.unwrapped(parts.vae).config
    shift = getattr(config, "shift_factor", None) or 0.0
    return latents / config.scaling_factor + shift


def batch_latents(
    parts: Parts, batch: dict[str, Any], generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Scaled latents of a batch: from the cache (`latent_mean`/`latent_std`, or `latents`) or the VAE.

    A distribution (cached or encoded now) is sampled, or with `sample=False` reduced to its mean, so random-crop
    batches the cache skips get the same targets as cached ones.
    """
    if "latents" in batch:
        latents = batch["latents"].to(parts.device)
    else:
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(parts.device), batch["latent_std"].to(parts.device)
        else:
            with torch.no_grad():
                mean, std = encode_pixels(parts, batch["pixel_values"])
        latents = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device="cpu", dtype=torch.float32).to(mean.device)
            latents = mean + std * noise.to(mean.dtype)
    return scale_latents(parts, latents.float())


def batch_conditioning(parts: Parts, batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the family's `predict`: cached embeddings when present, else the encoders."""
    if "prompt_embeds" in batch:
        embeds = batch["prompt_embeds"].to(parts.device)
        pooled = batch.get("pooled_prompt_embeds")
    else:
        embeds, pooled = encode_tokens(parts, batch["input_ids"])
    return parts.family.conditioning(parts, embeds, pooled, batch)
