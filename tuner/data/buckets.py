"""Aspect-ratio buckets and the resize/crop that puts an image into its bucket (or into a square).

Buckets follow the kohya recipe: sides are multiples of `bucket_reso_steps` between the min and max side,
area at most resolution². Every image gets a bucket (nothing is dropped); the crop offset is recorded for
SDXL's size conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tuner.config import DataConfig
from tuner.errors import ConfigError

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Placement:
    """How one image fills one bucket: resize to `resized`, then crop `bucket` at (left, top)."""

    bucket: Size
    resized: Size
    left: int
    top: int

    def crop_box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1])

    def crop_top_left(self, flipped: bool) -> tuple[int, int]:
        """(top, left) as SDXL expects it; a flip mirrors the left offset (flip happens before the crop)."""
        left = self.resized[0] - self.left - self.bucket[0] if flipped else self.left
        return (self.top, left)


class Bucketer:
    """Assigns every image size a bucket; validated against the VAE factor so latents have integer sizes."""

    def __init__(self, data: DataConfig, vae_factor: int = 8):
        self.data = data
        self.step = data.bucket_reso_steps if data.enable_bucket else vae_factor
        if data.enable_bucket and data.bucket_reso_steps % vae_factor:
            raise ConfigError(
                f"data.bucket_reso_steps = {data.bucket_reso_steps}: bucket sides must be multiples of the VAE "
                f"factor {vae_factor}; use a multiple of {vae_factor} (64 at SD scale)"
            )
        if data.resolution % vae_factor:
            raise ConfigError(
                f"data.resolution = {data.resolution}: must be a multiple of the VAE factor {vae_factor}"
            )
        if data.enable_bucket and data.min_bucket_reso > data.max_bucket_reso:
            raise ConfigError(
                f"data.min_bucket_reso = {data.min_bucket_reso} > data.max_bucket_reso = {data.max_bucket_reso}"
            )
        self.max_area = data.resolution * data.resolution
        self.buckets = self._make() if data.enable_bucket else [(data.resolution, data.resolution)]
        self._log_ratios = np.array([math.log(w / h) for w, h in self.buckets])

    def _make(self) -> list[Size]:
        step = self.step
        side = max(step, math.isqrt(self.max_area) // step * step)
        # The square bucket always exists: min/max sides that exclude it (min 256 at resolution 64) are widened.
        low = min(side, max(step, math.ceil(self.data.min_bucket_reso / step) * step))
        high = max(side, self.data.max_bucket_reso // step * step)
        sizes: set[Size] = {(side, side)}
        for width in range(low, high + 1, step):
            height = min(high, self.max_area // width // step * step)
            if height >= low:
                sizes.update({(width, height), (height, width)})
        return sorted(sizes)

    def bucket_for(self, size: Size) -> Size | None:
        """The bucket of an upright image size; None when the image is too small to fill any bucket."""
        width, height = size
        if not self.data.enable_bucket:
            return self.buckets[0]
        if self.data.bucket_no_upscale:
            return self._no_upscale_bucket(width, height)
        index = int(np.argmin(np.abs(self._log_ratios - math.log(width / height))))
        return self.buckets[index]

    def _no_upscale_bucket(self, width: int, height: int) -> Size | None:
        """The image's own size (scaled down to the max area if larger), floored to the step."""
        scale = min(1.0, math.sqrt(self.max_area / (width * height)))
        limit = self.data.max_bucket_reso
        scale = min(scale, limit / width, limit / height)
        bw = int(width * scale) // self.step * self.step
        bh = int(height * scale) // self.step * self.step
        return (bw, bh) if bw >= self.step and bh >= self.step else None

    def place(self, size: Size, bucket: Size, rng: np.random.Generator | None = None) -> Placement:
        """Resize so the image covers the bucket, then crop: centered, or at a random offset from `rng`."""
        width, height = size
        scale = max(bucket[0] / width, bucket[1] / height)
        resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
        spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
        if rng is None:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
        return Placement(bucket, resized, left, top)


def apply(img: Image.Image, placement: Placement, flip: bool) -> Image.Image:
    """Resize, crop and optionally mirror an RGB image as `placement` says."""
    if img.size != placement.resized:
        shrinking = placement.resized[0] < img.size[0]
        resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
        img = img.resize(placement.resized, resample=resample)
    img = img.crop(placement.crop_box())
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img
