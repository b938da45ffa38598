"""The FLUX.1 LoRA file in kohya's `networks.lora_flux` form: BFL module names, fused qkv and `linear1`.

ComfyUI, Forge and kohya load it natively; diffusers converts it on load (`FluxLoraLoaderMixin`). Names are
`lora_unet_` + the BFL module path with `.` -> `_` (`lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1`, `lora_unet_img_in`, ...) and `lora_te1_text_model_...` for CLIP-L.

BFL fuses what diffusers keeps apart: `img_attn.qkv` = `attn.to_q/to_k/to_v`, `txt_attn.qkv` =
`attn.add_q/k/v_proj`, `linear1` = the single block's `attn.to_q/to_k/to_v` + `proj_mlp`. A fused module's
`lora_down` stacks the parts' downs and its `lora_up` is block-diagonal, so each part keeps its own rank and
no loader sees another part's update; a part that was not trained gets zero rows. Every module carries its
alpha/rank scale in `lora_up` and `alpha` = its rank, so each loader's alpha/rank is 1 whatever rank it divides
by (the fused rank is the sum of the parts': sd-scripts #2204). BFL's final `adaLN_modulation.1` orders its
output (shift, scale), diffusers' `norm_out.linear` (scale, shift): the up rows are swapped going across.

Plain LoRA only: DoRA, LoHa and LoKr have no fused form here; the diffusers file carries them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from tuner.errors import TunerError
from tuner.export.lora_kohya import _component, group_by_module, read_kohya_tensors
from tuner.export.state import TEXT_MODEL, LoraState, with_text_model

logger = logging.getLogger(__name__)

UNET = "lora_unet_"
CLIP_L = "lora_te1_"
# diffusers module inside `transformer_blocks.{i}` -> (BFL module inside `double_blocks.{i}`, part index).
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.net.0.proj": ("img_mlp.0", 0),
    "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0),
    "ff_context.net.2": ("txt_mlp.2", 0),
    "norm1.linear": ("img_mod.lin", 0),
    "norm1_context.linear": ("txt_mod.lin", 0),
}
# diffusers module inside `single_transformer_blocks.{i}` -> (BFL module inside `single_blocks.{i}`, part index).
SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation.lin", 0),
}
# Modules outside the blocks. ComfyUI, Forge and kohya load them; diffusers 0.42 converts them without the
# `transformer.` prefix and then discards them without a word (formats.md §9.2): see `diffusers_caveats`.
GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL, (scale, shift) in diffusers
# Output rows of each part of a fused module, as multiples of its input width (FLUX.1's MLP ratio is 4).
FUSED_WIDTHS = {"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}
# diffusers' converter splits `linear1` at FLUX.1's own widths, whatever the file holds.
DIFFUSERS_LINEAR1_WIDTH = 3072
CLIP_MODULE = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])")
BLOCK_PATH = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
BLOCK_NAME = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)")
PLAIN_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}


def bfl_module(path: str) -> tuple[str, int]:
    """diffusers FLUX.1 transformer module path -> (BFL module path, part index within a fused module)."""
    if path in GLOBAL:
        return GLOBAL[path], 0
    found = BLOCK_PATH.fullmatch(path)
    if found:
        kind, index, inner = found.groups()
        table, bfl_kind = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        if inner in table:
            module, part = table[inner]
            return f"{bfl_kind}.{index}.{module}", part
    raise TunerError(
        f"transformer module {path!r} has no counterpart in the BFL FLUX.1 layout (allowed: the Linear layers of "
        f"transformer_blocks.N ({', '.join(DOUBLE)}), single_transformer_blocks.N ({', '.join(SINGLE)}) and "
        f"{', '.join(GLOBAL)})"
    )


def fused_widths(bfl: str) -> tuple[int, ...] | None:
    """Output rows of each part of a fused BFL module (multiples of its input width); None if not fused."""
    if bfl.startswith(("double_blocks.", "single_blocks.")):
        return FUSED_WIDTHS.get(bfl.split(".", 2)[2])
    return None


def diffusers_parts(bfl: str) -> tuple[str, ...]:
    """BFL module path -> the diffusers module paths it holds, in the order of its output rows."""
    if bfl in GLOBAL.values():
        return tuple(path for path, module in GLOBAL.items() if module == bfl)
    kind, index, inner = bfl.split(".", 2)
    table, diff_kind = (
        (DOUBLE, "transformer_blocks") if kind == "double_blocks" else (SINGLE, "single_transformer_blocks")
    )
    parts = sorted((part, path) for path, (module, part) in table.items() if module == inner)
    return tuple(f"{diff_kind}.{index}.{path}" for _, path in parts)


def _bfl_from_name(name: str) -> str | None:
    """`lora_unet_...` name (without the prefix) -> BFL module path, or None if it is none of FLUX.1's."""
    by_name = {module.replace(".", "_"): module for module in GLOBAL.values()}
    if name in by_name:
        return by_name[name]
    found = BLOCK_NAME.fullmatch(name)
    if not found:
        return None
    kind, index, inner = found.groups()
    table = DOUBLE if kind == "double_blocks" else SINGLE
    modules = {module.replace(".", "_"): module for module, _ in table.values()}
    return f"{kind}.{index}.{modules[inner]}" if inner in modules else None


