"""Model families: one object each, holding everything that differs between SD1/SD2/SDXL, SD3, FLUX.1 and
Z-Image."""

from typing import Any

from tuner.families.base import Family, TextEncoder
from tuner.families.transformers import FLUX, SD3, variant_of
from tuner.families.unet import SD1, SD2, SDXL
from tuner.families.zimage import ZIMAGE

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX, ZIMAGE)}


def family_of_pipeline(pipe: Any) -> Family | None:
    """The family of a loaded stock pipeline, by its class (SD1 and SD2 share one and behave alike here)."""
    family = next((f for f in FAMILIES.values() if f.pipeline_class == type(pipe).__name__), None)
    denoiser = getattr(pipe, family.denoiser_component, None) if family else None
    return variant_of(family, dict(denoiser.config)) if denoiser is not None else family


def call_kwargs(pipe: Any) -> dict[str, Any]:
    """Arguments a pipeline call needs to sample as the model trained (T5 sequence length), for any pipeline."""
    family = family_of_pipeline(pipe)
    if family is None:
        return {}
    return family.sampling_kwargs([getattr(pipe, spec.tokenizer) for spec in family.encoders])


__all__ = ["FAMILIES", "Family", "TextEncoder", "call_kwargs", "family_of_pipeline", "variant_of"]
