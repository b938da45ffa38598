"""The diffusers/peft LoRA file: `<component>.<module path>.<peft param>` keys plus `lora_adapter_metadata`.

This is what `pipe.load_lora_weights` reads for LoRA and DoRA: PEFT-style keys saved as they are (never
through `convert_state_dict_to_diffusers`, which leaves mixed key styles that diffusers half-drops), text-encoder
paths with `text_model.`, and the full prefixed peft config in the header so that alpha != rank loads right.
LoHa and LoKr use the same layout (peft's `hada_*` / `lokr_*` names); diffusers cannot load those, so they are
loaded with `load_peft_adapter`, which only uses peft's public injection API.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.errors import TunerError
from tuner.export.state import (
    COMPONENTS,
    TEXT_MODEL,
    ComponentAdapter,
    LoraState,
    is_text_encoder,
    json_ready,
    split_key,
)

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
# DoRA magnitudes are written `...lora_magnitude_vector.weight`: with the bare peft spelling, diffusers 0.42 +
# transformers 5.23 silently skip them on text encoders (UNet loads either way).
MAGNITUDE = "lora_magnitude_vector"


def _file_key(key: str) -> str:
    return key + ".weight" if key.endswith(MAGNITUDE) else key


def _state_key(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(MAGNITUDE + ".weight") else key


def peft_weight_name(variant: str) -> str:
    """File name of the peft-layout file: diffusers' own name only where diffusers can load it."""
    return DIFFUSERS_WEIGHT_NAME if variant in ("lora", "dora") else f"pytorch_{variant}_weights.safetensors"


def diffusers_loadable(variant: str) -> bool:
    return variant in ("lora", "dora")


def pack_config(state: LoraState) -> str:
    """The `lora_adapter_metadata` JSON: every component's peft config, keys prefixed `<component>.`."""
    packed: dict[str, Any] = {}
    for name, comp in state.components.items():
        packed.update({f"{name}.{key}": value for key, value in json_ready(comp.config).items()})
    return json.dumps(packed, sort_keys=True)


def unpack_config(text: str) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(text).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def write_peft_file(state: LoraState, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` in the diffusers/peft layout; `metadata` adds descriptive header entries."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        f"{name}.{_file_key(key)}": tensor.contiguous()
        for name, comp in state.components.items()
        for key, tensor in comp.tensors.items()
    }
    header = {**state.metadata, **(metadata or {}), "format": "pt", METADATA_KEY: pack_config(state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in header.items()})
    return path


def read_peft_file(path: str | Path) -> LoraState:
    """Read a diffusers/peft-layout file back (configs from the header; alpha = rank when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TunerError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no items
    configs = unpack_config(header.pop(METADATA_KEY)) if METADATA_KEY in header else {}
    header.pop("format", None)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, rest = _state_key(key).partition(".")
        if component not in COMPONENTS or not rest:
            raise TunerError(
                f"{path}: key {key!r} does not start with unet./text_encoder./text_encoder_2.; "
                "is this a kohya file? (`tuner export --to diffusers` converts one)"
            )
        split_key(rest)  # raises on foreign parameter names
        if is_text_encoder(component) and not rest.startswith(TEXT_MODEL):
            rest = TEXT_MODEL + rest
        grouped.setdefault(component, {})[rest] = tensor
    components = {}
    for component, comp_tensors in grouped.items():
        config = configs.get(component)
        if config is None:
            logger.warning("%s: no adapter config for %s in the header; assuming alpha = rank", path, component)
            config = _guess_config(comp_tensors)
        components[component] = ComponentAdapter(component, comp_tensors, config)
    return LoraState(components, header)


def _guess_config(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What diffusers assumes for a header-less file: plain LoRA, alpha = rank per module."""
    ranks = {split_key(k)[0]: int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_A.weight")}
    if not ranks:
        raise TunerError("an adapter file without config metadata must hold lora_A/lora_B tensors")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {_bare(path): r for path, r in ranks.items() if r != rank}
    targets = sorted(_bare(path) for path in ranks)
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": targets,
        "use_dora": any(k.endswith("lora_magnitude_vector") for k in tensors),
        "init_lora_weights": True,
    }


def _bare(path: str) -> str:
    return path[len(TEXT_MODEL) :] if path.startswith(TEXT_MODEL) else path


def peft_config_for(comp: ComponentAdapter):
    """A peft config object from a stored config dict (only the fields this peft version knows)."""
    import dataclasses

    import peft

    cls = {"lora": peft.LoraConfig, "dora": peft.LoraConfig, "loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[
        comp.variant
    ]
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in comp.config.items() if k in known and k not in ("peft_type", "peft_version")}
    return cls(**kwargs)


def inject_state(model: nn.Module, comp: ComponentAdapter, adapter_name: str) -> None:
    """Inject `comp`'s adapter into `model` with peft and load its tensors (exactly, or fail)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    strip = is_text_encoder(comp.component) and not any(n == "text_model" for n, _ in model.named_children())
    tensors = {(key[len(TEXT_MODEL) :] if strip else key): value for key, value in comp.tensors.items()}
    inject_adapter_in_model(peft_config_for(comp), model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    wanted = [k for k in result.missing_keys if adapter_name in k]
    if result.unexpected_keys or wanted:
        raise TunerError(
            f"{comp.component}: adapter does not fit the model (unexpected: {list(result.unexpected_keys)[:3]}, "
            f"missing: {wanted[:3]})"
        )


def resolve_file(location: str | Path, weight_name: str | None = None) -> Path:
    """A local file from a file path, a folder + `weight_name`, or a hub repo id + `weight_name`."""
    path = Path(location)
    if weight_name is None:
        return path
    if path.is_dir() or path.is_file():
        return path / weight_name if path.is_dir() else path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(location), weight_name))
    except Exception as exc:  # noqa: BLE001 - offline, missing repo or file: one clear message
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise TunerError(f"{location}: not a local folder, and {weight_name} is not on the hub ({reason})") from None


def load_peft_adapter(
    pipe: Any, location: str | Path, weight_name: str | None = None, adapter_name: str = "default", scale: float = 1.0
) -> Any:
    """Load a peft-layout adapter file (any variant, LoHa/LoKr included) into a stock diffusers pipeline.

    `location` is the file, or a folder or hub repo id holding `weight_name` (as for `load_lora_weights`).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = resolve_file(location, weight_name)
    state = read_peft_file(path)
    for component, comp in state.components.items():
        model = getattr(pipe, component, None)
        if model is None:
            raise TunerError(f"{path}: holds a {component} adapter but the pipeline has no {component}")
        inject_state(model, comp, adapter_name)
        if scale != 1.0:
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.set_scale(adapter_name, scale)
    return pipe
