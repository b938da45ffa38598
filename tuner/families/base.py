"""What a model family is: its parts, how text becomes conditioning, how the denoiser is called, how it samples.

One `Family` object per family. Trainers, losses, the data cache and validation ask it ("tokenize these
captions", "call the denoiser on these latents", "build the stock pipeline") and never compare family names,
so adding a family is adding one module under `tuner/families/` plus its tiny pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tuner.errors import TunerError

if TYPE_CHECKING:
    from tuner.models import Parts
    from tuner.objectives import Objective


BUILTIN_METHODS = frozenset({"lora", "dreambooth", "dreambooth-lora", "textual_inversion", "pivotal", "decoder"})
"""Capabilities of the suite's own trainers (`Trainer.capability`)."""


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline: its component names, transformers class, and whether it can train."""

    component: str
    """Pipeline component name: `text_encoder`, `text_encoder_2`, `text_encoder_3`."""
    model_class: str
    """transformers class it loads as (`CLIPTextModel`, `CLIPTextModelWithProjection`, `T5EncoderModel`)."""
    tokenizer: str
    """Pipeline component name of its tokenizer."""
    label: str
    """What users call it (`CLIP-L`, `CLIP-G`, `T5`); ComfyUI's embedding key is its lower-case form."""
    adaptable: bool = True
    """Whether adapters and new tokens go into it (T5 stays frozen, as in every peer tool)."""
    max_length: int | None = None
    """Token window; None: the tokenizer's `model_max_length` (CLIP: 77)."""

    @property
    def takes_new_tokens(self) -> bool:
        """Whether textual inversion puts new tokens here by default: the CLIP encoders (T5 only when asked)."""
        return self.model_class.startswith("CLIP")

    @property
    def embedding_key(self) -> str:
        """Key of this encoder's vectors in a multi-encoder embedding file (ComfyUI's `embedding_key`)."""
        return {"CLIP-L": "clip_l", "CLIP-G": "clip_g", "T5": "t5xxl"}.get(self.label, self.label.lower())


