"""The kohya / A1111 / ComfyUI LoRA file (`lora_unet_...`, `lora_te_...`), with LyCORIS key forms for LoHa/LoKr.

Module names are `<prefix>_<module path with . -> _>` (prefix `lora_unet`, `lora_te` for the single text
encoder of SD1/SD2, `lora_te1`/`lora_te2` for SDXL; text-encoder paths start with `text_model_`). SD1/SD2 UNet
paths are the diffusers ones (kohya trains those on the diffusers UNet); SDXL UNet paths are the original SGM
ones kohya writes (`input_blocks_4_1_...`, `output_blocks_2_2_conv`, see `tuner.export.sgm_names`), which
A1111, ComfyUI and kohya resolve, given the UNet's layout. Reading accepts both forms for every UNet.
Each module carries its true alpha as a float tensor, so `scale = alpha / rank` matches what was trained.
Going back needs the base model's module names, because `_` in a kohya name is ambiguous.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.export.sgm_names import UNetLayout, sgm_path
from tuner.export.state import TEXT_MODEL, ComponentAdapter, LoraState, is_text_encoder, with_text_model

# peft parameter -> kohya/LyCORIS suffix (DoRA's magnitude is handled separately: its shape changes).
LORA_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LYCORIS_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # fmt: skip


def prefixes(num_text_encoders: int) -> dict[str, str]:
    """Component -> kohya prefix (SD1/SD2 have one text encoder: `lora_te`; SDXL: `lora_te1`/`lora_te2`)."""
    return {
        "unet": "lora_unet",
        "text_encoder": "lora_te" if num_text_encoders == 1 else "lora_te1",
        "text_encoder_2": "lora_te2",
    }


def writes_sgm(num_text_encoders: int) -> bool:
    """Whether kohya names this family's UNet by its original SGM paths: SDXL (the UNet family with two text
    encoders); SD1/SD2 keep the diffusers paths, as kohya writes them."""
    return num_text_encoders == 2


def kohya_name(component: str, path: str, num_text_encoders: int, layout: UNetLayout | None = None) -> str:
    """The kohya module name of one module path; UNet paths in SGM form when `layout` is given."""
    if is_text_encoder(component):
        path = with_text_model(path)
    elif component == "unet" and layout is not None:
        original = sgm_path(path, layout)
        if original is None:
            raise TunerError(f"unet module {path!r} has no original (SGM) name; A1111 and kohya could not load it")
        path = original
    return f"{prefixes(num_text_encoders)[component]}_{path.replace('.', '_')}"


def kohya_tensors(
    state: LoraState, num_text_encoders: int, layout: UNetLayout | None = None
) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of `state` (kohya requires contiguous tensors).

    `layout` (the base UNet's, `UNetLayout.of(unet)`) names an SDXL UNet's modules in SGM form; without it, or
    for SD1/SD2, UNet modules keep their diffusers paths."""
    layout = layout if writes_sgm(num_text_encoders) else None
    out: dict[str, torch.Tensor] = {}
    for component, comp in state.components.items():
        for path, params in comp.modules().items():
            name = kohya_name(component, path, num_text_encoders, layout)
            alpha, rank = comp.alpha_of(path), comp.rank_for(path)
            if comp.variant in ("lora", "dora"):
                for peft_name, suffix in LORA_SUFFIXES.items():
                    out[f"{name}.{suffix}"] = params[peft_name]
                if "lora_magnitude_vector" in params:
                    out[f"{name}.dora_scale"] = _dora_scale(params)
            elif comp.variant == "lokr" and "lokr_w1" in params and "lokr_w2" in params:
                # Neither factor is low-rank: LyCORIS then applies no alpha/dim scale, so bake peft's in.
                out[f"{name}.lokr_w1"] = params["lokr_w1"]
                out[f"{name}.lokr_w2"] = params["lokr_w2"] * (alpha / rank)
                alpha = float(rank)
            else:
                out.update({f"{name}.{key}": tensor for key, tensor in params.items() if key in LYCORIS_PARAMS})
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return {key: tensor.contiguous() for key, tensor in out.items()}


