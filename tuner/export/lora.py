"""Write one trained adapter in every LoRA format, check each round trip, and describe the files.

Shared by every method that trains a LoRA (LoRA, DreamBooth-LoRA, pivotal tuning): they collect the
adapter (`tuner.export.state.collect_state`) and call `export_lora`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tuner.errors import TunerError
from tuner.export import metadata as md
from tuner.export.lora_diffusers import diffusers_loadable, peft_weight_name, write_peft_file
from tuner.export.lora_kohya import write_kohya
from tuner.export.roundtrip import Check, verify_export
from tuner.export.sgm_names import UNetLayout
from tuner.export.state import LoraState, unit_scale
from tuner.trainer import ArtifactFile

logger = logging.getLogger(__name__)

# Which tools load the kohya file of each variant. DoRA (output-axis `dora_scale`, LyCORIS `wd_on_out`):
# diffusers drops `dora_scale` from kohya files and A1111 only applies input-axis DoRA, so neither is listed;
# ComfyUI loads it but normalizes output-axis DoRA by the base weight's norm (close, not exact).
KOHYA_TOOLS = {
    "lora": ["A1111", "ComfyUI", "diffusers", "kohya"],
    "dora": ["ComfyUI", "LyCORIS"],
    "loha": ["A1111", "ComfyUI", "LyCORIS"],
    "lokr": ["A1111", "ComfyUI", "LyCORIS"],
}
# FLUX.1 in kohya's `networks.lora_flux` names (BFL modules, fused qkv / linear1): what ComfyUI, Forge and
# kohya load natively, and diffusers converts on load.
FLUX_KOHYA_FORMAT = "kohya-flux-lora"
# Z-Image in the `diffusion_model.` + kohya-tensor form ComfyUI maps onto its fused qkv (tuner.export.lora_comfy).
COMFY_FORMAT = "comfyui-lora"
# Merging into the weights rounds differently from running the adapter beside them.
MERGE_RTOL = 1e-4
PEFT_TOOLS = {"lora": ["diffusers", "peft"], "dora": ["diffusers", "peft"], "loha": ["peft", "tuner"],
              "lokr": ["peft", "tuner"]}  # fmt: skip


def safe_name(name: str) -> str:
    """A file stem A1111 shows as the LoRA's name: letters, digits, `-`, `_` and `.` only."""
    cleaned = re.sub(r"[^\w.-]+", "_", name.strip()).strip("._")
    if not cleaned:
        raise TunerError(f"output name {name!r}: needs at least one letter or digit")
    return cleaned


def has_conv(state: LoraState) -> bool:
    """Whether any 3x3 (or larger) convolution carries an adapter (LoCon)."""
    for comp in state.components.values():
        for key, tensor in comp.tensors.items():
            if tensor.dim() == 4 and tensor.shape[-1] > 1 and not key.endswith("lora_magnitude_vector"):
                return True
    return False


def uniform_alpha(state: LoraState) -> bool:
    """Whether one alpha serves every module: diffusers' kohya loader (0.42) misapplies per-module alphas on
    attention layers, so a kohya file with an alpha_pattern is exact only in A1111/ComfyUI (and the
    diffusers-format file, which stores the pattern its own way)."""
    alphas = {comp.alpha_of(path) for comp in state.components.values() for path in comp.modules()}
    return len(alphas) <= 1