def flux_kohya_name(component: str, path: str) -> str:
    """The kohya module name of one adapted module (fused parts share their BFL module's name)."""
    if component == "transformer":
        return UNET + bfl_module(path)[0].replace(".", "_")
    if component == "text_encoder":
        return CLIP_L + with_text_model(path).replace(".", "_")
    raise TunerError(
        f"component {component!r}: the kohya FLUX.1 file holds the transformer and CLIP-L (text_encoder) only"
    )


def _require_plain(state: LoraState) -> None:
    for name, comp in state.components.items():
        if comp.variant != "lora":
            raise TunerError(
                f"{name} adapter is {comp.variant}: the kohya FLUX.1 form (networks.lora_flux) supports plain LoRA "
                "only; the diffusers file carries DoRA, LoHa and LoKr"
            )


def flux_kohya_tensors(state: LoraState) -> dict[str, torch.Tensor]:
    """The kohya FLUX.1 tensors of a plain-LoRA `state`: fused where BFL fuses, scale baked in, alpha = rank."""
    _require_plain(state)
    # kohya name -> part index -> (down, up with alpha/rank applied)
    grouped: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused_of: dict[str, str] = {}
    for component, comp in state.components.items():
        for path, params in comp.modules().items():
            name = flux_kohya_name(component, path)
            part = 0
            if component == "transformer":
                bfl, part = bfl_module(path)
                fused_of[name] = bfl
            down, up = params["lora_A.weight"], params["lora_B.weight"]
            if down.dim() != 2:
                raise TunerError(f"{component} module {path}: FLUX.1 adapts Linear layers only (got {down.dim()}-d)")
            scale = comp.alpha_of(path) / comp.rank_for(path)
            grouped.setdefault(name, {})[part] = (down, (up.float() * scale).to(up.dtype))
    out: dict[str, torch.Tensor] = {}
    for name, parts in grouped.items():
        bfl = fused_of.get(name, "")
        widths = fused_widths(bfl)
        if widths:
            down, up = _fuse(name, parts, widths)
        else:
            down, up = parts[0]
            if bfl == SWAPPED:
                up = _swap_halves(up)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    return {key: tensor.contiguous() for key, tensor in out.items()}


