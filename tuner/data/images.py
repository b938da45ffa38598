"""Open image bytes safely and turn them into upright RGB: bomb guard, truncation check, EXIF, every mode.

Nothing here raises anything but `ImageProblem` for a bad file, so the data check can report the reason
(corrupt, truncated, not an image, decompression bomb) instead of a trace.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from tuner.errors import ConfigError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Leading bytes of the formats above: a file that starts like an image but fails to open is "corrupt",
# anything else with an image extension is "not an image".
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageProblem(Exception):
    """A file that cannot be used; `reason` is one of the report's reason codes, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """Upright size (after EXIF orientation), mode and format of a decodable image."""

    width: int
    height: int
    mode: str
    format: str


def parse_color(value: str, field: str = "data.background_color") -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise ConfigError(f"{field} = {value!r}: not a color; use a name such as 'white' or '#rrggbb'") from None


def _png_declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, read by hand: a header-only bomb may not even open."""
    if len(data) >= 24 and data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) with our own pixel limit, so a bomb is refused before any decoding."""
    if not data:
        raise ImageProblem("zero bytes", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageProblem("decompression bomb", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        declared = _png_declared_size(data)
        if declared and declared[0] * declared[1] > max_pixels:
            width, height = declared
            raise ImageProblem(
                "decompression bomb",
                f"header declares {width}x{height} = {width * height} pixels > data.max_image_pixels = {max_pixels}",
            ) from None
        if data.startswith(_SIGNATURES):
            raise ImageProblem("corrupt", f"{type(exc).__name__}: {exc}") from None
        raise ImageProblem("not an image", "contents are not a known image format") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageProblem(
            "decompression bomb",
            f"header declares {width}x{height} = {width * height} pixels > data.max_image_pixels = {max_pixels}",
        )
    if width < 1 or height < 1:
        raise ImageProblem("corrupt", f"size {width}x{height}")
    return img


def _decode(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        text = str(exc)
        if isinstance(exc, EOFError) or "truncat" in text.lower():
            raise ImageProblem("truncated", text or "unexpected end of data") from None
        raise ImageProblem("corrupt", f"{type(exc).__name__}: {text}") from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block means "no rotation", not a bad image
        return 1


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Fully decode once (catches truncation) and return the upright size; raises `ImageProblem`."""
    img = _open(data, max_pixels)
    fmt, mode = img.format or "?", img.mode
    _decode(img)
    _convert(img, (0, 0, 0))
    width, height = img.size
    if _orientation(img) in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width, height, mode, fmt)


def _transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation
        return img


def _from_high_depth(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit gray to 8-bit gray, scaled (Pillow's own convert clips everything above 255)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
    elif img.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I": 32-bit ints; 16-bit PNGs decode to this on some Pillow versions
        top = 65535.0 if arr.size and arr.max() > 255 else 255.0
    gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited onto `background` (not dropped to black)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _from_high_depth(img)
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _convert(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    try:
        return to_rgb(img, background)
    except (ValueError, OSError) as exc:
        raise ImageProblem("unsupported mode", f"cannot convert Pillow mode {img.mode!r} to RGB ({exc})") from None


def open_rgb(data: bytes, background: tuple[int, int, int], max_pixels: int) -> Image.Image:
    """Decoded, upright, RGB image; raises `ImageProblem` for a bad file."""
    img = _open(data, max_pixels)
    _decode(img)
    return _convert(_transpose(img), background)


def to_tensor_array(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 array [3, H, W] in [-1, 1] (the VAE's input range)."""
    arr = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1) / 127.5 - 1.0)
