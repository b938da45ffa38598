"""Turn a batch into UNet inputs: latents, prompt embeddings, pooled embeddings and SDXL time ids.

The data cache and the trainers call the same functions, so a cached tensor and a freshly computed one
are the same tensor. Family differences live here (via `Family`), not in trainers.
"""

from __future__ import annotations

from typing import Any

import torch

from tuner.models import Parts


def tokenize(parts: Parts, captions: list[str]) -> list[torch.Tensor]:
    """One padded `input_ids` tensor per tokenizer."""
    return [
        tok(
            captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tok in parts.tokenizers
    ]


def encode_tokens(parts: Parts, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds, pooled_prompt_embeds) exactly as the family's stock pipeline computes them.

    SD1/SD2 condition on the last hidden state; SDXL on the penultimate hidden states of both encoders,
    concatenated, plus the second encoder's projected pooled output.
    """
    encoders = parts.text_encoders
    if parts.family.text_encoders == 1:
        return encoders[0](input_ids[0].to(parts.device))[0], None
    hidden, pooled = [], None
    for encoder, ids in zip(encoders, input_ids):
        out = encoder(ids.to(parts.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


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


def _pixel_size(parts: Parts, batch: dict[str, Any]) -> tuple[int, int]:
    latent = parts.vae_scale_factor
    for key, factor in (("pixel_values", 1), ("latent_mean", latent), ("latents", latent)):
        if key in batch:
            h, w = batch[key].shape[-2:]
            return h * factor, w * factor
    return parts.family.default_resolution, parts.family.default_resolution


def time_ids(parts: Parts, batch: dict[str, Any], batch_size: int) -> torch.Tensor:
    """SDXL micro-conditioning (B, 6): original size, crop top-left and target size as (h, w) pairs.

    The data pipeline records the first two per image; without them the image is taken as uncropped.
    """

    def pairs(key: str, default: tuple[int, int]) -> torch.Tensor:
        value = batch.get(key)
        if value is None:
            return torch.tensor([default] * batch_size, dtype=torch.float32)
        return torch.as_tensor(value, dtype=torch.float32).reshape(batch_size, 2)

    size = _pixel_size(parts, batch)
    return torch.cat([pairs("original_size", size), pairs("crop_top_left", (0, 0)), pairs("target_size", size)], 1)


def batch_conditioning(parts: Parts, batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `unet(noisy, t, **kwargs)`: cached embeddings when present, else the encoders."""
    if "prompt_embeds" in batch:
        embeds = batch["prompt_embeds"].to(parts.device)
        pooled = batch.get("pooled_prompt_embeds")
    else:
        embeds, pooled = encode_tokens(parts, batch["input_ids"])
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
    if parts.family.uses_time_ids:
        ids = time_ids(parts, batch, embeds.shape[0]).to(parts.device, dtype=embeds.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(parts.device), "time_ids": ids}
    return kwargs
