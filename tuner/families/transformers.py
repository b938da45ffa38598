"""The flow-matching transformer families: SD3 / SD3.5 (MMDiT, three text encoders) and FLUX.1 (packed latents).

Both train with rectified flow (`tuner.objectives.RectifiedFlow`) and sample through their stock diffusers
pipelines. T5 stays frozen and its sequence length is the same in training and sampling
(`sampling_kwargs`), since Flux attends to T5's padding tokens too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tuner.families.base import BUILTIN_METHODS, Family, TextEncoder
from tuner.objectives import RectifiedFlow

if TYPE_CHECKING:
    from tuner.models import Parts

_FLOW = RectifiedFlow(patch_size=2)
_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")  # fmt: skip
_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
LORA_PRESETS = {"attn": _ATTN, "attn+ff": _ATTN + _FF}
# Left out of `all-linear`: norms and modulation, the patch / text / time embedders, the final layer.
NOT_LINEAR = ("norm", "embedder", "time_text_embed", "pos_embed", "context_embedder", "x_embedder")


@dataclass(frozen=True)
class TransformerFamily(Family):
    """A DiT denoiser trained by rectified flow; `t5_length` is the T5 window of the reference pipeline."""

    t5_length: int = 512

    @property
    def objective(self) -> RectifiedFlow:
        return _FLOW

    def token_lengths(self, tokenizers: list[Any]) -> list[int]:
        """CLIP: 77; T5: the family's window, capped by what the tokenizer allows (tiny models: less)."""
        return [
            min(self.t5_length, tok.model_max_length) if spec.label == "T5" else (spec.max_length or 77)
            for spec, tok in zip(self.encoders, tokenizers)
        ]

    def sampling_kwargs(self, tokenizers: list[Any]) -> dict[str, Any]:
        return {"max_sequence_length": self.token_lengths(tokenizers)[-1]}


@dataclass(frozen=True)
class SD3Family(TransformerFamily):
    """`SD3Transformer2DModel`: CLIP-L and CLIP-G penultimate states, zero-padded to T5's width and followed by
    T5's sequence; pooled = both CLIP projections side by side."""

    def encode(self, parts: Parts, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        clip_hidden, pooled = [], []
        for encoder, ids in zip(parts.text_encoders[:2], input_ids[:2]):
            out = encoder(ids.to(parts.device), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5 = parts.text_encoders[2](input_ids[2].to(parts.device))[0]
        clip = torch.cat(clip_hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def conditioning(self, parts: Parts, embeds: torch.Tensor, pooled: torch.Tensor | None, batch: dict) -> dict:
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled.to(parts.device)}

    def predict(self, parts, model, noisy, timesteps, cond):
        dtype = parts.compute_dtype(model)
        cond = {k: v.to(dtype) for k, v in cond.items()}
        return model(hidden_states=noisy.to(dtype), timestep=timesteps, return_dict=False, **cond)[0]


@dataclass(frozen=True)
class FluxFamily(TransformerFamily):
    """`FluxTransformer2DModel`: latents packed 2x2 into tokens with position ids, CLIP-L pooled + T5 sequence,
    timesteps on [0, 1], and FLUX.1-dev's embedded guidance (`train.guidance_scale`; schnell has none)."""

    def lora_targets(self, preset: str | list[str], model: torch.nn.Module) -> list[str]:
        """As the base, and `attn+ff` also takes the single-stream blocks' MLP in and fused output."""
        targets = super().lora_targets(preset, model)
        if preset == "attn+ff":
            targets += [n for n, _ in model.named_modules() if n.startswith("single_transformer_blocks.")
                        and n.endswith((".proj_mlp", ".proj_out"))]  # fmt: skip
        return targets

    def encode(self, parts: Parts, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = parts.text_encoders[0](input_ids[0].to(parts.device), output_hidden_states=False).pooler_output
        t5 = parts.text_encoders[1](input_ids[1].to(parts.device), output_hidden_states=False)[0]
        return t5, pooled

    def conditioning(self, parts: Parts, embeds: torch.Tensor, pooled: torch.Tensor | None, batch: dict) -> dict:
        cond = {
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled.to(parts.device),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=parts.device),
        }
        if getattr(parts.unwrapped(parts.denoiser).config, "guidance_embeds", False):
            cond["guidance"] = torch.full((embeds.shape[0],), float(parts.guidance_scale), device=parts.device)
        return cond

    def predict(self, parts, model, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        dtype = parts.compute_dtype(model)
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        cond = {k: v.to(dtype) for k, v in cond.items()}
        out = model(hidden_states=packed, timestep=timesteps.to(dtype) / 1000, img_ids=img_ids, return_dict=False,
                    **cond)[0]  # fmt: skip
        scale = parts.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)


_T5 = {"model_class": "T5EncoderModel", "label": "T5", "adaptable": False}
_TRANSFORMER: dict[str, Any] = {
    "denoiser_component": "transformer",
    "noise_scheduler_class": "FlowMatchEulerDiscreteScheduler",
    "default_resolution": 1024,
    "latent_channels": 16,
    "methods": BUILTIN_METHODS,
    "lora_presets": LORA_PRESETS,
    "not_linear_targets": NOT_LINEAR,
}

SD3 = SD3Family(
    "sd3",
    "StableDiffusion3Pipeline",
    denoiser_class="SD3Transformer2DModel",
    encoders=(
        TextEncoder("text_encoder", "CLIPTextModelWithProjection", "tokenizer", "CLIP-L"),
        TextEncoder("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2", "CLIP-G"),
        TextEncoder("text_encoder_3", tokenizer="tokenizer_3", **_T5),
    ),
    t5_length=256,
    block_lists=("transformer_blocks",),
    kohya_version="5-large",
    kohya_network_module="networks.lora_sd3",
    lora_file_form=None,
    modelspec_architecture="stable-diffusion-3-5-large",
    **_TRANSFORMER,
)
FLUX = FluxFamily(
    "flux",
    "FluxPipeline",
    denoiser_class="FluxTransformer2DModel",
    encoders=(
        TextEncoder("text_encoder", "CLIPTextModel", "tokenizer", "CLIP-L"),
        TextEncoder("text_encoder_2", tokenizer="tokenizer_2", **_T5),
    ),
    t5_length=512,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    kohya_version="flux1",
    kohya_network_module="networks.lora_flux",
    lora_file_form="kohya-flux",
    modelspec_architecture="flux-1-dev",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    **_TRANSFORMER,
)


def variant_of(family: Family, denoiser_config: dict[str, Any]) -> Family:
    """The checkpoint's variant, for metadata and defaults: FLUX.1-schnell (no guidance embedding, T5 256),
    SD3-Medium (no qk-norm), SD3.5-Medium (qk-norm + dual attention) or SD3.5-Large."""
    if family is FLUX and denoiser_config and not denoiser_config.get("guidance_embeds", True):
        return replace(FLUX, modelspec_architecture="flux-1-schnell", t5_length=256)
    if family is SD3 and denoiser_config:
        if not denoiser_config.get("qk_norm"):
            return replace(SD3, modelspec_architecture="stable-diffusion-3-medium", kohya_version="medium")
        if denoiser_config.get("dual_attention_layers"):
            return replace(SD3, modelspec_architecture="stable-diffusion-3-5-medium", kohya_version="5-medium")
    return family
