"""Load the parts of a base pipeline, detect its family and prediction type, and build stock pipelines.

What differs between families lives in `tuner.families`; this module only loads what a family names.

Everything goes through diffusers' and transformers' own `from_pretrained`, so a local folder and a hub
id take the same path; offline, a hub id fails with a message instead of a trace. A single-file checkpoint
(`model.safetensors`, A1111/ComfyUI style) is recognized by its keys and loaded from its converted diffusers
folder (`tuner.single_file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner import quantize as quantization
from tuner import single_file
from tuner.errors import TunerError
from tuner.families import FAMILIES, Family, family_of_pipeline, variant_of

__all__ = ["FAMILIES", "Family", "Parts", "detect_family", "load_parts"]


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


def resolve_model_path(name_or_path: str, tokenizer_from: str | None = None) -> str:
    """The folder or hub id to load: `builtin:NAME` becomes its folder, and a single-file checkpoint its
    converted diffusers folder (cached; converted now when its tokenizers are reachable, else left as the file,
    which `detect_family` reads by its keys and `load_parts` converts or refuses with the fix)."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_path(name_or_path[len(BUILTIN_PREFIX) :]))
    if single_file.is_single_file(name_or_path):
        try:
            return str(single_file.convert(name_or_path, tokenizer_from))
        except single_file.MissingTokenizer:
            return str(single_file.check_file(name_or_path))
    return name_or_path


def _read_json(source: str, filename: str, revision: str | None) -> dict[str, Any]:
    if single_file.is_single_file(source):
        raise TunerError(f"model {source!r}: a single-file checkpoint has no {filename}; load it with load_parts")
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
    if single_file.is_single_file(source):
        return TunerError(f"model.pretrained_model_name_or_path = {source!r}: cannot load this checkpoint ({reason})")
    return TunerError(
        f"model.pretrained_model_name_or_path = {source!r}: not a local diffusers folder, and it could not be "
        f"fetched from the hub ({reason}). Give a local folder (`tuner make-tiny DIR` writes a tiny one), "
        "or check the id and your network"
    )


def detect_family(source: str, revision: str | None = None) -> tuple[Family, str]:
    """(family, prediction_type) from `model_index.json`, the denoiser config and the scheduler config; of a
    single-file checkpoint, from its key names and metadata (`tuner.single_file.recognize`)."""
    if single_file.is_single_file(source):
        found = single_file.recognize(source)
        return FAMILIES[found.family], found.prediction_type
    index = _read_json(source, "model_index.json", revision)
    if not index:
        raise TunerError(f"model {source!r}: no model_index.json; expected a diffusers pipeline folder")
    pipeline = index.get("_class_name", "")
    scheduler = _read_json(source, "scheduler/scheduler_config.json", revision)
    prediction = scheduler.get("prediction_type", "epsilon")
    for name, marker in (("zimage", "ZImage"), ("flux", "Flux"), ("sd3", "StableDiffusion3"), ("sdxl", "XL")):
        if marker in pipeline:
            family = FAMILIES[name]
            if family.objective.name == "flow_matching":
                config = _read_json(source, f"{family.denoiser_component}/config.json", revision)
                return variant_of(family, config), "flow_matching"
            return family, prediction
    if "StableDiffusion" not in pipeline:
        supported = ", ".join(f"{f.name} ({f.pipeline_class})" for f in FAMILIES.values())
        raise TunerError(f"model {source!r}: pipeline {pipeline!r} is not a supported family; supported: {supported}")
    unet = _read_json(source, "unet/config.json", revision)
    # SD2 (and only SD2) uses linear projections in its transformer blocks and 1024-wide cross-attention.
    is_sd2 = unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024
    return FAMILIES["sd2" if is_sd2 else "sd1"], prediction


def check_trainable(
    name_or_path: str, revision: str | None, capability: str, loss_options: Any, quantize: str = "none"
) -> Family:
    """The model's family, after refusing (before any weight loads) a method or loss option it cannot train, or
    a quantized base (`tuner.quantize.check`). A single-file checkpoint is recognized by its keys here."""
    quantization.check(quantize, capability, name_or_path)
    source = name_or_path if single_file.is_single_file(name_or_path) else resolve_model_path(name_or_path)
    family, _ = detect_family(source, revision)
    family.check_method(capability, name_or_path)
    family.objective.check(loss_options)
    return family


