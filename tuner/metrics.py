"""Image-reconstruction metrics: PSNR, gaussian-window SSIM and (optionally) LPIPS in torch, and the
base-vs-tuned comparison built from them (per image, averaged, gain; printable and strict-JSON).

Images are float tensors [B, C, H, W] with values in [0, `data_range`]. Every metric returns one value
per image so callers can average, report per-image rows, or compare two decoders image by image. LPIPS
needs the `lpips` package and its weights already on disk: nothing is downloaded at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tuner.errors import TunerError

LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
"""torchvision checkpoint file each LPIPS backbone loads from the torch hub cache (`torch.hub.get_dir()`)."""


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; identical images give +inf."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalized 1-D gaussian taps (the separable SSIM window of Wang et al. 2004)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(coords**2) / (2 * sigma**2))
    return taps / taps.sum()


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Depthwise separable gaussian filter, 'valid' borders (as skimage with gaussian_weights=True)."""
    channels = x.shape[1]
    row = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    col = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(x, row, groups=channels), col, groups=channels)


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity per image (mean over channels and positions); identical images give 1.0.

    Images smaller than the window use the largest odd window that fits, so tiny test images still work.
    """
    _check_pair(a, b)
    size = min(window_size, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    taps = gaussian_window(size, sigma)
    x, y = a.double(), b.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, taps), _blur(y, taps)
    var_x = _blur(x * x, taps) - mu_x**2
    var_y = _blur(y * y, taps) - mu_y**2
    cov = _blur(x * y, taps) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1).float()


def load_lpips(
    net: str = "alex", device: torch.device | str = "cpu"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An LPIPS distance (lower is closer) for images in [0, 1], or a TunerError saying what is missing.

    The backbone weights must already be in the torch hub cache and the linear heads in the package, so a
    training run never blocks on (or fails halfway through) a download.
    """
    if net not in LPIPS_BACKBONES:
        raise TunerError(f"LPIPS network {net!r}: allowed: {', '.join(LPIPS_BACKBONES)}")
    try:
        import lpips
    except ImportError:
        raise TunerError(
            "LPIPS needs the `lpips` package: `pip install lpips` (or `pip install ldm-tuner[metrics]`), "
            "with its weights present on this machine (nothing is downloaded at run time)"
        ) from None
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    missing = [str(p) for p in (backbone, heads) if not p.is_file()]
    if missing:
        raise TunerError(
            f"LPIPS ({net}) weights are not on this machine: missing {', '.join(missing)}; nothing is downloaded "
            "at run time: put them there (e.g. run `python -c \"import lpips; lpips.LPIPS(net='alex')\"` once "
            "where there is network access and copy the torch hub cache)"
        )
    model = lpips.LPIPS(net=net, verbose=False).to(device).eval().requires_grad_(False)

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_pair(a, b)
        return model(a.to(device) * 2 - 1, b.to(device) * 2 - 1).flatten()

    return distance


def mean_finite(values: list[float]) -> float:
    """Mean of per-image values; +inf when any is +inf (a perfect reconstruction), as PSNR conventions go."""
    if not values:
        return math.nan
    return math.inf if any(math.isinf(v) for v in values) else sum(values) / len(values)


LOWER_IS_BETTER = frozenset({"lpips"})


def scores(recon: torch.Tensor, original: torch.Tensor, lpips_fn: Callable | None = None) -> dict[str, float]:
    """PSNR, SSIM (and LPIPS) of one reconstruction [1, C, H, W] in [0, 1]."""
    out = {"psnr": psnr(recon, original).item(), "ssim": ssim(recon, original).item()}
    if lpips_fn is not None:
        with torch.no_grad():
            out["lpips"] = lpips_fn(recon, original).item()
    return out


def compare_reconstructions(
    rows: Sequence[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]], lpips_fn: Callable | None = None
) -> dict[str, Any]:
    """(name, original, base, tuned) rows -> averages per model, the gain of tuned over base, per-image scores.

    Gains are signed so that positive is better for every metric (LPIPS: base minus tuned).
    """
    if not rows:
        raise ValueError("compare_reconstructions: no images")
    per_image = [
        {"name": name, "base": scores(base, original, lpips_fn), "tuned": scores(tuned, original, lpips_fn)}
        for name, original, base, tuned in rows
    ]
    summary: dict[str, Any] = {"evaluated": len(per_image)}
    for label in ("base", "tuned"):
        summary[label] = {k: mean_finite([r[label][k] for r in per_image]) for k in per_image[0][label]}
    sign = {k: -1.0 if k in LOWER_IS_BETTER else 1.0 for k in summary["base"]}
    summary["gain"] = {k: sign[k] * (summary["tuned"][k] - summary["base"][k]) for k in summary["base"]}
    summary["per_image"] = per_image
    return summary


def format_comparison(summary: dict[str, Any], label: str = "evaluation") -> str:
    """A few printed lines: base -> tuned per metric, with the gain (or why the evaluation was skipped)."""
    if "skipped" in summary:
        return f"{label} skipped: {summary['skipped']}"
    lines = [f"{label} on {summary['evaluated']} held-out image(s) (base -> tuned):"]
    for key, unit in (("psnr", " dB"), ("ssim", ""), ("lpips", "")):
        if key in summary["base"]:
            base, tuned, gain = summary["base"][key], summary["tuned"][key], summary["gain"][key]
            better = "lower is better" if key in LOWER_IS_BETTER else "higher is better"
            lines.append(f"  {key.upper():5} {base:8.4f} -> {tuned:8.4f}{unit}  (gain {gain:+.4f}; {better})")
    if isinstance(summary.get("lpips"), str):
        lines.append(f"  LPIPS {summary['lpips']}")
    return "\n".join(lines)


def to_json(value: Any) -> Any:
    """Non-finite floats (a perfect PSNR is +inf) become strings, so the result is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value
