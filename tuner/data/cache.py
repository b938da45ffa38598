"""On-disk cache of VAE latents and text-encoder outputs, as safetensors files keyed by everything they depend on.

Latent keys: image content hash + VAE identity (source, revision, config, a weight fingerprint, dtype) +
transform (bucket, resize, crop box, flip) + cache mode. Text keys: caption + text-encoder identity. Any
change gives a new key, so stale entries are never read; files are written atomically, so concurrent ranks
and interrupted runs leave no half files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tuner.config import RunConfig
from tuner.errors import DataError
from tuner.storage import DiskFull, free_bytes, is_no_space, size_text

logger = logging.getLogger(__name__)


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
    """A folder of `<key>.safetensors` files (two-level fan-out so no directory grows huge).

    Each file records its key, the shapes and a sha256 of its tensors in its metadata. A read checks all three,
    so a truncated or hand-edited entry, or one copied in from another model's cache, is recomputed with a note
    instead of being trained on."""

    def __init__(self, root: Path, kind: str):
        self.root = Path(root) / kind
        self.kind = kind
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        tensors = self._read(key)
        if tensors is None:
            self.misses += 1
        else:
            self.hits += 1
        return tensors

    def has(self, key: str) -> bool:
        """An intact entry is on disk (read and checked: a damaged one is removed and reported)."""
        return self._read(key) is not None

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (not a dict)
            problem = _problem(key, tensors, metadata)
        except (SafetensorError, OSError, ValueError) as exc:
            problem = f"unreadable ({exc})"
        if problem is None:
            return tensors
        logger.warning("note: %s cache entry %s is damaged (%s); recomputing it", self.kind, path, problem)
        path.unlink(missing_ok=True)
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        path = self.path(key)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        shapes = {k: list(v.shape) for k, v in tensors.items()}
        record = {**(metadata or {}), "key": key, "sha256": _content_hash(tensors), "shapes": json.dumps(shapes)}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), record)
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:
            tmp.unlink(missing_ok=True)
            if is_no_space(exc):
                raise DiskFull(
                    f"no space left on the disk of {self.root} while writing the {self.kind} cache "
                    f"({size_text(free_bytes(self.root))} free). Nothing trained was lost and every entry written "
                    "is intact; free space, or set data.cache_dir to a folder on another disk, then run again"
                ) from None
            raise DataError(
                f"data.cache_dir: cannot write the {self.kind} cache at {self.root} ({exc}); "
                "set data.cache_dir to a writable folder or turn caching off"
            ) from None


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _problem(key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """What is wrong with an entry read from disk, or None."""
    if "sha256" not in metadata:
        return "no recorded hash (written by an older tuner)"
    if metadata.get("key") != key:
        return "it belongs to another model or image (its recorded key differs)"
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if json.loads(metadata.get("shapes", "null")) != shapes:
        return f"its tensors' shapes {shapes} differ from the recorded ones"
    if _content_hash(tensors) != metadata["sha256"]:
        return "its content does not match the recorded hash"
    return None
