"""Rectified-flow (flow-matching) training math for SD3 / SD3.5 and FLUX.1: pure functions, no model code.

Conventions (Esser et al. 2024, "Scaling Rectified Flow Transformers", the SD3 paper, §2-3): a noise level
sigma in [0, 1] interpolates on a straight line between data x (sigma = 0) and Gaussian noise ε (sigma = 1),
    x_sigma = (1 - sigma) x + sigma ε,
and the transformer learns the constant velocity of that line, d x_sigma / d sigma = ε - x. Training draws a
noise level per example in three steps:

1. `sample_u`: a value u in (0, 1) from a density that decides which noise levels the model sees most
   (uniform, logit-normal, or the paper's "mode" density);
2. a shift moves those levels toward noise, because at higher resolutions more pixels carry the same
   information and a given sigma destroys less of the image: a static shift (SD3: 3.0, `shift_sigmas`) or
   FLUX.1's resolution-dependent one (`resolution_mu` + `time_shift`); `training_sigmas` picks the one the
   model's `FlowMatchEulerDiscreteScheduler` config uses, so training sees the noise levels sampling will;
3. `noisy_and_target` builds the model input and the velocity target, `loss_weighting` an optional
   per-example weight, `timesteps_of` the timestep the SD3 transformer is told.

Unlike diffusers' example scripts, which turn u into an index into the scheduler's descending 1000-step
table (so their sigma is roughly shift(1 - u), on a grid), u here *is* the noise level before the shift, as
in the paper, and stays continuous. The two agree in distribution for the symmetric densities (uniform,
logit-normal with mean 0, mode); with `logit_mean > 0` this module puts more weight on noisy levels, as the
paper means it.

All randomness comes from the `torch.Generator` passed in (a CPU one; draws happen on the CPU), so a run
that restores its generator state draws the same sigmas again on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tuner.errors import ConfigError

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")

# SD3 paper, mode density: f_mode(u) is a bijection of [0, 1] (a valid density) only for -1 <= s <= 2/(pi-2).
MODE_SCALE_MIN = -1.0
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)

# u is kept this far from 0 and 1: rand() can return exactly 0, where 1/sigma, the sigma_sqrt weight and the
# dynamic shift are infinite. 2**-24 is float32's spacing just below 1, so only endpoint draws move.
_U_EPS = 2.0**-24

# FlowMatchEulerDiscreteScheduler's defaults, used when a scheduler config lacks a key (or holds None).
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


@dataclass(frozen=True)
class FlowOptions:
    """How training draws and weights noise levels (the `train.*` config fields a flow-matching model reads)."""

    timestep_sampling: str = "logit_normal"
    """`uniform`, `logit_normal` (the SD3 paper's best: rf/lognorm(0, 1)) or `mode` (heavier middle, lighter ends)."""
    logit_mean: float = 0.0
    """Mean m of logit(u) for `logit_normal`; m > 0 favors noisier levels, m < 0 cleaner ones."""
    logit_std: float = 1.0
    """Standard deviation of logit(u) for `logit_normal`; larger spreads the draws toward both ends."""
    mode_scale: float = 1.29
    """s of the `mode` density, in [-1, 2/(pi-2)]: 0 is uniform, > 0 concentrates on the middle."""
    weighting_scheme: str = "none"
    """Per-example loss weight: `none`, `sigma_sqrt` (sigma**-2) or `cosmap` (the CosMap density)."""
    shift: float | None = None
    """Static shift; None takes the scheduler config's `shift` (1.0 = none). Setting it turns dynamic shifting off
    unless `dynamic_shift` is True (then it is an error)."""
    dynamic_shift: bool | None = None
    """Resolution-dependent shift (FLUX.1); None takes the scheduler config's `use_dynamic_shifting` (when
    `shift` is None)."""


def validate(options: FlowOptions) -> None:
    """Raise `ConfigError` (a `TunerError`) naming the config field and what is allowed, for any bad option.

    Called by every function that reads options, so a typo fails before the first step rather than silently
    falling back to another density or weighting.
    """
    if options.timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ConfigError(
            f"train.timestep_sampling = {options.timestep_sampling!r}: allowed: {', '.join(TIMESTEP_SAMPLINGS)}"
        )
    if options.weighting_scheme not in WEIGHTING_SCHEMES:
        raise ConfigError(
            f"train.weighting_scheme = {options.weighting_scheme!r}: allowed: {', '.join(WEIGHTING_SCHEMES)}"
        )
    # the density parameters are checked where the chosen density reads them
    if options.timestep_sampling == "logit_normal":
        if not (math.isfinite(options.logit_std) and options.logit_std > 0):
            raise ConfigError(f"train.timestep_std = {options.logit_std!r}: must be a finite number > 0")
        if not math.isfinite(options.logit_mean):
            raise ConfigError(f"train.timestep_mean = {options.logit_mean!r}: must be a finite number")
    if options.timestep_sampling == "mode" and not MODE_SCALE_MIN <= options.mode_scale <= MODE_SCALE_MAX:
        raise ConfigError(
            f"train.mode_scale = {options.mode_scale!r}: allowed: {MODE_SCALE_MIN:g} to {MODE_SCALE_MAX:.4f} "
            "(2/(pi-2)); outside that range f_mode is not a one-to-one map of [0, 1] and defines no valid density"
        )
    if options.shift is not None and not (math.isfinite(options.shift) and options.shift > 0):
        raise ConfigError(f"train.flow_shift = {options.shift!r}: must be a finite number > 0 (1.0 = no shift)")
    if options.shift is not None and options.dynamic_shift is True:
        raise ConfigError(
            f"train.flow_shift = {options.shift!r} with dynamic shifting on: a static shift and the "
            "resolution-dependent one exclude each other; set one of them"
        )


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"tuner.flow draws on the CPU; pass a CPU torch.Generator, not one on {generator.device}")


