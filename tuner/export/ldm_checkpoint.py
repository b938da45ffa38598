"""Write a trained SD1.x / SD2.x / SDXL pipeline as one A1111 / Forge / ComfyUI checkpoint, and check it.

`save_checkpoint` renames a diffusers UNet, VAE and text encoders to the original LDM / SGM key names (the exact
inverse of diffusers' converters) and stores the component configs as `tuner.diffusers_config`, so the suite
(`tuner.single_file`) reads its own files back exactly; `check_checkpoint` loads the file through
`UNet2DConditionModel.from_single_file` and compares outputs with the trained UNet.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.single_file import (
    CLIP_PREFIX,
    CONFIG_KEY,
    OPEN_CLIP_PREFIX,
    PIPELINE_CLASS,
    ROUND_TRIP_TOLERANCE,
    UNET_PREFIX,
    VAE_PREFIX,
    _write_config_folder,
    recognize,
)

_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def to_ldm_unet_state_dict(state_dict: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename a `UNet2DConditionModel` state dict to the LDM / SGM layout (`input_blocks.4.1.proj_in.weight`,
    ...), the inverse of diffusers' `convert_ldm_unet_checkpoint` for any depth and layers per block."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise TunerError(f"single-file export: layers_per_block {per!r} per block is not supported")
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]

    def rename(key: str) -> str:
        for old, new in _UNET_TOP.items():
            if key.startswith(old + "."):
                return new + key[len(old) :]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            return f"input_blocks.{1 + i * (per + 1) + j}.{0 if kind == 'resnets' else 1}.{_inner(kind, rest)}"
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
        if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            return f"output_blocks.{i * (per + 1) + j}.{0 if kind == 'resnets' else 1}.{_inner(kind, rest)}"
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            i = int(m[1])
            return f"output_blocks.{i * (per + 1) + per}.{2 if up_attn[i] else 1}.{m[2]}"
        if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, j, rest = m[1], int(m[2]), m[3]
            return f"middle_block.{2 * j if kind == 'resnets' else 1}.{_inner(kind, rest)}"
        raise TunerError(f"single-file export: no LDM name for the UNet tensor {key!r}")

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = rename(key)
        if new in out:
            raise TunerError(f"single-file export: two UNet tensors map to {new!r} (second: {key!r})")
        out[new] = tensor
    return out


def _inner(kind: str, rest: str) -> str:
    if kind != "resnets":
        return rest  # transformer blocks keep their names (norm, proj_in, transformer_blocks.N.attn1.to_q, ...)
    name, _, param = rest.partition(".")
    return f"{_RESNET_NAMES.get(name, name)}.{param}"


def to_ldm_clip_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An HF `CLIPTextModel` under `prefix` with `text_model.` names (SD1's and SDXL's first encoder)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    return out


_OPEN_CLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


def to_open_clip_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP text model in OpenCLIP names under `prefix` (SD2's encoder, SDXL's second): q/k/v fused into
    `attn.in_proj_*`, `text_projection` stored transposed; the inverse of `convert_open_clip_checkpoint`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".", 1)[1]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = tensor
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            name = _OPEN_CLIP_NAMES.get(m[2])
            if name is None:
                raise TunerError(f"single-file export: no OpenCLIP name for the text encoder tensor {key!r}")
            out[f"{prefix}transformer.resblocks.{m[1]}.{name}.{m[3]}"] = tensor
        else:
            raise TunerError(f"single-file export: no OpenCLIP name for the text encoder tensor {key!r}")
    for (layer, param), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def checkpoint_state_dict(family: str, unet: Any, vae: Any, text_encoders: list[Any]) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint of `family` in the original LDM / SGM key names."""
    from tuner.export.vae import to_ldm_vae_state_dict

    tensors = {UNET_PREFIX + k: v for k, v in to_ldm_unet_state_dict(unet.state_dict(), unet.config).items()}
    vae_state = to_ldm_vae_state_dict(vae.state_dict(), len(vae.config.up_block_types))
    tensors.update({VAE_PREFIX + k: v for k, v in vae_state.items()})
    if family == "sd1":
        tensors.update(to_ldm_clip_state_dict(text_encoders[0].state_dict(), CLIP_PREFIX["sd1"]))
    elif family == "sd2":
        tensors.update(to_open_clip_state_dict(text_encoders[0].state_dict(), OPEN_CLIP_PREFIX["sd2"]))
    elif family == "sdxl":
        tensors.update(to_ldm_clip_state_dict(text_encoders[0].state_dict(), CLIP_PREFIX["sdxl"]))
        tensors.update(to_open_clip_state_dict(text_encoders[1].state_dict(), OPEN_CLIP_PREFIX["sdxl"]))
    else:
        raise TunerError(f"single-file export: family {family!r} is not supported (sd1, sd2, sdxl)")
    return tensors