@dataclass
class Parts:
    """The loaded components of a base pipeline, plus what the loop and trainers need to know about them.

    `denoiser` is the UNet or the transformer; `family` says how to condition, call and sample it.
    """

    family: Family
    source: str
    prediction_type: str
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    sample_scheduler: Any = None
    weight_dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    revision: str | None = None
    guidance_scale: float = 1.0
    """Embedded guidance given to a guidance-distilled denoiser (FLUX.1-dev) in training forward passes."""
    freed: dict[str, int] = field(default_factory=dict)
    """Frozen parts freed while training reads cached latents / embeddings, with the bytes each held on the
    device (`runtime.free_cached_parts`); validation brings them back for its renders."""

    @classmethod
    def from_pipeline(cls, pipe: Any, source: str = "") -> Parts:
        """The parts of a loaded stock pipeline (its family known by its class), e.g. to probe its outputs."""
        family = family_of_pipeline(pipe)
        if family is None:
            raise TunerError(f"{type(pipe).__name__}: not a pipeline of a supported family")
        scheduler = pipe.scheduler
        prediction = "flow_matching" if family.objective.name == "flow_matching" else scheduler.config.get(
            "prediction_type", "epsilon")  # fmt: skip
        denoiser = getattr(pipe, family.denoiser_component)
        return cls(
            family=family,
            source=source or str(getattr(pipe, "name_or_path", "") or ""),
            prediction_type=prediction,
            denoiser=denoiser,
            vae=pipe.vae,
            text_encoders=[getattr(pipe, spec.component) for spec in family.encoders],
            tokenizers=[getattr(pipe, spec.tokenizer) for spec in family.encoders],
            noise_scheduler=scheduler,
            device=next(denoiser.parameters()).device,
        )

    @property
    def text_encoder(self) -> nn.Module:
        return self.text_encoders[0]

    def text_encoder_modules(self, adaptable_only: bool = False) -> dict[str, nn.Module]:
        """The text encoders keyed by pipeline component (`text_encoder`, `text_encoder_2`, ...), as
        `Trainables.modules` expects; `adaptable_only` leaves out those that never train (T5)."""
        return {
            spec.component: module
            for spec, module in zip(self.family.encoders, self.text_encoders)
            if spec.adaptable or not adaptable_only
        }

    def compute_dtype(self, model: nn.Module) -> torch.dtype:
        """The dtype `model` takes its inputs in: its weights' own, or the run's weight dtype where they are stored
        quantized (float8, int8 or 4-bit, cast up layer by layer while it runs)."""
        dtype = next(self.unwrapped(model).parameters()).dtype
        return dtype if dtype.is_floating_point and dtype.itemsize > 1 else self.weight_dtype

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
        pipe = cls(**{**self.family.pipeline_components(self), **components})
        if scheduler:
            scheduler_cls = getattr(diffusers, scheduler, None)
            if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
                raise TunerError(f"validation.scheduler = {scheduler!r}: not a diffusers scheduler class")
            pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _quantized_kwargs(config: Any, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` keywords of a bitsandbytes-quantized part: its config, its device and compute dtype."""
    if config is None:
        return {}
    index = torch.device(device).index or 0
    return {"quantization_config": config, "dtype": dtype, "device_map": {"": index}}


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
    tokenizer_from: str | None = None,
    quantize: str = "none",
) -> Parts:
    """Load the denoiser, VAE, text encoder(s), tokenizer(s) and the training noise scheduler of a base pipeline.

    `quantize` stores the denoiser and T5 quantized (`tuner.quantize`; `check_trainable` refuses what cannot run).
    A single-file checkpoint loads from its converted diffusers folder (`tuner.single_file.convert`; its
    tokenizers from `tokenizer_from`, else the Hugging Face cache), which becomes `Parts.source`."""
    import diffusers
    import transformers
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path, tokenizer_from)
    if single_file.is_single_file(source):  # no tokenizer reachable: converting raises the error naming the fix
        source = str(single_file.convert(source, tokenizer_from))
    if source != name_or_path and single_file.is_single_file(name_or_path):
        revision = variant = None  # the converted folder has neither
    family, prediction = detect_family(source, revision)
    kw = {"revision": revision, "variant": variant}
    try:
        denoiser_cls = getattr(diffusers, family.denoiser_class)
        quantized = quantization.diffusers_config(quantize, weight_dtype)
        denoiser = denoiser_cls.from_pretrained(
            source, subfolder=family.denoiser_component, **kw, **_quantized_kwargs(quantized, device, weight_dtype)
        )
        vae_model = (
            diffusers.AutoencoderKL.from_pretrained(vae)
            if vae
            else diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
        )
        encoders, tokenizers = [], []
        for spec in family.encoders:
            model_cls = getattr(transformers, spec.model_class)
            quantized = None if spec.adaptable else quantization.transformers_config(quantize, weight_dtype)
            extra = _quantized_kwargs(quantized, device, weight_dtype)
            encoders.append(model_cls.from_pretrained(source, subfolder=spec.component, **kw, **extra))
            tokenizers.append(AutoTokenizer.from_pretrained(source, subfolder=spec.tokenizer, revision=revision))
        scheduler_cls = getattr(diffusers, family.noise_scheduler_class)
        noise_scheduler = scheduler_cls.from_pretrained(source, subfolder="scheduler", revision=revision)
        sample_scheduler = _sampling_scheduler(source, revision)
    except OSError as exc:
        raise _unreachable(name_or_path, exc) from None
    device = torch.device(device)
    frozen_base = [denoiser, *(e for spec, e in zip(family.encoders, encoders) if not spec.adaptable)]
    for module in (denoiser, vae_model, *encoders):
        module.requires_grad_(False)
        quantized_part = quantize != "none" and any(module is m for m in frozen_base)
        if quantized_part and quantize in quantization.BITSANDBYTES:
            continue  # placed and stored by bitsandbytes at load
        if quantized_part:  # fp8 on the host first: the device never holds the full-precision copy
            module.to(dtype=weight_dtype)
            quantization.store_fp8(module, weight_dtype)
            module.to(device=device)
        else:
            module.to(device=device, dtype=weight_dtype)
    return Parts(
        family=family,
        source=source,
        prediction_type=prediction,
        denoiser=denoiser,
        vae=vae_model,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=noise_scheduler,
        sample_scheduler=sample_scheduler,
        weight_dtype=weight_dtype,
        device=device,
        revision=revision,
    )