def _fuse(
    name: str, parts: dict[int, tuple[torch.Tensor, torch.Tensor]], widths: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked downs and the block-diagonal up of one fused module; absent parts get zero rows."""
    in_widths = {down.shape[1] for down, _ in parts.values()}
    if len(in_widths) != 1:
        raise TunerError(f"{name}: its parts take different input widths {sorted(in_widths)}")
    width = in_widths.pop()
    rows = [w * width for w in widths]
    for index, (_, up) in parts.items():
        if up.shape[0] != rows[index]:
            raise TunerError(
                f"{name}: part {index} has {up.shape[0]} output rows, the FLUX.1 layout wants {rows[index]} "
                f"(input width {width})"
            )
    order = sorted(parts)
    down = torch.cat([parts[i][0] for i in order], dim=0)
    reference = parts[order[0]][1]
    up = torch.zeros(sum(rows), down.shape[0], dtype=reference.dtype)
    col = 0
    for i in order:
        block = parts[i][1]
        start = sum(rows[:i])
        up[start : start + rows[i], col : col + block.shape[1]] = block
        col += block.shape[1]
    return down, up


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_caveats(state: LoraState) -> list[str]:
    """What diffusers 0.42's kohya-FLUX converter does not load exactly from this state's file (empty: all).

    ComfyUI, Forge and kohya load every module; diffusers discards the modules outside the blocks and splits
    `linear1` at FLUX.1's widths only, so a diffusers round-trip check of such a file cannot match.
    """
    comp = state.components.get("transformer")
    if comp is None:
        return []
    notes = []
    outside = sorted(path for path in comp.modules() if path in GLOBAL)
    if outside:
        notes.append(f"diffusers discards the modules outside the blocks: {', '.join(outside)}")
    widths = {
        params["lora_A.weight"].shape[1]
        for path, params in comp.modules().items()
        if path not in GLOBAL and bfl_module(path)[0].endswith(".linear1")
    }
    if widths - {DIFFUSERS_LINEAR1_WIDTH}:
        notes.append(
            f"diffusers splits single_blocks linear1 at FLUX.1's width {DIFFUSERS_LINEAR1_WIDTH} and fails on "
            f"width {sorted(widths)[0]}"
        )
    return notes


def write_flux_kohya(state: LoraState, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the kohya FLUX.1 file with `metadata` (ModelSpec, `ss_*`) plus its hashes, computed here."""
    from safetensors.torch import save_file

    from tuner.export.metadata import hash_metadata

    path = Path(path)
    tensors = flux_kohya_tensors(state)
    for note in diffusers_caveats(state):
        logger.warning("%s: %s (ComfyUI, Forge and kohya load them)", path.name, note)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**{k: str(v) for k, v in metadata.items()}, **hash_metadata(tensors, metadata)}
    save_file(tensors, str(path), metadata=header)
    return path


def read_flux_kohya(path: str | Path, module_paths: dict[str, list[str]] | None = None) -> LoraState:
    """Read a kohya FLUX.1 LoRA file back into a `LoraState` (see `flux_state_from_tensors`)."""
    tensors, header = read_kohya_tensors(path)
    return flux_state_from_tensors(tensors, header, module_paths, source=str(path))


def flux_state_from_tensors(
    tensors: dict[str, torch.Tensor],
    header: dict[str, str] | None = None,
    module_paths: dict[str, list[str]] | None = None,
    source: str = "LoRA",
) -> LoraState:
    """kohya FLUX.1 tensors -> `LoraState` with diffusers module paths, each module's loaded effect kept exactly.

    A fused module whose up is block-diagonal splits into its parts with their own ranks (parts whose rows
    are all zero are left out); otherwise (kohya's unsplit qkv) every part shares the whole down. The scale
    each loader applies (alpha / rows of the fused down) is kept per part. `module_paths` (component ->
    module paths of the base model) is optional and only checks that every module exists there.
    """
    per_component: dict[str, dict[str, tuple[dict[str, torch.Tensor], int, float]]] = {}
    for name, params in group_by_module(tensors).items():
        extra = set(params) - PLAIN_SUFFIXES
        if extra or "lora_down.weight" not in params or "lora_up.weight" not in params:
            raise TunerError(
                f"{source}: module {name} holds {sorted(params)}; the kohya FLUX.1 form is read as plain LoRA "
                "(lora_down, lora_up, alpha) only"
            )
        down, up = params["lora_down.weight"], params["lora_up.weight"]
        alpha = float(params["alpha"].item()) if "alpha" in params else float(down.shape[0])
        alpha = alpha or float(down.shape[0])
        if name.startswith(UNET):
            bfl = _bfl_from_name(name[len(UNET) :])
            if bfl is None:
                raise TunerError(f"{source}: {name} is not a module of FLUX.1 (BFL names, lora_unet_...)")
            modules = per_component.setdefault("transformer", {})
            modules.update(_split(name, bfl, down, up, alpha))
        elif name.startswith((CLIP_L, "lora_te_")):
            found = CLIP_MODULE.fullmatch(name.split("_", 2)[2])
            if not found:
                raise TunerError(f"{source}: {name} is not a CLIP-L module (lora_te1_text_model_encoder_layers_..)")
            layer, module = found.groups()
            module = module.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            path = f"{TEXT_MODEL}encoder.layers.{layer}.{module}"
            per_component.setdefault("text_encoder", {})[path] = _plain(down, up, alpha)
        elif name.startswith(("lora_te2_", "lora_te3_")):
            raise TunerError(f"{source}: {name} adapts T5, which tuner does not train and diffusers does not load")
        else:
            raise TunerError(f"{source}: {name} is neither lora_unet_ (FLUX.1) nor lora_te1_ (CLIP-L)")
    if not per_component:
        raise TunerError(f"{source}: holds no LoRA modules")
    if module_paths is not None:
        _check_exist(per_component, module_paths, source)
    components = {component: _component(component, modules, "lora") for component, modules in per_component.items()}
    for comp in components.values():
        _anchor_patterns(comp.config)
    return LoraState(components, dict(header or {}))


