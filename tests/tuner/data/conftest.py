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


# --- a corpus of good and bad files ---------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height, and nothing else (a decompression bomb)."""
    import struct
    import zlib

    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 64 wide x 32 high, left half red, right half blue, EXIF orientation 6 (display rotated 90° cw)."""
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


EXPECTED = {
    "good.png": ("used", None),
    "café_日本.png": ("used", None),
    "cmyk.jpg": ("used", None),
    "gray16.png": ("used", None),
    "rotated.jpg": ("used", None),
    "rgba.png": ("used", None),
    "la.png": ("used", None),
    "palette.png": ("used", None),
    "bilevel.png": ("used", None),
    "gray.png": ("used", None),
    "twin.png": ("skipped", "duplicate"),
    "tiny.png": ("skipped", "too small"),
    "nocaption.png": ("skipped", "missing caption"),
    "truncated.jpg": ("refused", "truncated"),
    "bomb.png": ("refused", "decompression bomb"),
    "text.png": ("refused", "not an image"),
    "empty.png": ("refused", "zero bytes"),
    "corrupt.png": ("refused", "corrupt"),
    "latin1.png": ("refused", "unreadable caption encoding"),
}


@pytest.fixture
def corpus(tmp_path) -> Path:
    """One folder holding every kind of good and bad file the check must tell apart (see EXPECTED)."""
    import io
    import shutil

    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)

    def caption(name: str, text: str) -> None:
        (root / name).with_suffix(".txt").write_text(text, encoding="utf-8")

    _noise_image(root / "good.png", seed=1, caption="good, red, square")
    _noise_image(root / "café_日本.png", seed=2, caption="un café ☕, 日本")
    shutil.copy(root / "good.png", root / "twin.png")
    caption("twin.png", "a copy")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(root / "cmyk.jpg", "JPEG", quality=95)
    caption("cmyk.jpg", "cmyk red")
    gray16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(gray16).save(root / "gray16.png")
    caption("gray16.png", "16-bit ramp")
    exif_rotated_jpeg(root / "rotated.jpg")
    caption("rotated.jpg", "rotated, red, blue")
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 32:, 3] = 255  # left half fully transparent red
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    caption("rgba.png", "half transparent")
    la = np.zeros((64, 64, 2), dtype=np.uint8)
    la[:, 32:, 1] = 255
    Image.fromarray(la, "LA").save(root / "la.png")
    caption("la.png", "gray alpha")
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 32, 64))
    palette.save(root / "palette.png", transparency=0)
    caption("palette.png", "palette with transparency")
    Image.new("1", (64, 64), 1).save(root / "bilevel.png")
    caption("bilevel.png", "bilevel")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(root / "gray.png")
    caption("gray.png", "gray")
    _noise_image(root / "tiny.png", size=(8, 8), seed=3, caption="tiny")
    _noise_image(root / "nocaption.png", seed=4)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    caption("truncated.jpg", "truncated")
    (root / "bomb.png").write_bytes(png_header_only(10000, 10000))
    caption("bomb.png", "bomb")
    (root / "text.png").write_text("this is a text file, not a png\n", encoding="utf-8")
    caption("text.png", "text")
    (root / "empty.png").write_bytes(b"")
    caption("empty.png", "empty")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 30)
    caption("corrupt.png", "corrupt")
    _noise_image(root / "latin1.png", seed=5)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "notes.md").write_text("not part of the data set", encoding="utf-8")
    return root


@pytest.fixture
def corpus_expected() -> dict[str, tuple[str, str | None]]:
    """File name -> (status, reason) the check must report for the `corpus` folder."""
    return dict(EXPECTED)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny convolutions run faster on one thread, above all on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def helpers():
    """File-crafting helpers: `png_header_only(w, h)`, `exif_rotated_jpeg(path)`."""
    from types import SimpleNamespace

    return SimpleNamespace(png_header_only=png_header_only, exif_rotated_jpeg=exif_rotated_jpeg)
