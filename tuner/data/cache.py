"""On-disk cache of VAE latents and text-encoder outputs, as safetensors files keyed by everything they depend on.

Latent keys: image content hash + VAE identity (source, revision, config, a weight fingerprint, dtype) +
transform (bucket, resize, crop box, flip) + cache mode. Text keys: caption + text-encoder identity. Any
change gives a new key, so stale entries are never read; files are written atomically, so concurrent ranks
and interrupted runs leave no half files.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuner.config import RunConfig
from tuner.errors import DataError


def digest(value: Any) -> str:
    """sha256 of a JSON-able value (sorted keys), the cache's key function."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _public_config(module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("transformers_version", "dtype")}


def fingerprint(module: torch.nn.Module, samples: int = 256) -> str:
    """Hash of names, shapes and a strided sample of every tensor: catches changed weights without reading all."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(flat[::step][:samples].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def vae_identity(config: RunConfig, parts) -> str:
    vae = parts.unwrapped(parts.vae)
    encoder = [vae.encoder, getattr(vae, "quant_conv", None)]
    return digest(
        {
            "source": parts.source,
            "revision": parts.revision,
            "vae": config.model.vae,
            "config": _public_config(vae),
            "weights": [fingerprint(m) for m in encoder if m is not None],
            "dtype": str(vae.dtype),
        }
    )


def text_identity(config: RunConfig, parts) -> str:
    encoders = [parts.unwrapped(e) for e in parts.text_encoders]
    tokenizers = [
        {"len": len(tok), "max": tok.model_max_length, "added": sorted(map(str, tok.get_added_vocab()))}
        for tok in parts.tokenizers
    ]
    return digest(
        {
            "source": parts.source,
            "revision": parts.revision,
            "family": parts.family.name,
            "configs": [_public_config(e) for e in encoders],
            "weights": [fingerprint(e) for e in encoders],
            "dtypes": [str(next(e.parameters()).dtype) for e in encoders],
            "tokenizers": tokenizers,
        }
    )


def default_cache_dir(config: RunConfig) -> Path:
    """`data.cache_dir`, else `<data folder>/.tuner-cache`, else (hub datasets) the user cache folder."""
    data = config.data
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    roots = [Path(data.path).expanduser()] if data.path else []
    roots += [Path(s.path).expanduser() for s in data.subsets]
    for root in roots:
        if root.is_dir():
            return root / ".tuner-cache"
        if root.is_file():
            return root.parent / ".tuner-cache"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tuner" / "data" / digest(data.path or "")[:16]


class TensorCache:
    """A folder of `<key>.safetensors` files (two-level fan-out so no directory grows huge)."""

    def __init__(self, root: Path, kind: str):
        self.root = Path(root) / kind
        self.kind = kind
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            self.misses += 1  # a damaged entry is recomputed and rewritten
            return None
        self.hits += 1
        return tensors

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata)
            os.replace(tmp, path)
        except OSError as exc:
            raise DataError(
                f"data.cache_dir: cannot write the {self.kind} cache at {self.root} ({exc.strerror}); "
                "set data.cache_dir to a writable folder or turn caching off"
            ) from None
