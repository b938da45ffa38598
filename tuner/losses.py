"""The denoising loss shared by every method that trains the denoiser, on every family.

Noise (with offset), the family's objective (`tuner.objectives`: DDPM epsilon / v-prediction with min-SNR-γ,
or rectified flow with shifted sigmas and SD3's weightings), the family's forward pass, and the
prior-preservation split (instance and class examples in one batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tuner.conditioning import batch_conditioning, batch_latents
from tuner.errors import TunerError
from tuner.models import Parts


@dataclass(frozen=True)
class LossOptions:
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    timestep_sampling: str = "uniform"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    mode_scale: float = 1.29
    weighting_scheme: str = "none"
    flow_shift: float | None = None
    sample_latents: bool = True
    """Draw each target from the VAE's latent distribution; False takes its mean (`data.latent_cache_mode`)."""

    @classmethod
    def from_config(cls, config: Any) -> LossOptions:
        return cls(
            noise_offset=config.train.noise_offset,
            input_perturbation=config.train.input_perturbation,
            snr_gamma=config.train.snr_gamma,
            prior_loss_weight=config.data.prior_loss_weight,
            timestep_sampling=config.train.timestep_sampling,
            timestep_mean=config.train.timestep_mean,
            timestep_std=config.train.timestep_std,
            mode_scale=config.train.mode_scale,
            weighting_scheme=config.train.weighting_scheme,
            flow_shift=config.train.flow_shift,
            sample_latents=config.data.latent_cache_mode != "mean",
        )


def compute_snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def target_for(scheduler: Any, prediction_type: str, latents, noise, timesteps) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TunerError(f"prediction type {prediction_type!r}: allowed: epsilon, v_prediction")


def per_example_loss(pred: torch.Tensor, target: torch.Tensor, snr_weights: torch.Tensor | None) -> torch.Tensor:
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return loss * snr_weights if snr_weights is not None else loss


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR+1) for v-prediction."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)


def split_prior(loss: torch.Tensor, is_prior: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Mean instance loss plus `weight` times the mean class (prior) loss; plain mean without a class half."""
    if is_prior is None or not bool(is_prior.any()):
        return loss.mean()
    is_prior = is_prior.to(loss.device, dtype=torch.bool)
    instance = loss[~is_prior].mean() if bool((~is_prior).any()) else loss.new_zeros(())
    return instance + weight * loss[is_prior].mean()


def sample_noise(latents: torch.Tensor, options: LossOptions, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    if options.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + options.noise_offset * offset.to(latents.device)
    return noise


def sample_timesteps(
    size: int, num_train_timesteps: int, options: LossOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """Training timesteps: uniform over the schedule, or logit-normal (Esser et al. 2024, SD3's default)."""
    if options.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (size,), generator=generator)
    if options.timestep_sampling == "logit_normal":
        normal = torch.randn((size,), generator=generator) * options.timestep_std + options.timestep_mean
        return (torch.sigmoid(normal) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    raise TunerError(f"train.timestep_sampling {options.timestep_sampling!r}: allowed: uniform, logit_normal")


def diffusion_loss(
    parts: Parts,
    batch: dict[str, Any],
    options: LossOptions,
    generator: torch.Generator | None = None,
    prior_target: Any = None,
) -> torch.Tensor:
    """The training loss of one batch through `parts.denoiser`.

    `prior_target`, when given, is a callable `(noisy, timesteps, conditioning) -> Tensor` used for the
    class half instead of the usual target (image-free prior preservation: the frozen model's prediction).
    """
    latents = batch_latents(parts, batch, generator, sample=options.sample_latents)
    noise = sample_noise(latents, options, generator)
    step = parts.family.objective.noised(parts, latents, noise, options, generator)
    cond = batch_conditioning(parts, batch)
    pred = parts.family.predict(parts, parts.denoiser, step.noisy, step.timesteps, cond)
    target = step.target
    is_prior = batch.get("is_prior")
    if prior_target is not None and is_prior is not None and bool(is_prior.any()):
        with torch.no_grad():
            frozen = prior_target(step.noisy, step.timesteps, cond)
        mask = is_prior.to(target.device, dtype=torch.bool).view(-1, *([1] * (target.ndim - 1)))
        target = torch.where(mask, frozen.to(target.dtype), target)
    return split_prior(per_example_loss(pred, target, step.weights), is_prior, options.prior_loss_weight)
