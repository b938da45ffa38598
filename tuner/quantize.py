"""A quantized frozen base (`model.quantize`): what may be quantized, how it loads, and what it forbids.

Only a base that stays frozen may be stored in fewer bits: the denoiser (and T5) of a run that trains adapters
on top of it (LoRA, DreamBooth-LoRA, pivotal tuning), which stay fp32 and see the base only through its outputs.
`int8` and `nf4` load through diffusers' / transformers' `BitsAndBytesConfig` (bitsandbytes' quantized linear
layers; diffusers quantizes them on a CUDA device only). `fp8` stores the linear weights as float8 (e4m3) and casts it
up to the compute precision layer by layer while it runs (diffusers' layerwise casting, the same idea as kohya's
`--fp8_base`); it needs no GPU, and saves memory in training only with gradient checkpointing, since autograd
keeps each layer's up-cast weight for the backward pass (bench/results/quantized.md). A quantized weight cannot
take a LoRA's delta back without rounding it away, so merging into one is refused (`refuse_merge`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.errors import ConfigError, TunerError

QUANTIZATIONS = ("none", "int8", "nf4", "fp8")
ADAPTER_METHODS = frozenset({"lora", "dreambooth-lora", "pivotal"})
"""Capabilities (`Trainer.capability`) that leave the denoiser frozen, so it may be quantized."""
BITSANDBYTES = frozenset({"int8", "nf4"})
FP8_STORAGE = torch.float8_e4m3fn
KEPT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers fp8 leaves in the weight dtype: a convolution's backward pass reads its weight after the casting hook has
put the float8 copy back and fails on it (a linear layer's does not)."""
BYTES_PER_WEIGHT = {"none": None, "int8": 1.0, "nf4": 0.5 + 4 / 64, "fp8": 1.0}
"""Stored bytes per quantized weight (nf4: 4 bits plus one fp32 absmax per 64-weight block); `none` keeps the
weight dtype. Read by the memory estimate (`tuner.memory`)."""


def check(quantize: str, capability: str, model: str = "") -> None:
    """Refuse, before any weight loads, a quantized base for a method that trains the base itself, or a
    quantization this machine cannot run."""
    if quantize == "none":
        return
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"model.quantize = {quantize!r}: allowed: {', '.join(QUANTIZATIONS)}")
    if capability not in ADAPTER_METHODS:
        trains = {
            "dreambooth": "full DreamBooth trains the denoiser's own weights",
            "decoder": "decoder fine-tuning trains the VAE's own weights",
            "textual_inversion": "textual inversion gains nothing from it (its text encoders must stay full)",
        }.get(capability, f"method {capability!r} may train the base's own weights")
        raise ConfigError(
            f"model.quantize = {quantize!r}: {trains}, and quantized weights cannot be trained or take an update; "
            f"a quantized base works with {', '.join(sorted(ADAPTER_METHODS))}. Set model.quantize = 'none'"
        )
    if quantize in BITSANDBYTES:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                f"model.quantize = {quantize!r} needs bitsandbytes (`pip install bitsandbytes`); or use 'fp8'"
            )
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.quantize = {quantize!r}: bitsandbytes quantization in diffusers needs a CUDA GPU and this "
                "machine has none; use model.quantize = 'fp8' here (float8 storage, computed in the training "
                "precision), or 'none'"
            )


def diffusers_config(quantize: str, compute_dtype: torch.dtype) -> Any:
    """The `quantization_config` for a diffusers model's `from_pretrained`, or None (fp8 applies after loading)."""
    if quantize not in BITSANDBYTES:
        return None
    import diffusers

    return diffusers.BitsAndBytesConfig(**_bnb_kwargs(quantize, compute_dtype))


def transformers_config(quantize: str, compute_dtype: torch.dtype) -> Any:
    """The `quantization_config` for T5's `from_pretrained`, or None."""
    if quantize not in BITSANDBYTES:
        return None
    import transformers

    return transformers.BitsAndBytesConfig(**_bnb_kwargs(quantize, compute_dtype))


def _bnb_kwargs(quantize: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    if quantize == "int8":
        return {"load_in_8bit": True}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype}


def store_fp8(module: nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep `module`'s weights in float8 and cast each layer up to `compute_dtype` while it runs. diffusers
    models skip their own precision-critical layers (norms, position embeddings); a transformers encoder skips its
    norms and the layers it keeps in fp32 under half precision (T5's `wo`, whose input it casts to its weight's
    dtype)."""
    from diffusers.hooks import apply_layerwise_casting

    if hasattr(module, "enable_layerwise_casting"):
        module.enable_layerwise_casting(FP8_STORAGE, compute_dtype, skip_modules_classes=KEPT_LAYERS)
    else:
        keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
        apply_layerwise_casting(module, FP8_STORAGE, compute_dtype, ("norm", *keep), KEPT_LAYERS)
    module._tuner_quantize = "fp8"


def quantization_of(module: nn.Module) -> str:
    """`int8`, `nf4`, `fp8` or `none`: how `module` (or any of its parts) stores its weights."""
    module = getattr(module, "module", module)
    marked = getattr(module, "_tuner_quantize", None)
    if marked:
        return marked
    quantizer = getattr(module, "hf_quantizer", None)  # loaded with a quantization_config (diffusers, transformers)
    if quantizer is not None:
        return _kind_of(quantizer.quantization_config.to_dict())
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        kind = type(weight).__name__
        if kind == "Int8Params":
            return "int8"
        if kind == "Params4bit":
            return "nf4"
        if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return "fp8"
    return "none"


def _kind_of(config: dict[str, Any]) -> str:
    """A saved `quantization_config`'s kind in this module's words (`int8`, `nf4`, ...; else its method name)."""
    if config.get("load_in_8bit"):
        return "int8"
    if config.get("load_in_4bit"):
        return str(config.get("bnb_4bit_quant_type") or "4-bit")
    return str(config.get("quant_method") or "quantized")


def saved_quantization(source: str | Path) -> tuple[str, str] | None:
    """(component, kind) of the first component of a local pipeline folder saved quantized (its `config.json`
    holds a `quantization_config`, as a bitsandbytes/torchao/GGUF checkpoint does); read without loading weights."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    for config_file in sorted(folder.glob("*/config.json")):
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config.get("quantization_config"), dict):
            return config_file.parent.name, _kind_of(config["quantization_config"])
    return None


def refuse_quantized_source(source: str | Path, what: str) -> None:
    """`refuse_merge` for a pipeline folder, before any of its weights load."""
    found = saved_quantization(source)
    if found:
        component, kind = found
        raise TunerError(f"{what}: {source}/{component} is saved quantized ({kind}); " + _MERGE_REASON)


_MERGE_REASON = (
    "merging a LoRA into quantized weights would round most of its delta away and leave a base that no longer "
    "matches its file. Fuse into the full-precision base (with model.quantize = 'none' when training), or keep the "
    "LoRA as a separate file"
)


def refuse_merge(module: nn.Module, what: str) -> None:
    """Stop a merge of adapter weights into a quantized module, saying why and what works instead."""
    kind = quantization_of(module)
    if kind == "none":
        return
    raise TunerError(f"{what}: the base is quantized ({kind}); " + _MERGE_REASON)