@dataclass(frozen=True)
class Family:
    """The family-specific half of training and sampling. Subclasses implement the four hooks at the bottom."""

    name: str
    pipeline_class: str
    denoiser_component: str
    """Pipeline component (and LoRA key prefix) of the denoiser: `unet` or `transformer`."""
    denoiser_class: str
    encoders: tuple[TextEncoder, ...]
    noise_scheduler_class: str
    """diffusers scheduler class that defines the training noise (DDPM betas, or flow-matching shift)."""
    kohya_version: str
    modelspec_architecture: str
    default_resolution: int
    methods: frozenset[str]
    """Trainer capabilities this family supports (`lora`, `dreambooth-lora`, `dreambooth`, ...)."""
    latent_channels: int = 4
    uses_time_ids: bool = False
    pipeline_extras: dict[str, Any] = field(default_factory=dict)
    """Fixed constructor arguments of the stock pipeline (SD1/SD2: no safety checker)."""
    modelspec_implementation: str = "diffusers"
    """`modelspec.implementation`: the reference code whose module names the kohya file follows."""
    modelspec_epsilon_architecture: str | None = None
    """Architecture id of the epsilon-prediction variant, where it differs (SD2-512)."""
    kohya_v_suffix: bool = False
    """`ss_base_model_version` gains `_v` for v-prediction models (SD1/SD2, as kohya writes it)."""
    kohya_network_module: str = "networks.lora"
    """`ss_network_module` of a plain LoRA of this family (kohya's module that trains it)."""
    lora_file_form: str | None = "kohya"
    """The second LoRA file A1111/ComfyUI/Forge load: `kohya` (lora_unet_ + diffusers names; SGM names for
    SDXL), `kohya-flux`
    (lora_unet_ + BFL names, fused qkv) or None where the diffusers file is what ComfyUI loads (SD3)."""
    lora_presets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Named LoRA target sets of the denoiser, as module-name suffixes (peft's `target_modules`)."""
    not_linear_targets: tuple[str, ...] = ()
    """Name fragments `all-linear` leaves out (norms, embedders, the final projection)."""
    block_lists: tuple[str, ...] = ()
    """The denoiser's block lists in order (`transformer_blocks`, ...): `dreambooth.train_blocks` numbers their
    blocks one after another."""

    @property
    def text_encoders(self) -> int:
        """How many text encoders the pipeline has (kohya names them `lora_te` or `lora_te1`, `lora_te2`...)."""
        return len(self.encoders)

    @property
    def objective(self) -> Objective:
        raise NotImplementedError

    def check_method(self, capability: str, model: str) -> None:
        """Refuse, before any weight loads, a built-in method this family cannot train, naming what it can.
        (A method registered from outside the suite is the author's to match to a family.)"""
        if capability in ("textual_inversion", "pivotal") and not any(e.takes_new_tokens for e in self.encoders):
            raise TunerError(
                f"model {model!r} is {self.name} ({self.pipeline_class}), whose text encoders "
                f"({', '.join(e.label for e in self.encoders)}) have no CLIP token embedding to add a word to; "
                f"method {capability!r} needs one. Use lora or dreambooth-lora with a trigger word instead"
            )
        if capability in BUILTIN_METHODS and capability not in self.methods:
            raise TunerError(
                f"model {model!r} is {self.name} ({self.pipeline_class}); method {capability!r} is not supported on "
                f"this family yet. Supported here: {', '.join(sorted(self.methods))}"
            )

    def lora_targets(self, preset: str | list[str], model: torch.nn.Module) -> list[str]:
        """peft `target_modules` of the denoiser for a preset name (or a user's list, as given)."""
        if not isinstance(preset, str):
            return list(preset)
        if preset == "all-linear":
            return [
                name
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and not any(part in name for part in self.not_linear_targets)
            ]
        if preset not in self.lora_presets:
            raise TunerError(
                f"lora.unet_target_modules = {preset!r}: not a target set of {self.name}; allowed here: "
                f"{', '.join([*self.lora_presets, 'all-linear'])} or a list of module names"
            )
        return list(self.lora_presets[preset])

    def token_lengths(self, tokenizers: list[Any]) -> list[int]:
        """Padded length of each encoder's input ids."""
        return [spec.max_length or tok.model_max_length for spec, tok in zip(self.encoders, tokenizers)]

    def tokenize(self, parts: Parts, captions: list[str]) -> list[torch.Tensor]:
        """One padded `input_ids` tensor per tokenizer, as the stock pipeline pads them."""
        return [
            tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            for tok, length in zip(parts.tokenizers, self.token_lengths(parts.tokenizers))
        ]

    def sampling_kwargs(self, tokenizers: list[Any]) -> dict[str, Any]:
        """Extra keyword arguments of the stock pipeline's `__call__` that must match training (T5 length)."""
        return {}

    def pipeline_components(self, parts: Parts) -> dict[str, Any]:
        """Constructor arguments of the stock pipeline, from the current (possibly trained) parts."""
        components: dict[str, Any] = {
            self.denoiser_component: parts.unwrapped(parts.denoiser),
            "vae": parts.unwrapped(parts.vae),
            "scheduler": parts.sample_scheduler or parts.noise_scheduler,
        }
        for spec, encoder, tokenizer in zip(self.encoders, parts.text_encoders, parts.tokenizers):
            components[spec.component] = parts.unwrapped(encoder)
            components[spec.tokenizer] = tokenizer
        return {**components, **self.pipeline_extras}

    # --- the family-specific hooks ----------------------------------------------------------------------
    def encode(self, parts: Parts, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, pooled_prompt_embeds) exactly as the stock pipeline computes them (what gets cached).
        A family without a pooled vector may carry another per-prompt tensor in the second slot (Z-Image: the
        token mask that cuts each prompt back to its own tokens)."""
        raise NotImplementedError

    def conditioning(self, parts: Parts, embeds: torch.Tensor, pooled: torch.Tensor | None, batch: dict) -> dict:
        """Everything besides the noisy latents and timesteps that the denoiser takes, for this batch."""
        raise NotImplementedError

    def predict(self, parts: Parts, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        """The denoiser's output in the latents' own layout (B, C, H, W), in the objective's target space."""
        raise NotImplementedError
