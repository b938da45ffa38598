"""Aspect buckets: kohya geometry, VAE-factor sides, no image dropped, crop coordinates for SDXL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tuner.config import DataConfig
from tuner.data.buckets import Bucketer, apply
from tuner.errors import ConfigError


def bucketer(**kw) -> Bucketer:
    return Bucketer(DataConfig(**{"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024, **kw}))


def test_sd_scale_buckets_follow_the_kohya_recipe():
    b = bucketer()
    assert (512, 512) in b.buckets and (768, 320) in b.buckets and (320, 768) in b.buckets
    for w, h in b.buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
    assert b.bucket_for((1000, 1000)) == (512, 512)
    assert b.bucket_for((1920, 1080)) == (640, 384)  # 16:9 -> ratio 1.667 nearest
    wide = b.bucket_for((4000, 1000))
    assert wide[0] > wide[1]


def test_no_upscale_keeps_small_images_small():
    b = bucketer(bucket_no_upscale=True)
    assert b.bucket_for((300, 200)) == (256, 192)
    assert b.bucket_for((2000, 2000)) == (512, 512)
    assert b.bucket_for((40, 40)) is None  # smaller than one step: reported as too small


def test_bucket_steps_must_be_a_multiple_of_the_vae_factor():
    with pytest.raises(ConfigError, match="bucket_reso_steps = 12"):
        bucketer(bucket_reso_steps=12)
    with pytest.raises(ConfigError, match="resolution = 500"):
        Bucketer(DataConfig(resolution=500, enable_bucket=False))


def test_square_crop_center_and_random_and_flip_coordinates():
    b = Bucketer(DataConfig(resolution=64, enable_bucket=False))
    center = b.place((128, 64), b.bucket_for((128, 64)))
    assert center.bucket == (64, 64) and center.resized == (128, 64)
    assert (center.left, center.top) == (32, 0)
    assert center.crop_top_left(False) == (0, 32)
    lefts = {b.place((128, 64), (64, 64), np.random.default_rng(s)).left for s in range(20)}
    assert len(lefts) > 3 and all(0 <= x <= 64 for x in lefts)
    off = b.place((128, 64), (64, 64), np.random.default_rng(0))
    assert off.crop_top_left(True) == (0, 128 - off.left - 64)

    arr = np.zeros((64, 128, 3), dtype=np.uint8)
    arr[:, :64] = 255  # left half white
    img = Image.fromarray(arr)
    plain = np.asarray(apply(img, b.place((128, 64), (64, 64), np.random.default_rng(1)), flip=False))
    flipped = np.asarray(apply(img, b.place((128, 64), (64, 64), np.random.default_rng(1)), flip=True))
    assert np.array_equal(plain[:, ::-1], flipped)


def test_min_side_above_the_resolution_still_gives_a_square_bucket():
    b = Bucketer(DataConfig(resolution=64, bucket_reso_steps=8))  # min_bucket_reso defaults to 256
    assert (64, 64) in b.buckets and all(w * h <= 64 * 64 for w, h in b.buckets)
    assert b.bucket_for((64, 64)) == (64, 64)
