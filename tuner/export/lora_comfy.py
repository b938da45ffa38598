"""The LoRA file ComfyUI loads for Z-Image: `diffusion_model.` + diffusers module paths, kohya tensor names.

ComfyUI builds its Z-Image LoRA key map from the diffusers names (`comfy.utils.z_image_to_diffusers`, used by
`comfy.lora.model_lora_keys_unet` for its Lumina2 model class): `diffusion_model.<path>` (also `transformer.`,
bare or `lycoris_`) maps onto its own modules, with `attention.to_q/to_k/to_v` as row slices of its fused
`attention.qkv` and `attention.to_out.0` as `attention.out` (copies of that map from before the refiners were
added to it cover `layers` only). Each module is written as kohya writes one (`lora_down.weight`,
`lora_up.weight`, a float `alpha`): the form musubi-tuner's `convert_lora.py --target other` writes (ai-toolkit
uses the same prefix with `lora_A`/`lora_B`), and diffusers' `ZImageLoraLoaderMixin` converts it on load. Every
loader applies alpha / rank, so the file means the same in all of them (formats.md §9.0, §9.3).

Plain LoRA of the transformer only: ComfyUI's Z-Image map has no text-encoder LoRA, and DoRA/LoHa/LoKr stay in
the diffusers file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tuner.errors import TunerError
from tuner.export.lora_kohya import _component, _to_peft, read_kohya_tensors
from tuner.export.merge import merge_into
from tuner.export.state import LoraState

PREFIX = "diffusion_model."
COMPONENT = "transformer"
# The module paths ComfyUI's Z-Image key map knows (weights only; LoRA keys are the paths without `.weight`).
_BLOCK = r"(layers|noise_refiner|context_refiner)\.\d+\."
_IN_BLOCK = r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)"
_GLOBAL = (
    r"(all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|all_x_embedder\.2-1|cap_embedder\.1|t_embedder\.mlp\.[02])"
)
COMFY_MAPPED = re.compile(rf"({_BLOCK}{_IN_BLOCK}|{_GLOBAL})")


SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def by_module(tensors: dict[str, torch.Tensor], path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """`diffusion_model.<module path>.<suffix>` -> {module path: {suffix: tensor}} (paths contain dots)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise TunerError(f"{path}: key {key!r} is not `{PREFIX}<module>.` + one of {', '.join(SUFFIXES)}")
        grouped.setdefault(key[len(PREFIX) : -len(suffix) - 1], {})[suffix] = tensor
    return grouped


def comfy_unmapped(state: LoraState) -> list[str]:
    """Adapted transformer modules ComfyUI's Z-Image map has no key for (it would log them as not loaded)."""
    comp = state.components.get(COMPONENT)
    return [] if comp is None else [path for path in comp.modules() if not COMFY_MAPPED.fullmatch(path)]


def comfy_tensors(state: LoraState) -> dict[str, torch.Tensor]:
    """The ComfyUI-form tensors of a plain transformer LoRA, each module with its true alpha."""
    others = sorted(set(state.components) - {COMPONENT})
    if others:
        raise TunerError(f"the ComfyUI Z-Image form holds the transformer only; this adapter also has {others}")
    comp = state.components[COMPONENT]
    if comp.variant != "lora":
        raise TunerError(f"the ComfyUI Z-Image form holds a plain LoRA; this one is {comp.variant}")
    out: dict[str, torch.Tensor] = {}
    for path, params in comp.modules().items():
        name = PREFIX + path
        out[f"{name}.lora_down.weight"] = params["lora_A.weight"].contiguous()
        out[f"{name}.lora_up.weight"] = params["lora_B.weight"].contiguous()
        out[f"{name}.alpha"] = torch.tensor(comp.alpha_of(path))
    return out


def write_comfy_lora(state: LoraState, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the file with `metadata` (ModelSpec and `ss_*`) plus kohya's hashes of its tensors."""
    from safetensors.torch import save_file

    from tuner.export.metadata import hash_metadata

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = comfy_tensors(state)
    header = {**{k: str(v) for k, v in metadata.items()}, **hash_metadata(tensors, metadata)}
    save_file(tensors, str(path), metadata=header)
    return path


def is_comfy(keys: list[str]) -> bool:
    return bool(keys) and all(k.startswith(PREFIX) for k in keys)


def read_comfy_lora(path: str | Path) -> LoraState:
    """The file as a `LoraState` (the transformer's peft tensors, ranks and alphas per module)."""
    tensors, header = read_kohya_tensors(path)
    grouped = by_module(tensors, path)
    modules = {name: _to_peft(name, params) for name, params in grouped.items()}
    return LoraState({COMPONENT: _component(COMPONENT, modules, "lora")}, header)


def apply_comfy(pipe, path: str | Path, scale: float = 1.0) -> int:
    """Merge the file into `pipe.transformer`'s weights as ComfyUI does (weight += up @ down · alpha / rank, on
    the module its key map names); returns the module count. Refuses keys ComfyUI's map would not load."""
    grouped = by_module(read_kohya_tensors(path)[0], path)
    modules = dict(pipe.transformer.named_modules())
    unknown = sorted(n for n in grouped if not COMFY_MAPPED.fullmatch(n) or n not in modules)
    if unknown:
        raise TunerError(f"{path}: keys ComfyUI's Z-Image map does not load, e.g. {unknown[:3]}")
    return merge_into(grouped, modules, scale)
