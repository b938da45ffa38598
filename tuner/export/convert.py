"""`tuner export`: convert a LoRA between the diffusers/peft and kohya formats, or fuse it into a pipeline folder.

Conversions keep every tensor, the true alpha of every module and the descriptive metadata; each result is
read back and compared with its input, and, when the base model is known, checked by loading both into it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.export import metadata as md
from tuner.export.lora_comfy import is_comfy, read_comfy_lora, write_comfy_lora
from tuner.export.lora_diffusers import diffusers_loadable, peft_weight_name, read_peft_file, write_peft_file
from tuner.export.lora_flux import module_deltas, read_flux_kohya, write_flux_kohya
from tuner.export.lora_kohya import (
    is_kohya,
    kohya_tensors,
    read_kohya,
    read_kohya_tensors,
    write_kohya,
    writes_sgm,
)
from tuner.export.roundtrip import Check, fresh_pipeline, verify_files
from tuner.export.sgm_names import UNetLayout
from tuner.export.state import COMPONENTS, LoraState, module_paths

logger = logging.getLogger(__name__)

TARGETS = ("diffusers", "kohya", "fused")
ARCH_FAMILIES = {"stable-diffusion-xl": "sdxl", "stable-diffusion-v2": "sd2", "stable-diffusion-v1": "sd1",
                 "stable-diffusion-3": "sd3", "flux-1": "flux", "Z-Image": "zimage"}  # fmt: skip
FLUX_BLOCKS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")


def file_format(path: str | Path) -> str:
    """`kohya`, `kohya-flux` (BFL module names), `comfyui` (Z-Image's `diffusion_model.` keys) or `peft` (the
    diffusers/peft layout), from a file's keys."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise TunerError(f"{path}: expected an existing .safetensors LoRA file")
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if any(k.startswith(FLUX_BLOCKS) for k in keys):
        return "kohya-flux"
    if is_kohya(keys):
        return "kohya"
    if is_comfy(keys):
        return "comfyui"
    if keys and all(k.split(".", 1)[0] in COMPONENTS for k in keys):
        return "peft"
    raise TunerError(f"{path}: neither a kohya LoRA (lora_unet_...) nor a diffusers/peft one (unet.*, text_encoder.*)")


def _family(model: str | None, header: dict[str, str]) -> tuple[Any, str]:
    """(Family, prediction type) from the base model, else from the file's ModelSpec architecture."""
    from tuner.models import FAMILIES, detect_family, resolve_model_path

    if model:
        return detect_family(resolve_model_path(model))
    arch = header.get("modelspec.architecture", "")
    for prefix, name in ARCH_FAMILIES.items():
        if arch.startswith(prefix):
            if FAMILIES[name].objective.name == "flow_matching":
                return FAMILIES[name], "flow_matching"
            v = arch.endswith("-v/lora") or header.get("modelspec.prediction_type") == "v"
            return FAMILIES[name], "v_prediction" if v else "epsilon"
    raise TunerError("the model family is unknown: the file has no modelspec.architecture; pass --model BASE")


