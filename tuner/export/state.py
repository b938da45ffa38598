"""The in-memory form every LoRA exporter reads and writes: per-component peft tensors, peft config, alphas.

Keys are peft's (`<module path>.lora_A.weight`, `.lora_magnitude_vector`, `.hada_w1_a`, `.lokr_w1`, ...)
with text-encoder paths always spelled with `text_model.` (transformers 5 dropped that prefix from
`CLIPTextModel`; every other tool still expects it). Writers and readers of each file format convert
between this and their keys, so conversions never go through a live model.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tuner.errors import TunerError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
VARIANTS = ("lora", "dora", "loha", "lokr")
# The peft parameter names of each variant, in the order they appear on one module.
PARAMS = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
TEXT_MODEL = "text_model."


def is_text_encoder(component: str) -> bool:
    return component.startswith("text_encoder")


def with_text_model(path: str) -> str:
    """Text-encoder module path as every tool but transformers 5 spells it (`text_model.encoder...`)."""
    return path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path


def split_key(key: str) -> tuple[str, str]:
    """`<module path>.<peft param>` -> (module path, param), for any variant's parameter names."""
    for names in PARAMS.values():
        for name in names:
            if key.endswith("." + name):
                return key[: -len(name) - 1], name
    raise TunerError(f"adapter tensor {key!r}: not a LoRA/DoRA/LoHa/LoKr parameter name")


def json_ready(value: Any) -> Any:
    """peft configs hold sets and enums; safetensors metadata and diffusers want plain JSON."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset, tuple, list)):
        items = [json_ready(v) for v in value]
        return sorted(items) if isinstance(value, (set, frozenset)) else items
    if hasattr(value, "value") and isinstance(value.value, str):  # enums such as PeftType
        return value.value
    return value


@dataclass
class ComponentAdapter:
    """The adapter of one pipeline component (`unet`, `text_encoder`, `text_encoder_2`)."""

    component: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]

    @property
    def variant(self) -> str:
        kind = PEFT_TYPES.get(str(json_ready(self.config.get("peft_type", "LORA"))).upper())
        if kind is None:
            raise TunerError(f"{self.component}: peft type {self.config.get('peft_type')!r} is not exportable")
        return "dora" if kind == "lora" and self.config.get("use_dora") else kind

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """module path -> {peft param name: tensor}, in a stable order."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key in sorted(self.tensors):
            path, name = split_key(key)
            grouped.setdefault(path, {})[name] = self.tensors[key]
        return grouped

    def alpha_of(self, path: str) -> float:
        key = "lora_alpha" if self.variant in ("lora", "dora") else "alpha"
        return float(self._pattern("alpha_pattern", key, path))

    def rank_for(self, path: str) -> int:
        """The rank peft used for one module (what `alpha / r` divides by)."""
        return int(self._pattern("rank_pattern", "r", path))

    def _pattern(self, pattern_key: str, default_key: str, path: str) -> Any:
        """Resolve a per-module value the way peft does (`(.*\\.)?(pattern)$` on the module path)."""
        bare = path[len(TEXT_MODEL) :] if path.startswith(TEXT_MODEL) else path
        for key, value in (self.config.get(pattern_key) or {}).items():
            if re.match(rf"(.*\.)?({key})$", path) or re.match(rf"(.*\.)?({key})$", bare):
                return value
        return self.config[default_key]


@dataclass
class LoraState:
    """Everything one LoRA file holds: the adapters per component and descriptive metadata."""

    components: dict[str, ComponentAdapter]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        kinds = {c.variant for c in self.components.values()}
        if len(kinds) != 1:
            raise TunerError(f"adapter mixes variants {sorted(kinds)}; one file holds one variant")
        return kinds.pop()

    def summary(self) -> dict[str, Any]:
        """Rank and alpha as kohya's `ss_network_dim` / `ss_network_alpha` report them: the commonest."""
        ranks: Counter[int] = Counter()
        alphas: Counter[float] = Counter()
        for comp in self.components.values():
            for path in comp.modules():
                ranks[comp.rank_for(path)] += 1
                alphas[comp.alpha_of(path)] += 1
        if not ranks:
            raise TunerError("adapter holds no tensors")
        return {"rank": ranks.most_common(1)[0][0], "alpha": alphas.most_common(1)[0][0], "variant": self.variant}


def module_paths(model: nn.Module, component: str) -> dict[str, nn.Module]:
    """Canonical module path (text encoders with `text_model.`) -> module, for Linear and Conv2d layers."""
    names = dict(model.named_modules())
    fix = is_text_encoder(component) and "text_model" not in names
    return {
        (with_text_model(name) if fix else name): module
        for name, module in names.items()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }


def collect(model: nn.Module, component: str, adapter_name: str) -> ComponentAdapter:
    """The trained adapter of one live peft-injected model, as fp32 CPU tensors with canonical keys."""
    from peft.utils import get_peft_model_state_dict

    configs = getattr(model, "peft_config", {}) or {}
    if adapter_name not in configs:
        raise TunerError(f"{component}: no adapter named {adapter_name!r} (found: {sorted(configs) or 'none'})")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    text = is_text_encoder(component)
    tensors = {
        (with_text_model(key) if text else key): value.detach().to("cpu", torch.float32).contiguous().clone()
        for key, value in state.items()
    }
    config = json_ready(configs[adapter_name].to_dict())
    config["init_lora_weights" if "init_lora_weights" in config else "init_weights"] = True  # loaders must not re-init
    return ComponentAdapter(component, tensors, config)


def collect_state(
    models: dict[str, nn.Module], adapter_name: str, metadata: dict[str, str] | None = None
) -> LoraState:
    """`collect` for each component that carries the adapter (`{"unet": unet, "text_encoder": te, ...}`)."""
    components = {}
    for component, model in models.items():
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            components[component] = collect(model, component, adapter_name)
    if not components:
        raise TunerError(f"no component carries an adapter named {adapter_name!r}; nothing to export")
    return LoraState(components, dict(metadata or {}))


def unit_scale(state: LoraState) -> LoraState:
    """The same plain LoRA with each module's alpha / rank multiplied into `lora_B` and alpha = rank.

    ComfyUI and Forge ignore diffusers' `lora_adapter_metadata`, so a diffusers-form file they load must mean the
    same with every scale at 1 (formats.md §9.0); diffusers loads it exactly either way.
    """
    components = {}
    for name, comp in state.components.items():
        if comp.variant != "lora":
            raise TunerError(f"{name}: only a plain LoRA can carry its scale in its weights (this is {comp.variant})")
        tensors = dict(comp.tensors)
        for path in comp.modules():
            scale = comp.alpha_of(path) / comp.rank_for(path)
            key = f"{path}.lora_B.weight"
            tensors[key] = (tensors[key] * scale).contiguous()
        config = {
            **comp.config,
            "lora_alpha": comp.config["r"],
            "alpha_pattern": dict(comp.config.get("rank_pattern") or {}),
        }
        components[name] = ComponentAdapter(name, tensors, config)
    return LoraState(components, dict(state.metadata))
