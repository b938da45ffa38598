"""Header metadata of exported adapters: kohya's `ss_*` keys, their two hashes, and ModelSpec 1.0.1.

A1111 reads `ss_base_model_version` / `ss_v2` to place a LoRA, `ss_output_name` as its alias and
`sshs_model_hash` as its hash; ModelSpec (`modelspec.*`) describes the file to Stability's and other tools.
All values are strings, as kohya writes them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from datetime import datetime, timezone
from typing import Any

import torch

from tuner.models import Family

SPEC_VERSION = "1.0.1"
LYCORIS_MODULE = "lycoris.kohya"


def base_model_version(family: Family, prediction_type: str) -> str:
    """kohya's `ss_base_model_version`: sd_v1, sd_v2, sd_v1_v, sd_v2_v, sdxl_base_v1-0, flux1, 5-large, ..."""
    if family.kohya_v_suffix and prediction_type == "v_prediction":
        return family.kohya_version + "_v"
    return family.kohya_version


def architecture(family: Family, prediction_type: str, adapter: str = "lora") -> str:
    """`modelspec.architecture`: `<family architecture>/<adapter>` (SD2 epsilon models are the 512 variant)."""
    arch = family.modelspec_architecture
    if family.modelspec_epsilon_architecture and prediction_type == "epsilon":
        arch = family.modelspec_epsilon_architecture
    return f"{arch}/{adapter}"


def implementation(family: Family) -> str:
    """What kohya writes: SD1/SD2 LoRAs follow diffusers module names, SDXL the SGM code, FLUX.1 BFL's."""
    return family.modelspec_implementation


def data_hash(blob: bytes) -> str:
    """sha256 of the tensor section of a serialized safetensors file (everything after the JSON header)."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def legacy_hash(blob: bytes) -> str:
    """kohya's legacy hash: first 8 hex of sha256 of bytes 0x100000..0x110000 of the file."""
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def hash_metadata(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash`, `sshs_legacy_hash` and `modelspec.hash_sha256`, computed as kohya does.

    kohya hashes the bytes of the file as it would be written with only the `ss_*` metadata.
    """
    from safetensors.torch import save

    blob = save(tensors, metadata={k: str(v) for k, v in metadata.items() if k.startswith("ss_")})
    digest = data_hash(blob)
    return {"sshs_model_hash": digest, "sshs_legacy_hash": legacy_hash(blob), "modelspec.hash_sha256": "0x" + digest}


def modelspec(
    family: Family,
    prediction_type: str,
    title: str,
    resolution: int,
    trigger: str | None = None,
    description: str | None = None,
    adapter: str = "lora",
) -> dict[str, str]:
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture(family, prediction_type, adapter),
        "modelspec.implementation": implementation(family),
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    if prediction_type != "flow_matching":  # ModelSpec has no id for flow matching; kohya omits it for Flux
        spec["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else "epsilon"
    if trigger:
        spec["modelspec.trigger_phrase"] = trigger
    if description:
        spec["modelspec.description"] = description
    return spec


def network_metadata(
    summary: dict[str, Any], has_conv: bool, dropout: float | None = None, module: str = "networks.lora"
) -> dict[str, str]:
    """The `ss_network_*` keys: the family's kohya module (networks.lora, networks.lora_flux, ...) for plain
    LoRA/LoCon, lycoris.kohya for DoRA, LoHa and LoKr."""
    variant, rank, alpha = summary["variant"], summary["rank"], summary["alpha"]
    args: dict[str, str] = {}
    if variant != "lora":
        module = LYCORIS_MODULE
        args["algo"] = "lora" if variant == "dora" else variant
        if variant == "dora":
            args.update(dora_wd="True", wd_on_output="True")
    if has_conv:
        args.update(conv_dim=str(rank), conv_alpha=_number(alpha))
    out = {
        "ss_network_module": module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha),
        "ss_network_args": json.dumps(args),
    }
    if dropout is not None:
        out["ss_network_dropout"] = _number(dropout)
    return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def sd_version_metadata(family: Family, prediction_type: str) -> dict[str, str]:
    """The `ss_*` keys kohya writes even with --no_metadata (besides the network ones)."""
    version = base_model_version(family, prediction_type)
    return {
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_base_model_version": version,
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
    }


def training_metadata(config: Any, output_name: str) -> dict[str, str]:
    """`ss_*` training keys from a resolved `RunConfig` (what A1111's metadata viewer shows).

    The base is named as it may be shared: `hub.base_model` or a hub id, never a local path ("a local model").
    """
    from tuner.public import public_base_model

    opt, train, data = config.optimizer, config.train, config.data
    hub_base = getattr(getattr(config, "hub", None), "base_model", None)
    values: dict[str, Any] = {
        "ss_output_name": output_name,
        "ss_sd_model_name": public_base_model(config.model.pretrained_model_name_or_path, hub_base),
        "ss_training_finished_at": time.time(),
        "ss_learning_rate": opt.learning_rate,
        "ss_unet_lr": opt.learning_rate,
        "ss_text_encoder_lr": opt.text_encoder_lr if opt.text_encoder_lr is not None else opt.learning_rate,
        "ss_optimizer": opt.name,
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": opt.lr_warmup_steps,
        "ss_max_train_steps": train.max_train_steps,
        "ss_steps": train.max_train_steps,
        "ss_batch_size_per_device": train.train_batch_size,
        "ss_gradient_accumulation_steps": train.gradient_accumulation_steps,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_mixed_precision": train.mixed_precision,
        "ss_seed": train.seed,
        "ss_noise_offset": train.noise_offset or None,
        "ss_min_snr_gamma": train.snr_gamma,
        "ss_resolution": f"({data.resolution}, {data.resolution})",
        "ss_enable_bucket": data.enable_bucket,
        "ss_caption_dropout_rate": data.caption_dropout_rate,
        "ss_prior_loss_weight": data.prior_loss_weight,
    }
    return {key: str(value) for key, value in values.items() if value is not None}
