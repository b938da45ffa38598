"""Apply a kohya/LyCORIS file to a model's weights the way A1111, ComfyUI and LyCORIS do, independently of peft.

Used to check that exported kohya files mean, under those tools' math, what was trained (LoRA/LoCon:
`up @ down * alpha / rank`; LoHa: `(w1a @ w1b) * (w2a @ w2b) * alpha / rank`; LoKr: `kron(w1, w2)` times
`alpha / dim` when a factor is low-rank, else 1; DoRA: the merged weight rescaled per output row to
`dora_scale`, LyCORIS' `wd_on_out`), and to fuse LoHa/LoKr/DoRA kohya files, which diffusers cannot load.
A quantized base (`model.quantize`, a pre-quantized checkpoint) is refused: its weights cannot hold the delta.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.export.lora_kohya import group_by_module, name_table, read_kohya_tensors
from tuner.export.state import COMPONENTS, module_paths
from tuner.quantize import refuse_merge


def module_delta(params: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The weight delta of one module, in fp32, shaped like the weight it applies to."""
    p = {k: v.float() for k, v in params.items()}
    alpha = p["alpha"].item() if "alpha" in p else None
    if "lora_down.weight" in p:
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        dim = down.shape[0]
        delta = up.flatten(1) @ down.flatten(1)
    elif "hada_w1_a" in p:
        if "hada_t1" in p:
            raise TunerError("Tucker-decomposed LoHa (hada_t1) is not supported")
        dim = p["hada_w1_b"].shape[0]
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    elif "lokr_w1" in p or "lokr_w1_a" in p:
        if "lokr_t2" in p:
            raise TunerError("Tucker-decomposed LoKr (lokr_t2) is not supported")
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p.get("lokr_w2")
        if w2 is None:
            dim, w2 = p["lokr_w2_b"].shape[0], p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    else:
        raise TunerError(f"unrecognized adapter tensors {sorted(params)}")
    scale = alpha / dim if alpha and dim else 1.0
    return delta.reshape(shape) * scale


def merged_weight(params: dict[str, torch.Tensor], weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The module's new weight (fp32): `weight + strength * delta`, or DoRA's rescaled merge."""
    base = weight.float()
    merged = base + module_delta(params, weight.shape)
    if "dora_scale" in params:
        scale = params["dora_scale"].float()
        if scale.shape[0] != weight.shape[0] or scale.numel() != weight.shape[0]:
            raise TunerError(f"dora_scale of shape {tuple(scale.shape)}: only output-axis DoRA is supported")
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(scale.shape)
        merged = merged * (scale / norm)
    return base + strength * (merged - base)


def apply_kohya(pipe: Any, source: str | Path | dict[str, torch.Tensor], scale: float = 1.0) -> int:
    """Merge a kohya/LyCORIS file (or its tensors) into `pipe`'s weights at `scale`; returns the module count."""
    tensors = source if isinstance(source, dict) else read_kohya_tensors(source)[0]
    path = "adapter" if isinstance(source, dict) else source
    num_te = sum(1 for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None)
    for component in COMPONENTS:
        if getattr(pipe, component, None) is not None:
            refuse_merge(getattr(pipe, component), f"merging {path} into {component}")
    live = {c: module_paths(getattr(pipe, c), c) for c in COMPONENTS if getattr(pipe, c, None) is not None}
    # Both UNet name forms (diffusers paths, and the SGM paths kohya writes for SDXL), as A1111/ComfyUI accept.
    names = name_table({c: list(paths) for c, paths in live.items()}, num_te)
    table = {name: live[component][module] for name, (component, module) in names.items()}
    grouped = group_by_module(tensors)
    missing = sorted(name for name in grouped if name not in table)
    if missing:
        raise TunerError(f"{path}: {len(missing)} module(s) not in this pipeline, e.g. {missing[:3]}")
    return merge_into(grouped, table, scale)


def merge_into(grouped: dict[str, dict[str, torch.Tensor]], modules: dict[str, Any], scale: float) -> int:
    """Give each grouped module a new weight, its old one plus the LoRA delta; returns the module count.

    The old tensor is replaced, never written to: the round-trip check's pipelines share their frozen base tensors
    with the model as trained (`roundtrip.stock_parts`)."""
    with torch.no_grad():
        for name, params in grouped.items():
            module = modules[name]
            merged = merged_weight(params, module.weight, scale).to(module.weight.dtype)
            module.weight = torch.nn.Parameter(merged, requires_grad=module.weight.requires_grad)
    return len(grouped)
