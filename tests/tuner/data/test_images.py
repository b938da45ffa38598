"""Image decoding: every Pillow mode to RGB with the right colors, EXIF orientation, 16-bit scaling, bombs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tuner.data import build_training_data
from tuner.data.images import ImageProblem, inspect_image, open_rgb

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def rgb(path, background=WHITE) -> np.ndarray:
    return np.asarray(open_rgb(path.read_bytes(), background, 89_478_485)).astype(int)


def close(pixel, expected, tol=6) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def test_every_mode_becomes_the_right_rgb(corpus):
    assert close(rgb(corpus / "cmyk.jpg")[32, 32], (255, 0, 0), tol=12)
    ramp = rgb(corpus / "gray16.png")
    assert ramp.shape == (64, 64, 3)
    assert tuple(ramp[0, 0]) == (0, 0, 0) and tuple(ramp[0, -1]) == WHITE
    assert 120 <= ramp[0, 32, 0] <= 135, "16-bit values are scaled, not clipped to 255"
    assert np.all(np.diff(ramp[0, :, 0]) >= 0)
    rgba = rgb(corpus / "rgba.png")
    assert tuple(rgba[5, 5]) == WHITE and tuple(rgba[5, 60]) == (255, 0, 0)
    assert tuple(rgb(corpus / "rgba.png", background=BLACK)[5, 5]) == BLACK
    la = rgb(corpus / "la.png")
    assert tuple(la[5, 5]) == WHITE and tuple(la[5, 60]) == BLACK
    palette = rgb(corpus / "palette.png", background=(0, 0, 255))
    assert tuple(palette[5, 5]) == (0, 0, 255) and tuple(palette[5, 60]) == (255, 0, 0)
    assert tuple(rgb(corpus / "bilevel.png")[10, 10]) == WHITE
    gray = rgb(corpus / "gray.png")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_exif_orientation_reaches_the_output_tensor(tmp_path, make_config, tiny_parts, helpers):
    helpers.exif_rotated_jpeg(tmp_path / "rotated.jpg")  # stored 64x32, left red / right blue, orientation 6
    config = make_config(tmp_path, batch_size=1, instance_prompt="a rotated photo", enable_bucket=False)
    data = build_training_data(config, tiny_parts("sd1"), frozenset({"pixels"}), verbose=False)
    (batch,) = data.iterate(0)
    assert batch["original_size"].tolist() == [[64, 32]], "upright size is 64 high, 32 wide"
    pixels = batch["pixel_values"][0]  # [3, 64, 64] in [-1, 1]; upright: red on top, blue below
    top, bottom = pixels[:, :24].mean(dim=(1, 2)), pixels[:, 40:].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < -0.8, f"top should be red, got {top}"
    assert bottom[2] > 0.8 and bottom[0] < -0.8, f"bottom should be blue, got {bottom}"


def test_header_only_bomb_is_refused_without_decoding(helpers):
    start = time.perf_counter()
    with pytest.raises(ImageProblem) as err:
        inspect_image(helpers.png_header_only(10000, 10000), max_pixels=89_478_485)
    assert err.value.reason == "decompression bomb" and "10000x10000" in err.value.detail
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ImageProblem, match="decompression bomb"):
        inspect_image(helpers.png_header_only(300, 300), max_pixels=256 * 256)
