"""Z-Image (Tongyi-MAI, 2025): a single-stream DiT conditioned on a Qwen3 LLM's hidden states.

What differs from SD3 / FLUX.1, as diffusers' `ZImagePipeline` does it:
- text: each prompt is wrapped in Qwen3's chat template, tokenized to a fixed window, and the encoder's
  penultimate hidden states are kept for the real tokens only (a variable-length sequence per prompt). The
  cache stores the padded states with their token mask in the second slot (`pooled`), which Z-Image has no
  use for otherwise; `conditioning` cuts each prompt back to its own tokens.
- the transformer takes lists (one `(C, 1, H, W)` latent and one caption sequence per example), is told
  t = 1 - sigma, and predicts x - noise: `predict` negates it into rectified flow's noise - x.
- the sampling schedule is a static shift (Z-Image-Turbo: 3.0) read from the scheduler config, so training
  draws sigmas with the same shift (`tuner.flow.training_sigmas`).
- LoRA: the transformer only (diffusers' `ZImageLoraLoaderMixin` has no text-encoder LoRA, and no peer tool
  trains one); the second file is the `diffusion_model.` form ComfyUI maps onto its fused qkv
  (`tuner.export.lora_comfy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuner.families.base import TextEncoder
from tuner.families.transformers import TransformerFamily

if TYPE_CHECKING:
    from tuner.models import Parts

_ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
_FF = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# The suffixes match the main `layers` and both refiners (noise and context), as ComfyUI maps all three.
LORA_PRESETS = {"attn": _ATTN, "attn+ff": _ATTN + _FF}
# Left out of `all-linear`: modulation, the patch / caption / time embedders and the final layer.
NOT_LINEAR = ("norm", "embedder", "adaLN_modulation", "final_layer")
# The diffusers mixin loads transformer LoRAs only; the Qwen3 encoder takes no new token (no CLIP embedding).
METHODS = frozenset({"lora", "dreambooth-lora"})
# Qwen3's chat wrapping, as the pipeline asks for it (`enable_thinking=True`: no empty think block).
CHAT = {"tokenize": False, "add_generation_prompt": True, "enable_thinking": True}


@dataclass(frozen=True)
class ZImageFamily(TransformerFamily):
    """`ZImageTransformer2DModel` with one Qwen3 encoder; `t5_length` is the pipeline's `max_sequence_length`."""

    def token_lengths(self, tokenizers: list[Any]) -> list[int]:
        return [min(self.t5_length, tok.model_max_length) for tok in tokenizers]

    def tokenize(self, parts: Parts, captions: list[str]) -> list[torch.Tensor]:
        """Each caption inside the chat template, padded to the window, as the pipeline tokenizes it."""
        tokenizer = parts.tokenizers[0]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], **CHAT) for c in captions]
        length = self.token_lengths(parts.tokenizers)[0]
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return [ids.input_ids]

    def encode(self, parts: Parts, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states of every position, token mask): the pipeline keeps the masked rows."""
        ids = input_ids[0].to(parts.device)
        mask = ids != parts.tokenizers[0].pad_token_id
        states = parts.text_encoders[0](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return states[-2], mask

    def conditioning(self, parts: Parts, embeds: torch.Tensor, pooled: torch.Tensor | None, batch: dict) -> dict:
        mask = pooled.to(embeds.device).bool()
        return {"cap_feats": [row[keep] for row, keep in zip(embeds, mask)]}

    def predict(self, parts, model, noisy, timesteps, cond):
        dtype = parts.compute_dtype(model)  # a quantized (fp8 / int8 / nf4) base runs in the run's weight dtype
        latents = list(noisy.to(dtype).unsqueeze(2).unbind(0))  # one (C, frames=1, H, W) tensor per example
        captions = [c.to(dtype) for c in cond["cap_feats"]]
        t = 1 - timesteps.to(dtype) / 1000  # Z-Image counts time from noise (0) to image (1)
        out = model(latents, t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


ZIMAGE = ZImageFamily(
    "zimage",
    "ZImagePipeline",
    denoiser_component="transformer",
    denoiser_class="ZImageTransformer2DModel",
    encoders=(TextEncoder("text_encoder", "Qwen3Model", "tokenizer", "Qwen3", adaptable=False),),
    noise_scheduler_class="FlowMatchEulerDiscreteScheduler",
    default_resolution=1024,
    latent_channels=16,
    methods=METHODS,
    t5_length=512,
    kohya_version="zimage",
    kohya_network_module="networks.lora_zimage",
    lora_file_form="comfyui",
    lora_presets=LORA_PRESETS,
    not_linear_targets=NOT_LINEAR,
    modelspec_architecture="Z-Image",
    modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image",
)
