"""Load the parts of a base pipeline, detect its family and prediction type, and build stock pipelines.

Everything goes through diffusers' and transformers' own `from_pretrained`, so a local folder and a hub
id take the same path; offline, a hub id fails with a message instead of a trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.errors import TunerError


@dataclass(frozen=True)
class Family:
    """What differs between model families, in one place, so no trainer compares family names."""

    name: str
    pipeline_class: str
    text_encoders: int
    uses_time_ids: bool
    kohya_version: str
    modelspec_architecture: str
    default_resolution: int
    trainable: bool = True


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "StableDiffusionPipeline", 1, False, "sd_v1", "stable-diffusion-v1", 512),
    "sd2": Family("sd2", "StableDiffusionPipeline", 1, False, "sd_v2", "stable-diffusion-v2-768-v", 768),
    "sdxl": Family(
        "sdxl", "StableDiffusionXLPipeline", 2, True, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024
    ),
    # Recognized so users get a clear message; their transformer + flow-matching path is not built yet.
    "sd3": Family("sd3", "StableDiffusion3Pipeline", 3, False, "sd3", "stable-diffusion-3-medium", 1024, False),
    "flux": Family("flux", "FluxPipeline", 2, False, "flux1", "flux-1-dev", 1024, False),
}

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "micro" / "weights"
"""Where models shipped inside the package live, one diffusers folder per name."""


def builtin_model_path(name: str) -> Path:
    """Folder of a model shipped inside the package (`builtin:micro`)."""
    if not has_builtin_model(name):
        raise TunerError(
            f"model.pretrained_model_name_or_path = {BUILTIN_PREFIX}{name!s}: this install has no built-in "
            f"{name!r} model; pass --model with a diffusers folder (`tuner make-tiny DIR` writes a tiny one)"
        )
    return BUILTIN_DIR / name


def has_builtin_model(name: str) -> bool:
    """Whether this install ships the built-in model `name` (a source checkout may lack the weights)."""
    return (BUILTIN_DIR / name / "model_index.json").is_file()


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_path(name_or_path[len(BUILTIN_PREFIX) :]))
    return name_or_path


def _read_json(source: str, filename: str, revision: str | None) -> dict[str, Any]:
    local = Path(source) / filename
    if Path(source).is_dir():
        return json.loads(local.read_text(encoding="utf-8")) if local.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, filename, revision=revision)).read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
        raise _unreachable(source, exc) from None


def _unreachable(source: str, exc: Exception) -> TunerError:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return TunerError(
        f"model.pretrained_model_name_or_path = {source!r}: not a local diffusers folder, and it could not be "
        f"fetched from the hub ({reason}). Give a local folder (`tuner make-tiny DIR` writes a tiny one), "
        "or check the id and your network"
    )


def detect_family(source: str, revision: str | None = None) -> tuple[Family, str]:
    """(family, prediction_type) from `model_index.json`, the UNet config and the scheduler config."""
    index = _read_json(source, "model_index.json", revision)
    if not index:
        raise TunerError(f"model {source!r}: no model_index.json; expected a diffusers pipeline folder")
    pipeline = index.get("_class_name", "")
    scheduler = _read_json(source, "scheduler/scheduler_config.json", revision)
    prediction = scheduler.get("prediction_type", "epsilon")
    if "Flux" in pipeline:
        return FAMILIES["flux"], "flow_matching"
    if "StableDiffusion3" in pipeline:
        return FAMILIES["sd3"], "flow_matching"
    if "XL" in pipeline:
        return FAMILIES["sdxl"], prediction
    if "StableDiffusion" not in pipeline:
        raise TunerError(f"model {source!r}: pipeline {pipeline!r} is not a Stable Diffusion family pipeline")
    unet = _read_json(source, "unet/config.json", revision)
    # SD2 (and only SD2) uses linear projections in its transformer blocks and 1024-wide cross-attention.
    is_sd2 = unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024
    return FAMILIES["sd2" if is_sd2 else "sd1"], prediction


@dataclass
class Parts:
    """The loaded components of a base pipeline, plus what the loop and trainers need to know about them."""

    family: Family
    source: str
    prediction_type: str
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    sample_scheduler: Any = None
    weight_dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    revision: str | None = None

    @property
    def text_encoder(self) -> nn.Module:
        return self.text_encoders[0]

    def text_encoder_modules(self) -> dict[str, nn.Module]:
        """The text encoders keyed as `Trainables.modules` expects (`text_encoder`, `text_encoder_2`, ...)."""
        return {"text_encoder" if i == 0 else f"text_encoder_{i + 1}": m for i, m in enumerate(self.text_encoders)}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def unwrapped(self, module: nn.Module) -> nn.Module:
        """The module without DDP / compile wrappers (the loop may have wrapped it)."""
        while hasattr(module, "module"):
            module = module.module
        return getattr(module, "_orig_mod", module)

    def pipeline(self, scheduler: str | None = None, **components: Any):
        """A stock diffusers pipeline of this family built from the current (possibly trained) parts."""
        import diffusers

        cls = getattr(diffusers, self.family.pipeline_class)
        parts: dict[str, Any] = {
            "vae": self.unwrapped(self.vae),
            "unet": self.unwrapped(self.unet),
            "text_encoder": self.unwrapped(self.text_encoders[0]),
            "tokenizer": self.tokenizers[0],
            "scheduler": self.sample_scheduler or self.noise_scheduler,
        }
        if self.family.text_encoders > 1:
            parts["text_encoder_2"] = self.unwrapped(self.text_encoders[1])
            parts["tokenizer_2"] = self.tokenizers[1]
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        parts.update(components)
        pipe = cls(**parts)
        if scheduler:
            scheduler_cls = getattr(diffusers, scheduler, None)
            if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
                raise TunerError(f"validation.scheduler = {scheduler!r}: not a diffusers scheduler class")
            pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _sampling_scheduler(source: str, revision: str | None):
    """The base model's own inference scheduler (training uses DDPM with the same betas)."""
    import diffusers

    config = _read_json(source, "scheduler/scheduler_config.json", revision)
    cls = getattr(diffusers, config.get("_class_name", ""), None) or diffusers.DDPMScheduler
    return cls.from_config(config)


def load_parts(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    device: torch.device | str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
) -> Parts:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the training noise scheduler of a base pipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    source = resolve_model_path(name_or_path)
    family, prediction = detect_family(source, revision)
    if not family.trainable:
        raise TunerError(
            f"model {name_or_path!r}: the {family.name} family ({family.pipeline_class}) is recognized but its "
            "transformer/flow-matching training path is not available yet; supported: sd1, sd2, sdxl"
        )
    kw = {"revision": revision, "variant": variant}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
        vae_model = (
            AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
        )
        encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)]
        tokenizers = [AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)]
        if family.text_encoders > 1:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw))
            tokenizers.append(AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision))
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
        sample_scheduler = _sampling_scheduler(source, revision)
    except OSError as exc:
        raise _unreachable(name_or_path, exc) from None
    device = torch.device(device)
    for module in (unet, vae_model, *encoders):
        module.requires_grad_(False)
        module.to(device=device, dtype=weight_dtype)
    return Parts(
        family=family,
        source=source,
        prediction_type=prediction,
        unet=unet,
        vae=vae_model,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=noise_scheduler,
        sample_scheduler=sample_scheduler,
        weight_dtype=weight_dtype,
        device=device,
        revision=revision,
    )
