"""LoRA: low-rank adapters (LoRA, DoRA, LoHa, LoKr via peft) on the denoiser (a UNet or a transformer, with the
target sets its family names) and optionally the CLIP text encoders.

The adapter plumbing is public so DreamBooth-LoRA and pivotal tuning reuse it: `inject_lora` (freeze the
base, inject with peft, return optimizer groups), `set_lora_scale` (0 = base model) and `save_lora`
(both file formats, round-trip checked, described as `ArtifactFile`s).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from tuner.config import MethodConfig
from tuner.errors import ConfigError, TunerError
from tuner.families.unet import LORA_PRESETS
from tuner.losses import LossOptions, diffusion_loss
from tuner.models import Parts
from tuner.trainer import Artifact, ArtifactFile, Trainables, Trainer

ADAPTER_NAME = "tuner"

UNET_PRESETS: dict[str, list[str]] = {name: list(targets) for name, targets in LORA_PRESETS.items()}
DENOISER_PRESETS = (*UNET_PRESETS, "all-linear")
"""Target-set names across families; each family says which it has (`Family.lora_targets`)."""
TEXT_ENCODER_PRESETS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attn+mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


class LoraConfig(MethodConfig):
    """The `[lora]` table (also built by DreamBooth-LoRA and pivotal tuning for their adapters)."""

    rank: int = Field(16, ge=1)
    """Adapter rank (LoRA/DoRA/LoHa rank; for LoKr the rank of the decomposed Kronecker factor)."""
    alpha: float | None = Field(None, gt=0)
    """Adapter alpha; the update is scaled by alpha / rank. Default: the rank (scale 1)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input (LoRA/DoRA); rank dropout for LoHa/LoKr."""
    variant: Literal["lora", "dora", "loha", "lokr"] = "lora"
    """`lora`, `dora` (weight-decomposed), `loha` (Hadamard product) or `lokr` (Kronecker product)."""
    unet_target_modules: str | list[str] = "attn"
    """Denoiser (UNet or transformer) modules: a preset or module-name suffixes. UNet: `attn`, `attn+ff`,
    `transformer`, `locon`, `all-linear`. SD3 / Flux: `attn` (image and context projections), `attn+ff`,
    `all-linear` (every linear layer but norms, embedders and the final layer)."""
    train_text_encoder: bool = False
    """Also put adapters on the text encoder(s)."""
    text_encoder_target_modules: str | list[str] = "attn"
    """Text-encoder modules: a preset (`attn`, `attn+mlp`) or module-name suffixes (`q_proj`, `fc1`, ...)."""
    init_lora_weights: bool | Literal["gaussian"] = True
    """Initialization: true (up-projection zero: starts as the base model), `gaussian`, or false (random)."""
    rank_pattern: dict[str, int] = {}
    """Per-module rank overrides, `{module-name regex: rank}` (peft's rank_pattern)."""
    alpha_pattern: dict[str, float] = {}
    """Per-module alpha overrides, `{module-name regex: alpha}` (peft's alpha_pattern)."""
    output_name: str | None = None
    """Stem of the kohya file (the LoRA's name in A1111); default: the run folder's name."""
    verify_export: bool = True
    """Round-trip check every exported file (loads a second fp32 copy of the base model on the CPU)."""

    @field_validator("unet_target_modules", "text_encoder_target_modules")
    @classmethod
    def _targets(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        presets = DENOISER_PRESETS if info.field_name == "unet_target_modules" else TEXT_ENCODER_PRESETS
        if isinstance(value, str) and value not in presets:
            raise ValueError(f"unknown preset {value!r}; allowed: {', '.join(presets)} or a list of module names")
        if isinstance(value, list) and (not value or not all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError("expected a non-empty list of module names")
        return value

    @model_validator(mode="after")
    def _lycoris_init(self) -> LoraConfig:
        if self.variant in ("loha", "lokr") and self.init_lora_weights == "gaussian":
            raise ValueError(f"init_lora_weights = 'gaussian' applies to lora/dora, not {self.variant}")
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)

    def targets(self, text_encoder: bool = False) -> list[str]:
        """Target suffixes of the text encoders, or of a UNet (transformers: `lora_targets`)."""
        value = self.text_encoder_target_modules if text_encoder else self.unet_target_modules
        if isinstance(value, str):
            return list((TEXT_ENCODER_PRESETS if text_encoder else UNET_PRESETS)[value])
        return list(value)


def lora_targets(parts: Parts, cfg: LoraConfig) -> list[str]:
    """The denoiser's peft `target_modules`: the family resolves preset names against the model."""
    return parts.family.lora_targets(cfg.unet_target_modules, parts.unwrapped(parts.denoiser))


def peft_config(cfg: LoraConfig, targets: list[str]):
    """The peft config object for one component."""
    import peft

    common = {
        "r": cfg.rank,
        "target_modules": targets,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
    }
    if cfg.variant in ("lora", "dora"):
        return peft.LoraConfig(lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, use_dora=cfg.variant == "dora",
                               init_lora_weights=cfg.init_lora_weights, **common)  # fmt: skip
    cls = peft.LoHaConfig if cfg.variant == "loha" else peft.LoKrConfig
    return cls(alpha=cfg.lora_alpha, rank_dropout=cfg.dropout, init_weights=bool(cfg.init_lora_weights), **common)


def adapted_models(parts: Parts) -> dict[str, nn.Module]:
    """Pipeline component name -> unwrapped model, for the denoiser (`unet` / `transformer`) and every text
    encoder that can carry an adapter (CLIP, not T5)."""
    models = {parts.family.denoiser_component: parts.unwrapped(parts.denoiser)}
    for name, encoder in parts.text_encoder_modules(adaptable_only=True).items():
        models[name] = parts.unwrapped(encoder)
    return models


def _inject(model: nn.Module, config: Any, name: str) -> list[nn.Parameter]:
    """Inject one adapter with peft; only its parameters train, in fp32 (the base stays as loaded)."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    _prune_patterns(model, config)
    if name in (getattr(model, "peft_config", None) or {}):
        raise TunerError(f"{type(model).__name__} already carries an adapter named {name!r}")
    if hasattr(model, "add_adapter") and hasattr(model, "set_adapters"):  # diffusers models: keeps its bookkeeping
        model.add_adapter(config, adapter_name=name)
    else:
        inject_adapter_in_model(config, model, adapter_name=name)
    params = []
    for param_name, param in model.named_parameters():
        if f".{name}." in f"{param_name}." or param_name.endswith(f".{name}"):
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
        else:
            param.requires_grad_(False)
    if not params:
        raise TunerError(f"{type(model).__name__}: target modules {sorted(config.target_modules)} matched nothing")
    return params


def _prune_patterns(model: nn.Module, config: Any) -> None:
    """Keep only the rank/alpha patterns that name a module of this model (one table serves all components)."""
    import re

    names = [name for name, _ in model.named_modules()]
    for attr in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, attr)
        kept = {k: v for k, v in pattern.items() if any(re.match(rf"(.*\.)?({k})$", n) for n in names)}
        setattr(config, attr, kept)


def inject_lora(parts: Parts, cfg: LoraConfig, run_config: Any) -> list[dict[str, Any]]:
    """Freeze the base, inject adapters into the UNet (and text encoders if they train); optimizer groups.

    Everything else is frozen here, so a method that also trains other tensors (pivotal tuning's token
    embeddings) unfreezes them after this call.
    """
    models = adapted_models(parts)
    for model in (parts.denoiser, *parts.text_encoders):
        parts.unwrapped(model).requires_grad_(False)
    lr = run_config.optimizer.learning_rate
    te_lr = run_config.optimizer.text_encoder_lr or lr
    denoiser = parts.family.denoiser_component
    config = peft_config(cfg, lora_targets(parts, cfg))
    groups = [{"name": f"{denoiser}_lora", "params": _inject(models[denoiser], config, ADAPTER_NAME), "lr": lr}]
    if cfg.train_text_encoder and len(models) == 1:
        labels = ", ".join(spec.label for spec in parts.family.encoders)
        raise ConfigError(
            f"{run_config.method}.train_text_encoder = true: the text encoder(s) of {parts.family.pipeline_class} "
            f"({labels}) take no adapter that its LoRA loaders read; set it to false (the transformer still trains)"
        )
    if cfg.train_text_encoder:
        te_params = [
            p
            for name, model in models.items()
            if name != denoiser
            for p in _inject(model, peft_config(cfg, cfg.targets(text_encoder=True)), ADAPTER_NAME)
        ]
        groups.append({"name": "text_encoder_lora", "params": te_params, "lr": te_lr})
    return groups


def set_lora_scale(
    parts: Parts, scale: float, adapter_name: str = ADAPTER_NAME, components: tuple[str, ...] | None = None
) -> None:
    """Scale every adapter layer; 0 disables them, so even DoRA's magnitude is off and the base model returns."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, model in adapted_models(parts).items():
        if components is not None and name not in components:
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in _layer_adapters(module):
                # peft's enable/disable also flips requires_grad; what trains is not this function's business.
                flags = [(p, p.requires_grad) for p in module.parameters()]
                module.enable_adapters(scale != 0.0)
                for param, flag in flags:
                    param.requires_grad_(flag)
                if scale != 0.0:
                    module.set_scale(adapter_name, scale)


def _layer_adapters(layer: Any) -> set[str]:
    names = set()
    for attr in layer.adapter_layer_names:
        names |= set(getattr(layer, attr, {}) or {})
    return names


def save_lora(
    parts: Parts, cfg: LoraConfig, run_config: Any, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> list[ArtifactFile]:
    """Export the trained adapter in diffusers/peft and kohya format, round-trip checked; `extra` gets the report."""
    from tuner.export.lora import export_lora
    from tuner.export.metadata import training_metadata
    from tuner.export.state import collect_state

    out_dir = Path(out_dir)
    set_lora_scale(parts, 1.0)
    state = collect_state(adapted_models(parts), ADAPTER_NAME)
    name = cfg.output_name or Path(run_config.train.output_dir).name or "lora"
    files, report = export_lora(
        parts,
        state,
        out_dir,
        output_name=name,
        resolution=run_config.data.resolution,
        trigger=trigger_words(run_config),
        training={**training_metadata(run_config, name), "ss_network_dropout": str(cfg.dropout)},
        config_json=json.dumps(run_config.public_dict(), sort_keys=True),
        verify=cfg.verify_export,
    )
    if extra is not None:
        extra.update(report)
    return files


def base_prediction(parts: Parts, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """The base denoiser's prediction (its adapters off): image-free prior preservation without a second copy."""
    denoiser = (parts.family.denoiser_component,)
    set_lora_scale(parts, 0.0, components=denoiser)
    try:
        return parts.family.predict(parts, parts.unwrapped(parts.denoiser), noisy, timesteps, cond)
    finally:
        set_lora_scale(parts, 1.0, components=denoiser)


def data_captions(run_config: Any, limit: int) -> list[str]:
    """Up to `limit` distinct captions of the instance data, formatted as training uses them (template, prefix,
    suffix), spread over the data; [] when the data has none or cannot be listed (validation then says so)."""
    from tuner.data.captions import format_caption
    from tuner.data.sources import list_sources

    data = run_config.data
    if data.path and not Path(data.path).expanduser().exists():
        return []  # a hub dataset: not downloaded just for prompts
    try:
        items = [i for i in list_sources(run_config).items if not i.is_class and i.problem is None]
    except Exception:  # noqa: BLE001 - no captions is not an error here; training reports bad data itself
        return []
    captions: list[str] = []
    for item in items:
        if item.caption and item.caption.strip():
            text = format_caption(data, item.caption.strip(), item.prefix)
            if text and text not in captions:
                captions.append(text)
    if len(captions) <= limit:
        return captions
    step = len(captions) / limit
    return [captions[int(i * step)] for i in range(limit)]


def trigger_words(run_config: Any) -> str | None:
    """The identifier token, else the instance prompt: what users must write to get the subject."""
    data = run_config.data
    return data.token or data.instance_prompt or None


class LoraTrainer(Trainer):
    name = "lora"
    Config = LoraConfig
    data_kinds = frozenset({"captioned", "dreambooth"})

    def __init__(self, config, settings: LoraConfig | None = None):
        super().__init__(config)
        self.settings = settings  # DreamBooth-LoRA passes its own adapter settings

    @property
    def method_config(self) -> LoraConfig:
        return self.settings or super().method_config

    def capability(self) -> str:
        """DreamBooth-LoRA when the data is a subject with an instance prompt, else plain LoRA."""
        return "dreambooth-lora" if self.config.data.instance_prompt else "lora"

    def prepare(self, parts: Parts) -> Trainables:
        cfg: LoraConfig = self.method_config
        self.loss_options = LossOptions.from_config(self.config)
        groups = inject_lora(parts, cfg, self.config)
        modules: dict[str, nn.Module] = {"denoiser": parts.denoiser}
        if cfg.train_text_encoder:
            modules.update(parts.text_encoder_modules(adaptable_only=True))
        needs = {"latents", "input_ids" if cfg.train_text_encoder else "text_embeds"}
        return Trainables(modules=modules, param_groups=groups, needs=frozenset(needs))

    def compute_loss(self, parts: Parts, batch: dict[str, Any]) -> torch.Tensor:
        options = getattr(self, "loss_options", None) or LossOptions.from_config(self.config)
        data = self.config.data
        prior = None
        if data.with_prior_preservation and data.prior_mode == "model":
            prior = functools.partial(base_prediction, parts)
        return diffusion_loss(parts, batch, options, generator=batch.get("generator"), prior_target=prior)

    def set_adapter_scale(self, parts: Parts, scale: float) -> bool:
        set_lora_scale(parts, scale)
        return True

    validation_caption_count = 3
    """How many of the data's captions become validation prompts when none are configured."""

    def validation_prompts(self) -> list[str]:
        """The instance / class prompts; else a few of the data's captions as training formats them (with the
        trigger word in front when a caption lacks it); else the trigger token in a plain sentence."""
        data = self.config.data
        if data.instance_prompt:
            return super().validation_prompts()
        token = data.token
        captions = data_captions(self.config, self.validation_caption_count)
        if token:
            captions = [c if token in c else f"{token}, {c}" for c in captions]
        if captions:
            return captions + ([data.class_prompt] if data.class_prompt else [])
        return super().validation_prompts() or ([f"a photo of {token}"] if token else [])

    def save(self, parts: Parts, out_dir: Path) -> Artifact:
        extra: dict[str, Any] = {}
        files = save_lora(parts, self.method_config, self.config, out_dir, extra)
        return self.artifact(parts, files, trigger_words(self.config), extra)