def file_metadata(
    parts: Any,
    state: LoraState,
    output_name: str,
    resolution: int,
    trigger: str | None,
    training: dict[str, str] | None = None,
    config_json: str | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """(kohya header, diffusers-file header): ss_* keys and ModelSpec in the first, ModelSpec in both."""
    family, prediction = parts.family, parts.prediction_type
    summary = state.summary()
    described = f"{summary['variant']} rank {summary['rank']} alpha {summary['alpha']:g}, trained with tuner"
    spec = md.modelspec(family, prediction, output_name, resolution, trigger, described)
    extra = {"tuner.config": config_json} if config_json else {}
    kohya = {
        **md.sd_version_metadata(family, prediction),
        **md.network_metadata(summary, has_conv(state), module=parts.family.kohya_network_module),
        **(training or {}),
        **({"ss_training_comment": f"trigger: {trigger}"} if trigger else {}),
        **spec,
        **extra,
    }
    return kohya, {**spec, **extra}


def export_lora(
    parts: Any,
    state: LoraState,
    out_dir: str | Path,
    output_name: str,
    resolution: int,
    trigger: str | None = None,
    training: dict[str, str] | None = None,
    config_json: str | None = None,
    verify: bool = True,
) -> tuple[list[ArtifactFile], dict[str, Any]]:
    """Write the peft/diffusers file and the kohya file for `state`, round-trip check both.

    Returns the artifact entries and the round-trip report (max differences per file and component).
    """
    out_dir = Path(out_dir)
    variant = state.variant
    form = parts.family.lora_file_form
    if form != "kohya" and variant == "lora":  # transformer families: ComfyUI reads the diffusers file too
        state = unit_scale(state)
    stem = safe_name(output_name)
    kohya_header, peft_header = file_metadata(parts, state, stem, resolution, trigger, training, config_json)
    peft_path = write_peft_file(state, out_dir / peft_weight_name(variant), peft_header)
    checks = [Check(peft_path, "diffusers" if diffusers_loadable(variant) else "peft")]
    where = str(out_dir)
    peft_load = f'pipe.load_lora_weights("{where}", weight_name="{peft_path.name}")'
    if not diffusers_loadable(variant):
        peft_load = (
            "from tuner.export import load_peft_adapter; "
            f'load_peft_adapter(pipe, "{where}", weight_name="{peft_path.name}")'
        )
    peft_format = f"{'diffusers' if diffusers_loadable(variant) else 'peft'}-{variant}"
    peft_tools = PEFT_TOOLS[variant] + (["ComfyUI"] if form != "kohya" and variant == "lora" else [])
    files = [ArtifactFile(peft_path.name, peft_format, peft_load, peft_tools)]
    if form == "kohya":
        layout = UNetLayout.of(parts.unwrapped(parts.denoiser))  # SDXL files take kohya's SGM module names
        kohya_path = write_kohya(
            state, out_dir / f"{stem}.safetensors", parts.family.text_encoders, kohya_header, layout
        )
        _distinct(kohya_path, peft_path, output_name)
        kohya_in_diffusers = variant == "lora" and uniform_alpha(state)
        if kohya_in_diffusers:
            checks.append(Check(kohya_path, "diffusers"))
        checks.append(Check(kohya_path, "merge", rtol=MERGE_RTOL))
        kohya_load = ""
        if kohya_in_diffusers:
            kohya_load = f'pipe.load_lora_weights("{where}", weight_name="{kohya_path.name}")'
        kohya_tools = [t for t in KOHYA_TOOLS[variant] if t != "diffusers" or kohya_in_diffusers]
        kohya_format = f"kohya-{variant}" if variant in ("lora", "dora") else f"lycoris-{variant}"
        files.append(ArtifactFile(kohya_path.name, kohya_format, kohya_load, kohya_tools))
    elif form == "kohya-flux" and variant == "lora":
        from tuner.export.lora_flux import diffusers_caveats, write_flux_kohya

        flux_path = write_flux_kohya(state, out_dir / f"{stem}.safetensors", kohya_header)
        _distinct(flux_path, peft_path, output_name)
        checks.append(Check(flux_path, "kohya-flux"))
        in_diffusers = not diffusers_caveats(state)  # diffusers' converter knows FLUX.1's own widths only
        if in_diffusers:
            checks.append(Check(flux_path, "diffusers"))
        load = f'pipe.load_lora_weights("{where}", weight_name="{flux_path.name}")' if in_diffusers else ""
        tools = ["ComfyUI", "Forge", "kohya"] + (["diffusers"] if in_diffusers else [])
        files.append(ArtifactFile(flux_path.name, FLUX_KOHYA_FORMAT, load, tools))
    elif form == "comfyui" and variant == "lora":
        files.append(_comfy_file(state, out_dir / f"{stem}.safetensors", kohya_header, peft_path, checks, where))
    report = verify_export(parts, state, checks) if verify else {}
    return files, {"roundtrip": report, **state.summary()}


def _comfy_file(state: LoraState, path: Path, header: dict[str, str], peft_path: Path, checks: list[Check],
                where: str) -> ArtifactFile:  # fmt: skip
    """Z-Image's `diffusion_model.` file (`tuner.export.lora_comfy`), checked as ComfyUI merges it and as
    diffusers converts it."""
    from tuner.export.lora_comfy import comfy_unmapped, write_comfy_lora

    _distinct(path, peft_path, path.stem)
    written = write_comfy_lora(state, path, header)
    checks += [Check(written, "comfyui"), Check(written, "diffusers")]
    unmapped = comfy_unmapped(state)
    if unmapped:
        logger.warning("%s: ComfyUI has no key for %d adapted module(s), e.g. %s", written.name, len(unmapped),
                       unmapped[0])  # fmt: skip
    tools = ["ComfyUI", "diffusers", "musubi-tuner"] if not unmapped else ["diffusers"]
    load = f'pipe.load_lora_weights("{where}", weight_name="{written.name}")'
    return ArtifactFile(written.name, COMFY_FORMAT, load, tools)


def _distinct(second: Path, peft_path: Path, output_name: str) -> None:
    if second == peft_path:
        raise TunerError(f"lora.output_name = {output_name!r} collides with {peft_path.name}; pick another name")
