"""Shared helpers for the data-pipeline tests: a run config for tiny 64x64 images and loaded tiny parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner.config import DataConfig, RunConfig, TrainConfig


def _make_config(path: Path | str | None = None, batch_size: int = 2, seed: int = 0, **data) -> RunConfig:
    defaults = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    return RunConfig(
        method="toy",
        data=DataConfig(path=str(path) if path else None, **{**defaults, **data}),
        train=TrainConfig(train_batch_size=batch_size, seed=seed),
    )


def _noise_image(path: Path, size=(64, 64), seed: int = 0, caption: str | None = None) -> Path:
    """A random RGB PNG (distinct content per seed) and optionally its .txt sidecar."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_parts(tiny_models):
    """Loaded tiny parts per family, built once per session."""
    from tuner.models import load_parts

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_parts(str(tiny_models[family]))
        return cache[family]

    return get


@pytest.fixture
def make_config():
    """`make_config(path, batch_size=2, seed=0, **data_fields)` -> RunConfig at resolution 64."""
    return _make_config


@pytest.fixture
def noise_image():
    """`noise_image(path, size=(64, 64), seed=0, caption=None)` writes a random PNG (+ sidecar)."""
    return _noise_image