def sample_u(size: int, options: FlowOptions, generator: torch.Generator | None) -> torch.Tensor:
    """Draw `size` values in (0, 1) (float32, CPU) from the density `options.timestep_sampling` names.

    Which noise levels training sees decides what the model is good at. The SD3 paper (§3.1) found that
    uniform sampling wastes steps on the ends, where the best velocity guess is easy (at sigma = 0 the input is
    the image and only the mean of the noise can be guessed, at sigma = 1 it is the noise and only the mean of
    the data), and that densities putting more weight on the middle train better:

    - `uniform`: u ~ U(0, 1).
    - `logit_normal`: logit(u) ~ N(logit_mean, logit_std**2), i.e. u = sigmoid(m + s·n); density
      1/(s·sqrt(2π)) · 1/(u(1-u)) · exp(-(logit(u) - m)² / (2s²)). The paper's best variant (m = 0, s = 1).
    - `mode`: u = f_mode(v) = 1 - v - s·(cos²(πv/2) - 1 + v) with v ~ U(0, 1): a heavier middle for s > 0,
      heavier ends for s < 0; s = 0 gives 1 - v, again uniform (in distribution: the very same draws mirrored).

    The result is clamped into [2**-24, 1 - 2**-24] so no draw sits on an endpoint (see `_U_EPS`).
    `generator` is a CPU generator; None draws from torch's global RNG (not reproducible across a resume).
    """
    validate(options)
    _check_generator(generator)
    if options.timestep_sampling == "logit_normal":
        normal = torch.randn((size,), generator=generator, dtype=torch.float32)
        u = torch.sigmoid(normal * options.logit_std + options.logit_mean)
    elif options.timestep_sampling == "mode":
        v = torch.rand((size,), generator=generator, dtype=torch.float32)
        u = 1.0 - v - options.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1.0 + v)
    else:
        u = torch.rand((size,), generator=generator, dtype=torch.float32)
    return u.clamp(_U_EPS, 1.0 - _U_EPS)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Static timestep shift: sigma = s·u / (1 + (s - 1)·u) (SD3 paper §5.3.2, SD3's s = 3.0).

    The map fixes 0 and 1 and, for s > 1, pushes every level toward noise: it keeps the signal-to-noise ratio
    of u but divides it by s² (SNR = ((1-σ)/σ)², and (1-σ)/σ = (1-u)/(s·u)), which is what an image with s²
    times the pixels needs to be as destroyed as the base resolution was at u. s = 1 is the identity. The same
    map as `FlowMatchEulerDiscreteScheduler(shift=s)` applies to its sigmas when `use_dynamic_shifting` is off.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    return shift * u / (1 + (shift - 1) * u)


def resolution_mu(
    image_seq_len: int,
    base_seq: int = 256,
    max_seq: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's shift exponent mu for an image of `image_seq_len` transformer tokens (its patches).

    mu grows linearly in the token count, from `base_shift` at `base_seq` tokens (256 = a 256×256 image for
    FLUX.1) to `max_shift` at `max_seq` (4096 = 1024×1024), and extrapolates linearly outside that range, as
    the Flux pipeline does. Bigger images get a bigger shift toward noise for the reason `shift_sigmas` gives.
    The defaults are the FlowMatchEulerDiscreteScheduler defaults FLUX.1 ships with.
    """
    if max_seq == base_seq:
        raise ValueError("resolution_mu: max_seq and base_seq must differ")
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return float(base_shift + slope * (image_seq_len - base_seq))


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """FLUX.1's exponential (resolution-dependent) shift: exp(mu) / (exp(mu) + (1/sigma - 1)).

    This is `shift_sigmas` with s = exp(mu) written in odds form ((1-σ)/σ is divided by e^mu), so mu is a
    log-shift that `resolution_mu` interpolates linearly in the token count. It equals the exponential
    `time_shift(mu, 1.0, sigmas)` of `FlowMatchEulerDiscreteScheduler` with `use_dynamic_shifting=True`.
    Sigmas must lie in (0, 1]; 0 has no defined image (1/sigma), which `sample_u` never returns.
    """
    e = math.exp(mu)
    return e / (e + (1 / sigmas - 1))


def _config_value(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    return _SCHEDULER_DEFAULTS[key] if value is None else value


def training_sigmas(
    size: int,
    options: FlowOptions,
    scheduler_config: dict[str, Any],
    image_seq_len: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Noise levels for one batch: `size` float32 sigmas in (0, 1] on the CPU.

    Draws u with `sample_u`, then shifts it the way the model's `FlowMatchEulerDiscreteScheduler` config says,
    so training sees the noise levels inference will use:
    - dynamic (`options.dynamic_shift`, or, when it and `options.shift` are None, the config's
      `use_dynamic_shifting`: FLUX.1): `time_shift(resolution_mu(image_seq_len, ...), u)` with the config's
      `base_image_seq_len`, `max_image_seq_len`, `base_shift`, `max_shift`;
    - otherwise static: `shift_sigmas(u, options.shift or the config's shift)` (SD3/3.5: 3.0; 1.0 = none).
    `image_seq_len` is the transformer's token count for this batch's latents (only the dynamic shift reads it).
    """
    validate(options)
    if options.dynamic_shift is not None:
        dynamic = options.dynamic_shift
    else:
        dynamic = options.shift is None and bool(_config_value(scheduler_config, "use_dynamic_shifting"))
    u = sample_u(size, options, generator)
    if dynamic:
        kind = _config_value(scheduler_config, "time_shift_type")
        if kind != "exponential":
            raise ConfigError(
                f"the model's scheduler uses time_shift_type = {kind!r}; tuner trains only the exponential "
                "dynamic shift (FLUX.1); set a static train.flow_shift instead"
            )
        mu = resolution_mu(
            image_seq_len,
            base_seq=_config_value(scheduler_config, "base_image_seq_len"),
            max_seq=_config_value(scheduler_config, "max_image_seq_len"),
            base_shift=_config_value(scheduler_config, "base_shift"),
            max_shift=_config_value(scheduler_config, "max_shift"),
        )
        sigmas = time_shift(mu, u)
    else:
        shift = options.shift if options.shift is not None else float(_config_value(scheduler_config, "shift"))
        sigmas = shift_sigmas(u, shift)
    return sigmas.to(torch.float32)


def _per_example(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(
            f"sigmas must have shape ({like.shape[0]},) for a batch of {like.shape[0]}, got {tuple(sigmas.shape)}"
        )
    return sigmas.view(-1, *([1] * (like.ndim - 1)))


def noisy_and_target(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input (1 - σ)·x + σ·ε and the velocity target ε - x, one sigma per example.

    The target is the derivative of the input along σ, the same for every σ on a given (x, ε) line: that
    straight path is what lets rectified-flow models sample in few steps. Sigmas (shape (batch,)) are broadcast
    over the non-batch dimensions. The arithmetic runs in at least float32 (half-precision sigmas would move
    the noise levels), and both results come back in `latents`' dtype on `latents`' device.
    """
    if noise.shape != latents.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from latents shape {tuple(latents.shape)}")
    dtype = torch.promote_types(latents.dtype, torch.float32)
    x = latents.to(dtype)
    eps = noise.to(device=latents.device, dtype=dtype)
    s = _per_example(sigmas, latents).to(device=latents.device, dtype=dtype)
    noisy = (1 - s) * x + s * eps
    target = eps - x
    return noisy.to(latents.dtype), target.to(latents.dtype)


def timesteps_of(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timestep the transformer is told: sigma · num_train_timesteps, on the 0..1000 scale.

    diffusers' `SD3Transformer2DModel` embeds this value directly (sinusoidal embedding of t in [0, 1000]).
    `FluxTransformer2DModel` instead takes timestep / 1000 (= sigma) and multiplies by 1000 inside; its
    pipeline passes `timestep / 1000`, so a FLUX.1 caller divides this result by 1000 (or passes sigma).
    The scale is continuous: no rounding to the scheduler's integer grid.
    """
    return sigmas * num_train_timesteps


def loss_weighting(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-example loss weights (float32, shape of `sigmas`) for SD3's weighting schemes.

    Weighting by a density p(σ) while sampling σ some other way trains, in expectation, like sampling from
    p·(the sampling density): the weight is a second knob on which noise levels matter.
    - `none`: ones; the plain conditional flow-matching loss (with logit-normal sampling, the SD3 paper's best
      variant).
    - `sigma_sqrt`: σ⁻² (diffusers' name for it); leans hard on the clean end (100 at σ = 0.1, 1 at σ = 1).
      Unbounded as σ → 0, which is why `sample_u` keeps u off 0.
    - `cosmap`: 2 / (π·(1 - 2σ + 2σ²)), the density of the SD3 paper's CosMap sampling
      σ = 1 - 1/(tan(πu/2) + 1): bounded, 2/π at the ends and 4/π at σ = 1/2.
    """
    if scheme not in WEIGHTING_SCHEMES:
        raise ConfigError(f"train.weighting_scheme = {scheme!r}: allowed: {', '.join(WEIGHTING_SCHEMES)}")
    s = sigmas.float()
    if scheme == "sigma_sqrt":
        return s**-2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s**2))
    return torch.ones_like(s)