def _family_name(parts: Any) -> str:
    """sd1 / sd2 / sdxl (a part set made from a loaded StableDiffusionPipeline says sd1 for both SD1 and SD2)."""
    name = parts.family.name
    unet_config = parts.unwrapped(parts.denoiser).config
    if name == "sd1" and (unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024):
        return "sd2"
    return name


def diffusers_configs(parts: Any) -> dict[str, Any]:
    """The component configs a reader needs to rebuild the exact models (stored as `tuner.diffusers_config`)."""
    family = _family_name(parts)
    configs: dict[str, Any] = {
        "_class_name": PIPELINE_CLASS[family],
        "unet": dict(parts.unwrapped(parts.denoiser).config),
        "vae": dict(parts.vae.config),
        "scheduler": {
            "_class_name": type(parts.sample_scheduler or parts.noise_scheduler).__name__,
            **dict((parts.sample_scheduler or parts.noise_scheduler).config),
        },  # fmt: skip
    }
    configs["scheduler"]["prediction_type"] = parts.prediction_type
    for name, encoder in parts.text_encoder_modules().items():
        config = parts.unwrapped(encoder).config.to_dict()
        configs[name] = {k: v for k, v in config.items() if k not in ("architectures", "_name_or_path", "dtype",
                                                                       "transformers_version")}  # fmt: skip
    for value in configs.values():  # where the base was loaded from is a local path: it stays home
        if isinstance(value, dict):
            value.pop("_name_or_path", None)
    return json.loads(json.dumps(configs, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_checkpoint(parts: Any, path: str | Path, dtype: torch.dtype, metadata: dict[str, str] | None = None) -> Path:
    """Write the parts (trained UNet, VAE, text encoders) as one A1111/Forge/ComfyUI checkpoint in `dtype`."""
    from safetensors.torch import save_file

    family = _family_name(parts)
    if family not in PIPELINE_CLASS:
        raise TunerError(f"dreambooth.save_format: a single-file checkpoint of {family} is not supported (sd1, sd2, "
                         "sdxl); use save_format = 'pipeline'")  # fmt: skip
    encoders = [parts.unwrapped(e) for e in parts.text_encoders]
    tensors = checkpoint_state_dict(family, parts.unwrapped(parts.denoiser), parts.vae, encoders)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", CONFIG_KEY: json.dumps(diffusers_configs(parts)), **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def check_checkpoint(unet: Any, path: str | Path, dtype: torch.dtype) -> float:
    """Load the checkpoint's UNet through diffusers' `UNet2DConditionModel.from_single_file` (offline, config
    from the file's metadata) and compare its output on a fixed input with the trained UNet's; returns the
    relative max |difference|, or raises TunerError naming the file."""
    from diffusers import UNet2DConditionModel

    configs = recognize(path).configs
    with tempfile.TemporaryDirectory(prefix="tuner-single-file-config-") as config_dir:
        _write_config_folder(Path(config_dir), configs)
        try:
            reloaded = UNet2DConditionModel.from_single_file(
                str(path), config=config_dir, subfolder="unet", local_files_only=True, torch_dtype=torch.float32
            ).eval()
        except Exception as exc:  # noqa: BLE001 - any loader failure is an unusable export
            raise TunerError(f"export check failed: diffusers cannot load {path} ({exc})") from exc
    config = unet.config
    first = next(unet.parameters())
    device, unet_dtype = first.device, first.dtype
    reloaded.to(device, unet_dtype)  # the same device and dtype run the same kernels (GPU TF32 convs included)
    gen = torch.Generator().manual_seed(0)
    size = 8
    sample = torch.randn(1, config.in_channels, size, size, generator=gen)
    context = torch.randn(1, 7, config.cross_attention_dim, generator=gen)
    kwargs: dict[str, Any] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}  # fmt: skip
    to = lambda x: x.to(device, unet_dtype)  # noqa: E731
    sample, context, t = to(sample), to(context), torch.tensor([500], device=device)
    kwargs = {k: {n: to(v) for n, v in d.items()} for k, d in kwargs.items()}
    training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            expected = unet(sample, t, context, **kwargs).sample.float()
            got = reloaded(sample, t, context, **kwargs).sample.float()
    finally:
        unet.train(training)
        del reloaded
    diff = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
    allowed = ROUND_TRIP_TOLERANCE.get(dtype, 1e-1)
    if not diff <= allowed:
        raise TunerError(
            f"export check failed: {path}, reloaded through diffusers' from_single_file, predicts differently from "
            f"the trained UNet (relative max |difference| {diff:.3g}, allowed {allowed:g} in {dtype}); the file is "
            "not usable"
        )
    return diff
