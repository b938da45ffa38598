"""VAE export formats: the A1111/ComfyUI single file (original LDM key names) and the reload check of both.

The diffusers folder is `AutoencoderKL.save_pretrained`'s; this module adds the single file, written as the
exact inverse of diffusers' `convert_ldm_vae_checkpoint`, and `check_round_trip`, which loads the folder and
the single file through diffusers' own loaders and requires them to decode a fixed latent as the trained
VAE does. A rename that drops or misplaces one tensor fails the run here, not in the user's UI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError

ROUND_TRIP_TOLERANCE = 1e-5
"""Largest |difference| allowed between the trained VAE and a reloaded export (exactly 0 on CPU in fp32;
the margin is for GPU kernels that may pick another algorithm for the reloaded copy)."""

_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def to_ldm_vae_state_dict(state_dict: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """Rename an `AutoencoderKL` state dict to the LDM layout (`encoder.down.0.block.0.norm1.weight`, ...).

    LDM numbers decoder up blocks from the bottom (`up.0` is the last diffusers block), calls the resnet
    shortcut `nin_shortcut`, and stores the mid-block attention projections as 1x1 convolutions.
    """

    def up(index: str) -> int:
        return num_up_blocks - 1 - int(index)

    rules: list[tuple[str, str | Callable[[re.Match], str]]] = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{up(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    ]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = key
        for pattern, replacement in rules:
            new, hits = re.subn(pattern, replacement, new)
            if hits:
                break
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            head, _, tail = new.partition(".mid.attn_1.")
            name, _, param = tail.rpartition(".")
            new = f"{head}.mid.attn_1.{_ATTENTION_NAMES.get(name, name)}.{param}"
            if param == "weight" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        if new in out:
            raise TunerError(f"VAE single-file export: two tensors map to the LDM key {new!r} (second: {key!r})")
        out[new] = tensor.detach().to("cpu").contiguous()
    return out


def save_single_file(vae: Any, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `vae` (an `AutoencoderKL`) as one safetensors file with LDM key names, loadable by A1111/ComfyUI."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = to_ldm_vae_state_dict(vae.state_dict(), len(vae.config.up_block_types))
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def check_round_trip(vae: Any, folder: str | Path, single: str | Path | None = None, device: Any = None) -> float:
    """Reload the folder (and the single file, configured by the folder) with diffusers' loaders and decode a
    fixed latent with each; returns the largest |difference| from `vae`, or raises TunerError naming the file."""
    from diffusers import AutoencoderKL

    device = device or vae.device
    dtype = vae.decoder.conv_in.weight.dtype
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    with torch.no_grad():
        expected = vae.decode(latents).sample.float()
    loaders: dict[str, Callable[[], Any]] = {
        str(folder): lambda: AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    }
    if single is not None:
        loaders[str(single)] = lambda: AutoencoderKL.from_single_file(
            str(single), config=str(folder), torch_dtype=dtype
        )
    worst = 0.0
    for path, load in loaders.items():
        try:
            reloaded = load().to(device).eval()
        except Exception as exc:  # noqa: BLE001 - any loader failure is an unusable export
            raise TunerError(f"export check failed: diffusers cannot load {path} ({exc})") from exc
        with torch.no_grad():
            got = reloaded.decode(latents).sample.float()
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else math.inf
        if not diff <= ROUND_TRIP_TOLERANCE:
            raise TunerError(
                f"export check failed: {path}, reloaded, decodes a fixed latent differently from the trained VAE "
                f"(max |difference| = {diff:.3g}, allowed {ROUND_TRIP_TOLERANCE:g}); the file is not usable"
            )
        worst = max(worst, diff)
    return worst