def module_names(model: str, num_text_encoders: int) -> dict[str, list[str]]:
    """Canonical Linear/Conv2d module paths per component of the base model, built without loading weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tuner.models import resolve_model_path

    source = resolve_model_path(model)
    with init_empty_weights():
        models: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet"))
        }
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(source, subfolder="text_encoder"))
        if num_text_encoders > 1:
            config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder_2")
            models["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return {name: list(module_paths(m, name)) for name, m in models.items()}


def read_any(path: str | Path, model: str | None = None) -> LoraState:
    """A LoRA file of either format as a `LoraState` (kohya files need the base model's module names)."""
    fmt = file_format(path)
    if fmt == "peft":
        return read_peft_file(path)
    if fmt == "kohya-flux":  # BFL names need no base model: the FLUX.1 layout is fixed
        return read_flux_kohya(path)
    if fmt == "comfyui":  # diffusers module paths: no base model needed either
        return read_comfy_lora(path)
    _, header = read_kohya_tensors(path)
    if not model:
        raise TunerError(f"{path}: reading a kohya file needs the base model (--model BASE) to resolve module names")
    family, _ = _family(model, header)
    return read_kohya(path, module_names(model, family.text_encoders), family.text_encoders)


def _descriptive(header: dict[str, str]) -> dict[str, str]:
    """Metadata worth carrying across formats (not hashes: they describe the old file)."""
    keep = ("modelspec.", "ss_", "tuner.")
    return {k: v for k, v in header.items() if k.startswith(keep) and k != "modelspec.hash_sha256"}


def same_state(a: LoraState, b: LoraState) -> None:
    """Tensor-level check of a conversion: same modules, same effective tensors and alpha/rank per module."""
    for component, comp in a.components.items():
        other = b.components.get(component)
        if other is None:
            raise TunerError(f"conversion lost the {component} adapter")
        if comp.variant != other.variant:
            raise TunerError(f"conversion changed {component}'s variant {comp.variant} -> {other.variant}")
        mine, theirs = kohya_tensors(LoraState({component: comp}), 2), kohya_tensors(LoraState({component: other}), 2)
        if set(mine) != set(theirs):
            raise TunerError(f"conversion changed {component}'s modules: {sorted(set(mine) ^ set(theirs))[:3]}")
        for key, tensor in mine.items():
            if not torch.allclose(tensor, theirs[key], rtol=1e-6, atol=0):
                raise TunerError(f"conversion changed {key} (max difference {(tensor - theirs[key]).abs().max():.3g})")


def _output_file(out: str | Path, default_name: str) -> Path:
    out = Path(out)
    return out if out.suffix == ".safetensors" else out / default_name


def convert_lora(
    input_path: str | Path, to: str, out: str | Path, model: str | None = None, name: str | None = None
) -> Path:
    """Convert `input_path` to `to` (`diffusers` or `kohya`) at `out` (a .safetensors path or a folder)."""
    if to not in ("diffusers", "kohya"):
        raise TunerError(f"--to {to!r}: allowed: {', '.join(TARGETS)}")
    input_path = Path(input_path)
    source_format = file_format(input_path)
    state = read_any(input_path, model)
    header = _descriptive(state.metadata)
    fmt = "peft"
    if to == "kohya":
        family, prediction = _family(model, header)
        if family.lora_file_form is None:
            raise TunerError(
                f"--to kohya: {family.name} has no kohya form that a loader needs; its diffusers file "
                "(pytorch_lora_weights.safetensors) is what diffusers and ComfyUI load"
            )
        stem = name or header.get("ss_output_name") or input_path.parent.name or input_path.stem
        target = _output_file(out, f"{stem}.safetensors")
        _not_the_input(target, input_path)
        header.update(md.sd_version_metadata(family, prediction))
        header.update(md.network_metadata(state.summary(), _has_conv(state), module=family.kohya_network_module))
        header.setdefault("modelspec.sai_model_spec", md.SPEC_VERSION)
        header.setdefault("modelspec.architecture", md.architecture(family, prediction))
        header.setdefault("modelspec.implementation", md.implementation(family))
        header.setdefault("modelspec.title", target.stem)
        if family.lora_file_form == "kohya-flux":
            fmt, written = "kohya-flux", write_flux_kohya(state, target, header)
            back = read_flux_kohya(written)
        elif family.lora_file_form == "comfyui":
            fmt, written = "comfyui", write_comfy_lora(state, target, header)
            back = read_comfy_lora(written)
        else:
            names = module_names(model, family.text_encoders) if model else None
            layout = UNetLayout.from_paths(names["unet"]) if names else None
            if layout is None and writes_sgm(family.text_encoders) and "unet" in state.components:
                logger.warning(
                    "%s: UNet modules keep their diffusers names (diffusers and ComfyUI load them; A1111 misplaces "
                    "up-block convolutions); pass --model BASE to write the SGM names kohya writes for %s",
                    target.name,
                    family.name,
                )
            fmt, written = "kohya", write_kohya(state, target, family.text_encoders, header, layout)
            back = read_kohya(written, names, family.text_encoders) if names else None
    else:
        target = _output_file(out, peft_weight_name(state.variant))
        _not_the_input(target, input_path)
        written = write_peft_file(LoraState(state.components, {}), target, header)
        back = read_peft_file(written)
    if back is not None:  # FLUX.1's BFL form fuses modules: ranks and scales change there, the deltas never do
        compare = _same_deltas if {"kohya-flux", "comfyui"} & {source_format, fmt} else same_state
        compare(state, back)
    if model:
        from tuner.models import resolve_model_path

        reference = _loader(input_path, source_format, state)
        verify_files(resolve_model_path(model), reference, [_loader(written, fmt, state)])
    return written


def _same_deltas(a: LoraState, b: LoraState) -> None:
    """A FLUX.1 conversion fuses and splits modules, changing ranks and scales but never a module's update."""
    mine, theirs = module_deltas(a), module_deltas(b)
    if set(mine) != set(theirs):
        raise TunerError(f"conversion changed the adapted modules: {sorted(set(mine) ^ set(theirs))[:3]}")
    for key, delta in mine.items():
        if not torch.allclose(delta, theirs[key], rtol=1e-5, atol=1e-7):
            raise TunerError(f"conversion changed {key[1]} (max difference {(delta - theirs[key]).abs().max():.3g})")


def _not_the_input(target: Path, input_path: Path) -> None:
    if target.resolve() == input_path.resolve():
        raise TunerError(f"--out {target}: would overwrite the input file; pick another path or --name")


def _has_conv(state: LoraState) -> bool:
    from tuner.export.lora import has_conv

    return has_conv(state)


def _loader(path: Path, fmt: str, state: LoraState, scale: float = 1.0) -> Check:
    """How to load a file of this format and variant exactly (see `tuner.export.lora.KOHYA_TOOLS`)."""
    from tuner.export.lora import uniform_alpha

    variant = state.variant
    if fmt == "kohya-flux":
        return Check(path, "kohya-flux", rtol=1e-4, scale=scale)
    if fmt == "comfyui":
        return Check(path, "comfyui", rtol=1e-4, scale=scale)
    if fmt == "kohya":
        loader = "diffusers" if variant == "lora" and uniform_alpha(state) else "merge"
    else:
        loader = "diffusers" if diffusers_loadable(variant) else "peft"
    return Check(path, loader, rtol=1e-4, scale=scale)


def fuse_lora(input_path: str | Path, model: str, out: str | Path, scale: float = 1.0) -> Path:
    """Merge the LoRA at `input_path` (either format, any variant) into `model`; save the pipeline to `out`."""
    from tuner.export.merge import apply_kohya
    from tuner.models import resolve_model_path
    from tuner.quantize import refuse_merge, refuse_quantized_source

    input_path, out = Path(input_path), Path(out)
    if out.exists() and any(out.iterdir()):
        raise TunerError(f"--out {out}: folder exists and is not empty")
    source = resolve_model_path(model)
    fmt = file_format(input_path)
    if fmt in ("kohya-flux", "comfyui"):
        raise TunerError(
            f"{input_path}: fusing reads the diffusers form; convert it first (tuner export {input_path} --to "
            "diffusers --out DIR --model BASE), then fuse that file"
        )
    refuse_quantized_source(source, f"--to fused --model {model}")
    state = read_any(input_path, model)
    pipe = fresh_pipeline(source, complete=True)  # the saved folder keeps every component of the base
    if _loader(input_path, fmt, state).loader == "diffusers":
        for name in ("unet", "transformer"):
            if getattr(pipe, name, None) is not None:
                refuse_merge(getattr(pipe, name), f"--to fused --model {model}")
        pipe.load_lora_weights(str(input_path), adapter_name="fuse")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["fuse"])
        pipe.unload_lora_weights()
    else:
        num_te = sum(1 for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None)
        apply_kohya(pipe, kohya_tensors(state, num_te), scale)
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe
    reference = _loader(input_path, fmt, state, scale)
    verify_files(source, reference, [Check(out, "pipeline", rtol=1e-4)])
    return out


def export(input_path: str | Path, to: str, out: str | Path, model: str | None = None, scale: float = 1.0,
           name: str | None = None) -> Path:  # fmt: skip
    """The library entry of `tuner export INPUT --to diffusers|kohya|fused [--model BASE] --out PATH`."""
    if to == "fused":
        if not model:
            raise TunerError("--to fused: needs the base model (--model BASE)")
        return fuse_lora(input_path, model, out, scale)
    return convert_lora(input_path, to, out, model, name)