def _anchor_patterns(config: dict) -> None:
    """`proj_out` (the final projection) as a rank/alpha pattern would also match every single block's
    `proj_out` (peft matches `(.*\\.)?(key)$`); anchor such keys with `^` so they name one module only."""
    paths = config["target_modules"]
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config[key]
        for bare in list(pattern):
            if any(other != bare and other.endswith("." + bare) for other in paths):
                pattern["^" + bare] = pattern.pop(bare)


def _plain(down: torch.Tensor, up: torch.Tensor, alpha: float) -> tuple[dict[str, torch.Tensor], int, float]:
    return {"lora_A.weight": down.contiguous(), "lora_B.weight": up.contiguous()}, int(down.shape[0]), alpha


def _split(
    name: str, bfl: str, down: torch.Tensor, up: torch.Tensor, alpha: float
) -> dict[str, tuple[dict[str, torch.Tensor], int, float]]:
    """One kohya module -> its diffusers modules (peft tensors, rank, alpha)."""
    paths = diffusers_parts(bfl)
    if len(paths) == 1:
        return {paths[0]: _plain(down, _swap_halves(up) if bfl == SWAPPED else up, alpha)}
    width = down.shape[1]
    rows = [w * width for w in fused_widths(bfl) or ()]
    if sum(rows) != up.shape[0]:
        raise TunerError(f"{name}: lora_up has {up.shape[0]} rows, FLUX.1 wants {sum(rows)} for input width {width}")
    row_blocks = up.split(rows, dim=0)
    owners = _column_owners(row_blocks)
    total = down.shape[0]
    out = {}
    for index, (path, block) in enumerate(zip(paths, row_blocks)):
        if owners is None:  # dense up: every part reads the whole down
            out[path] = _plain(down, block, alpha)
            continue
        cols = [c for c, owner in enumerate(owners) if owner == index]
        if cols:
            picked = torch.tensor(cols)
            out[path] = _plain(down[picked], block[:, picked], alpha * len(cols) / total)
    return out


def _column_owners(row_blocks: tuple[torch.Tensor, ...]) -> list[int] | None:
    """Which part owns each rank column of a block-diagonal up, or None if some column feeds two parts."""
    used = [(block != 0).any(dim=0) for block in row_blocks]
    if sum(int(u.any()) for u in used) == 0 or bool((torch.stack(used).sum(dim=0) > 1).any()):
        return None
    owners: list[int] = []
    current = next(i for i, u in enumerate(used) if u.any())
    for col in range(used[0].shape[0]):
        current = next((i for i, u in enumerate(used) if u[col]), current)  # an all-zero column joins its left part
        owners.append(current)
    return owners


def _check_exist(
    per_component: dict[str, dict[str, tuple[dict[str, torch.Tensor], int, float]]],
    module_paths: dict[str, list[str]],
    source: str,
) -> None:
    for component, modules in per_component.items():
        known = {with_text_model(p) if component == "text_encoder" else p for p in module_paths.get(component, [])}
        missing = sorted(path for path in modules if path not in known)
        if missing:
            raise TunerError(
                f"{source}: {len(missing)} {component} module(s) do not exist in the base model, e.g. "
                f"{missing[:3]}; is it for another FLUX variant or size?"
            )


def module_deltas(state: LoraState) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module path) -> the weight update B @ A * alpha / rank (fp32) of a plain-LoRA state.

    The exact measure of a conversion here: fusing and splitting change ranks and scales, never the deltas.
    """
    _require_plain(state)
    out = {}
    for component, comp in state.components.items():
        for path, params in comp.modules().items():
            scale = comp.alpha_of(path) / comp.rank_for(path)
            out[(component, path)] = params["lora_B.weight"].float() @ params["lora_A.weight"].float() * scale
    return out
