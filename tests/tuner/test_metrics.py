"""PSNR, SSIM and the LPIPS loader: exact values for identical images, known noise levels, a naive reference."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from tuner.errors import TunerError
from tuner.metrics import (
    compare_reconstructions,
    format_comparison,
    gaussian_window,
    load_lpips,
    mean_finite,
    psnr,
    ssim,
    to_json,
)


def noisy_pair(sigma: float, size: int = 128, level: float = 0.5, seed: int = 0):
    clean = torch.full((1, 3, size, size), level)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return clean, clean + sigma * noise


def test_identical_images_give_inf_psnr_and_unit_ssim():
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(image, image)).all()
    assert torch.allclose(ssim(image, image), torch.ones(2))


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.1])
def test_psnr_of_known_gaussian_noise(sigma):
    clean, noisy = noisy_pair(sigma)
    assert psnr(noisy, clean).item() == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.1)


def test_psnr_scales_with_data_range():
    clean, noisy = noisy_pair(0.05)
    # the same images stored in [-1, 1] have twice the range and twice the error: the same PSNR
    assert psnr(noisy * 2 - 1, clean * 2 - 1, data_range=2.0).item() == pytest.approx(psnr(noisy, clean).item())


def test_ssim_of_noise_on_a_flat_image_matches_theory():
    # flat image: SSIM ~ C2 / (var_window + C2), var_window = sigma^2 (1 - sum of squared window weights)
    sigma = 0.05
    clean, noisy = noisy_pair(sigma, size=256)
    squared = (gaussian_window() ** 2).sum().item() ** 2
    expected = 0.03**2 / (sigma**2 * (1 - squared) + 0.03**2)
    assert ssim(noisy, clean).item() == pytest.approx(expected, abs=0.03)


def naive_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Textbook SSIM: an explicit 2-D gaussian window slid over every valid position of every channel."""
    taps = gaussian_window(size, sigma).numpy()
    window = np.outer(taps, taps)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - size + 1):
            for j in range(a.shape[2] - size + 1):
                x, y = a[c, i : i + size, j : j + size], b[c, i : i + size, j : j + size]
                mx, my = (window * x).sum(), (window * y).sum()
                vx, vy = (window * x * x).sum() - mx**2, (window * y * y).sum() - my**2
                cov = (window * x * y).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_naive_reference():
    rng = np.random.default_rng(0)
    a = rng.random((3, 20, 17))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    got = ssim(torch.tensor(a)[None], torch.tensor(b)[None]).item()
    assert got == pytest.approx(naive_ssim(a, b), abs=1e-6)


def test_ssim_falls_as_noise_grows_and_is_symmetric():
    values = [ssim(*reversed(noisy_pair(s, size=64))).item() for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]
    clean, noisy = noisy_pair(0.05, size=64)
    assert ssim(clean, noisy).item() == pytest.approx(ssim(noisy, clean).item())


def test_images_smaller_than_the_window_and_per_image_values():
    a = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[1] = 1 - b[1]
    values = ssim(a, b)
    assert values.shape == (3,)
    assert values[0].item() == pytest.approx(1.0) and values[1].item() < 0.5


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))


def test_mean_finite():
    assert mean_finite([1.0, 3.0]) == 2.0
    assert math.isinf(mean_finite([1.0, math.inf]))
    assert math.isnan(mean_finite([]))


def test_lpips_without_the_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import fails even where lpips is installed
    with pytest.raises(TunerError, match="pip install lpips") as info:
        load_lpips()
    assert "weights" in str(info.value)


def test_lpips_without_weights_never_downloads(monkeypatch, tmp_path):
    fake = types.ModuleType("lpips")
    fake.__file__ = str(tmp_path / "lpips" / "__init__.py")

    def construct(*args, **kwargs):
        raise AssertionError("LPIPS must not be constructed (it would download) when weights are missing")

    fake.LPIPS = construct
    monkeypatch.setitem(sys.modules, "lpips", fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(TunerError, match="alexnet-owt-7be5be79.pth") as info:
        load_lpips("alex")
    assert "alex.pth" in str(info.value) and "nothing is downloaded" in str(info.value)
    with pytest.raises(TunerError, match="allowed: alex, vgg, squeeze"):
        load_lpips("resnet")


def test_compare_reconstructions_signs_every_gain_so_positive_is_better():
    original, noisy = noisy_pair(0.1, size=32)
    _, slightly = noisy_pair(0.02, size=32, seed=1)

    def fake_lpips(a, b):  # a distance: lower is better
        return (a - b).abs().mean().reshape(1)

    summary = compare_reconstructions([("x.png", original, noisy, slightly)], fake_lpips)
    assert summary["evaluated"] == 1 and summary["per_image"][0]["name"] == "x.png"
    assert summary["tuned"]["psnr"] > summary["base"]["psnr"] and summary["tuned"]["lpips"] < summary["base"]["lpips"]
    assert all(gain > 0 for gain in summary["gain"].values())
    text = format_comparison(summary, "decoder evaluation")
    assert "decoder evaluation on 1 held-out image(s)" in text and "LPIPS" in text and "lower is better" in text
    assert format_comparison({"skipped": "no images"}, "decoder evaluation") == "decoder evaluation skipped: no images"


def test_to_json_makes_strict_json():
    import json

    value = to_json({"psnr": math.inf, "rows": [{"ssim": 1.0, "x": -math.inf}], "n": 2})
    assert json.loads(json.dumps(value, allow_nan=False)) == {
        "psnr": "inf",
        "rows": [{"ssim": 1.0, "x": "-inf"}],
        "n": 2,
    }