def _dora_scale(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """peft's magnitude ((out,) linear, (1, out, 1, 1) conv) as the (out, 1[, 1, 1]) output-axis dora_scale."""
    magnitude = params["lora_magnitude_vector"].flatten()
    return magnitude.reshape(magnitude.shape[0], *[1] * (params["lora_A.weight"].dim() - 1))


def write_kohya(
    state: LoraState,
    path: str | Path,
    num_text_encoders: int,
    metadata: dict[str, str],
    layout: UNetLayout | None = None,
) -> Path:
    """Write the kohya file with `metadata` (see `tuner.export.metadata`) plus its hashes, computed here.

    Give the base UNet's `layout` so an SDXL file names its UNet modules as kohya does (see `kohya_tensors`)."""
    from safetensors.torch import save_file

    from tuner.export.metadata import hash_metadata

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = kohya_tensors(state, num_text_encoders, layout)
    header = {**{k: str(v) for k, v in metadata.items()}, **hash_metadata(tensors, metadata)}
    save_file(tensors, str(path), metadata=header)
    return path


def read_kohya_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TunerError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def is_kohya(keys: list[str]) -> bool:
    return bool(keys) and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def name_table(module_names: dict[str, list[str]], num_text_encoders: int) -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, canonical module path), from the base model's module names.

    UNet modules are listed under both their diffusers and their original SGM names (the layout comes from the
    UNet's own paths), so files of either form, tuner's and kohya's, resolve."""
    table: dict[str, tuple[str, str]] = {}
    for component, paths in module_names.items():
        paths = list(paths)
        for path in paths:
            table[kohya_name(component, path, num_text_encoders)] = (component, path)
        layout = _layout_or_none(paths) if component == "unet" else None
        if layout is not None:
            for path in paths:
                if sgm_path(path, layout) is not None:
                    table[kohya_name(component, path, num_text_encoders, layout)] = (component, path)
    return table


def _layout_or_none(paths: list[str]) -> UNetLayout | None:
    try:
        return UNetLayout.from_paths(paths)
    except TunerError:  # not an SD-style UNet: it has no SGM names
        return None


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`lora_unet_x.lora_down.weight` -> {"lora_unet_x": {"lora_down.weight": ...}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = tensor
    return grouped


def read_kohya(path: str | Path, module_names: dict[str, list[str]], num_text_encoders: int) -> LoraState:
    """Read a kohya/LyCORIS file written for the base model whose module names are given."""
    tensors, header = read_kohya_tensors(path)
    if not is_kohya(list(tensors)):
        raise TunerError(f"{path}: not a kohya LoRA file (keys must start with lora_unet_, lora_te_, lora_te1/2_)")
    table = name_table(module_names, num_text_encoders)
    grouped = group_by_module(tensors)
    unknown = sorted(name for name in grouped if name not in table)
    if unknown:
        raise TunerError(
            f"{path}: {len(unknown)} module(s) do not exist in the base model, e.g. {unknown[:3]}; "
            "is it for another model family or another UNet layout?"
        )
    per_component: dict[str, dict[str, tuple[dict[str, torch.Tensor], int, float]]] = {}
    for name, params in grouped.items():
        component, module_path = table[name]
        peft_params, rank, alpha = _to_peft(name, params)
        per_component.setdefault(component, {})[module_path] = (peft_params, rank, alpha)
    components = {
        component: _component(component, modules, _variant(grouped)) for component, modules in per_component.items()
    }
    return LoraState(components, header)


def _variant(grouped: dict[str, dict[str, torch.Tensor]]) -> str:
    suffixes = {suffix for params in grouped.values() for suffix in params}
    if any(s.startswith("hada_") for s in suffixes):
        return "loha"
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    return "dora" if "dora_scale" in suffixes else "lora"


def _to_peft(name: str, params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, float]:
    """One kohya module -> (peft tensors, rank, alpha)."""
    out: dict[str, torch.Tensor] = {}
    if "lora_down.weight" in params:
        down, up = params["lora_down.weight"], params["lora_up.weight"]
        out = {"lora_A.weight": down, "lora_B.weight": up}
        if "dora_scale" in params:
            scale = params["dora_scale"].flatten()
            out["lora_magnitude_vector"] = scale.reshape(1, -1, 1, 1) if down.dim() == 4 else scale
        rank = down.shape[0]
    elif any(k.startswith("hada_") for k in params):
        if "hada_t1" in params:
            raise TunerError(f"{name}: Tucker-decomposed LoHa (hada_t1) cannot be read back; ComfyUI/A1111 load it")
        out = {k: v for k, v in params.items() if k.startswith("hada_")}
        rank = params["hada_w1_b"].shape[0]
    elif any(k.startswith("lokr_") for k in params):
        if "lokr_w1" not in params or "lokr_t2" in params:
            raise TunerError(f"{name}: this LoKr layout (decomposed w1 or Tucker) cannot be read back into peft")
        out = {k: v for k, v in params.items() if k.startswith("lokr_")}
        # Full w2: scale already baked in (LyCORIS applies none); pick a rank that makes peft keep w2 full.
        rank = params["lokr_w2_b"].shape[0] if "lokr_w2_b" in params else max(params["lokr_w2"].shape[:2])
        if "lokr_w2" in params:
            return out, rank, float(rank)
    else:
        raise TunerError(f"{name}: unrecognized tensors {sorted(params)}")
    alpha = float(params["alpha"].item()) if "alpha" in params else float(rank)
    return out, int(rank), alpha or float(rank)


def _component(component: str, modules: dict[str, tuple[dict[str, torch.Tensor], int, float]], variant: str):
    ranks = Counter(rank for _, rank, _ in modules.values())
    alphas = Counter(alpha for _, _, alpha in modules.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    bare = {path: path[len(TEXT_MODEL) :] if path.startswith(TEXT_MODEL) else path for path in modules}
    config: dict[str, Any] = {
        "r": rank,
        "target_modules": sorted(bare.values()),
        "rank_pattern": {bare[p]: r for p, (_, r, _) in modules.items() if r != rank},
        "alpha_pattern": {bare[p]: a for p, (_, _, a) in modules.items() if a != alpha},
    }
    if variant in ("lora", "dora"):
        config.update(peft_type="LORA", lora_alpha=alpha, use_dora=variant == "dora", init_lora_weights=True)
    else:
        config.update(peft_type=variant.upper(), alpha=alpha, init_weights=True)
    tensors = {f"{path}.{key}": tensor for path, (params, _, _) in modules.items() for key, tensor in params.items()}
    return ComponentAdapter(component, tensors, config)
