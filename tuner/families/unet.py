"""The UNet families of 2022-23: SD1.x and SD2.x (one CLIP encoder) and SDXL (two, pooled embeds, time ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuner.families.base import BUILTIN_METHODS, Family, TextEncoder
from tuner.objectives import DenoisingDiffusion

if TYPE_CHECKING:
    from tuner.models import Parts

ALL_METHODS = BUILTIN_METHODS
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
_DDPM = DenoisingDiffusion()


@dataclass(frozen=True)
class UNetFamily(Family):
    """A `UNet2DConditionModel` denoiser with DDPM training noise (epsilon or v-prediction)."""

    @property
    def objective(self) -> DenoisingDiffusion:
        return _DDPM

    def encode(self, parts: Parts, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SD1/SD2 condition on the last hidden state; SDXL on the penultimate hidden states of both encoders,
        concatenated, plus the second encoder's projected pooled output."""
        encoders = parts.text_encoders
        if len(encoders) == 1:
            return encoders[0](input_ids[0].to(parts.device))[0], None
        hidden, pooled = [], None
        for encoder, ids in zip(encoders, input_ids):
            out = encoder(ids.to(parts.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    def conditioning(self, parts: Parts, embeds: torch.Tensor, pooled: torch.Tensor | None, batch: dict) -> dict:
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if self.uses_time_ids:
            ids = time_ids(parts, batch, embeds.shape[0]).to(parts.device, dtype=embeds.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(parts.device), "time_ids": ids}
        return kwargs

    def predict(self, parts, model, noisy, timesteps, cond):
        dtype = parts.compute_dtype(model)
        return model(noisy.to(dtype), timesteps, **cond).sample


def pixel_size(parts: Parts, batch: dict[str, Any]) -> tuple[int, int]:
    """(height, width) in pixels of a batch, from its pixels or latents; the family default without either."""
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

    size = pixel_size(parts, batch)
    return torch.cat([pairs("original_size", size), pairs("crop_top_left", (0, 0)), pairs("target_size", size)], 1)


_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2")
_RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
LORA_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": _ATTN,
    "attn+ff": _ATTN + _FF,
    # kohya's default LoRA targets: every linear / 1x1 conv of the transformer blocks.
    "transformer": _ATTN + _FF + ("proj_in", "proj_out"),
    # LoCon: the transformer targets plus the resnet, down- and upsampler convolutions.
    "locon": _ATTN + _FF + ("proj_in", "proj_out") + _RESNET,
}
_CLIP_L = TextEncoder("text_encoder", "CLIPTextModel", "tokenizer", "CLIP-L")
_UNET: dict[str, Any] = {
    "denoiser_component": "unet",
    "denoiser_class": "UNet2DConditionModel",
    "noise_scheduler_class": "DDPMScheduler",
    "methods": ALL_METHODS,
    "lora_presets": LORA_PRESETS,
    "not_linear_targets": ("time_embedding", "add_embedding"),
}

SD1 = UNetFamily(
    "sd1",
    "StableDiffusionPipeline",
    encoders=(_CLIP_L,),
    kohya_version="sd_v1",
    kohya_v_suffix=True,
    modelspec_architecture="stable-diffusion-v1",
    default_resolution=512,
    pipeline_extras=NO_SAFETY_CHECKER,
    **_UNET,
)
SD2 = UNetFamily(
    "sd2",
    "StableDiffusionPipeline",
    encoders=(TextEncoder("text_encoder", "CLIPTextModel", "tokenizer", "OpenCLIP-H"),),
    kohya_version="sd_v2",
    kohya_v_suffix=True,
    modelspec_architecture="stable-diffusion-v2-768-v",
    modelspec_epsilon_architecture="stable-diffusion-v2-512",
    default_resolution=768,
    pipeline_extras=NO_SAFETY_CHECKER,
    **_UNET,
)
SDXL = UNetFamily(
    "sdxl",
    "StableDiffusionXLPipeline",
    encoders=(_CLIP_L, TextEncoder("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2", "CLIP-G")),
    kohya_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    default_resolution=1024,
    uses_time_ids=True,
    **_UNET,
)
