"""Training objectives: what a noisy input and its target are, given clean latents and noise.

`DenoisingDiffusion` is DDPM-style training (epsilon or v-prediction from the scheduler config, min-SNR-γ,
input perturbation) for the UNet families; `RectifiedFlow` is flow matching (velocity `noise - latents`,
shifted sigmas, SD3's loss weightings) for the transformer families. A family names its objective; the loss
asks it and never branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuner import flow
from tuner.errors import ConfigError

if TYPE_CHECKING:
    from tuner.losses import LossOptions
    from tuner.models import Parts


@dataclass
class Noised:
    """One batch ready for the denoiser: its input, the timesteps it is told, the target, per-example weights."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None


class DenoisingDiffusion:
    """DDPM noising with the base's betas; the target follows the scheduler's `prediction_type`."""

    name = "ddpm"

    def check(self, options: LossOptions) -> None:
        if options.timestep_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(
                f"train.timestep_sampling = {options.timestep_sampling!r}: this model trains with DDPM noise; "
                "allowed: uniform, logit_normal"
            )
        if options.weighting_scheme != "none":
            raise ConfigError(
                f"train.weighting_scheme = {options.weighting_scheme!r} applies to flow-matching models (SD3, Flux); "
                "for epsilon / v-prediction models use train.snr_gamma"
            )

    def noised(self, parts: Parts, latents, noise, options: LossOptions, generator) -> Noised:
        from tuner.losses import compute_snr, min_snr_weights, sample_timesteps, target_for

        scheduler = parts.noise_scheduler
        size = latents.shape[0]
        timesteps = sample_timesteps(size, scheduler.config.num_train_timesteps, options, generator)
        timesteps = timesteps.to(latents.device)
        model_noise = noise
        if options.input_perturbation:
            extra = torch.randn(noise.shape, generator=generator).to(noise)
            model_noise = noise + options.input_perturbation * extra
        noisy = scheduler.add_noise(latents, model_noise, timesteps)
        target = target_for(scheduler, parts.prediction_type, latents, noise, timesteps)
        weights = None
        if options.snr_gamma:
            weights = min_snr_weights(compute_snr(scheduler, timesteps), options.snr_gamma, parts.prediction_type)
        return Noised(noisy, timesteps, target, weights)


class RectifiedFlow:
    """Flow matching (SD3, FLUX.1): x_s = (1 - s) x + s ε, the model predicts the velocity ε - x.

    Sigmas are drawn by `train.timestep_sampling` and shifted as the model's flow-match scheduler says: a static
    shift (SD3: 3.0) or, where the scheduler uses dynamic shifting (Flux), by the image's token count.
    """

    name = "flow_matching"

    def __init__(self, patch_size: int = 2):
        self.patch_size = patch_size

    def check(self, options: LossOptions) -> None:
        if options.snr_gamma:
            raise ConfigError(
                "train.snr_gamma: min-SNR weighting is for epsilon / v-prediction models; flow-matching models "
                "weight the loss with train.weighting_scheme (none, sigma_sqrt, cosmap)"
            )
        if options.input_perturbation:
            raise ConfigError("train.input_perturbation: not defined for flow-matching models; set it to 0")
        flow.validate(self.flow_options(options))

    @staticmethod
    def flow_options(options: LossOptions) -> flow.FlowOptions:
        return flow.FlowOptions(
            timestep_sampling=options.timestep_sampling,
            logit_mean=options.timestep_mean,
            logit_std=options.timestep_std,
            mode_scale=options.mode_scale,
            weighting_scheme=options.weighting_scheme,
            shift=options.flow_shift,
        )

    def noised(self, parts: Parts, latents, noise, options: LossOptions, generator) -> Noised:
        fo = self.flow_options(options)
        config: dict[str, Any] = dict(parts.noise_scheduler.config)
        tokens = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
        sigmas = flow.training_sigmas(latents.shape[0], fo, config, tokens, generator).to(latents.device)
        noisy, target = flow.noisy_and_target(latents, noise, sigmas)
        timesteps = flow.timesteps_of(sigmas, config.get("num_train_timesteps", 1000))
        weights = flow.loss_weighting(sigmas, fo.weighting_scheme)
        return Noised(noisy, timesteps, target, None if fo.weighting_scheme == "none" else weights)
