"""The shared denoising loss: targets, min-SNR-γ weights, prior split, noise offset, input perturbation, and
that all randomness comes from the generator the loop hands in."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from tuner.errors import TunerError
from tuner.losses import (
    LossOptions,
    compute_snr,
    diffusion_loss,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    split_prior,
    target_for,
)

SCHEDULER = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_targets_epsilon_and_v_prediction():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    assert torch.equal(target_for(SCHEDULER, "epsilon", latents, noise, t), noise)
    ac = SCHEDULER.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ac.sqrt() * noise - (1 - ac).sqrt() * latents  # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
    assert torch.allclose(target_for(SCHEDULER, "v_prediction", latents, noise, t), expected, atol=1e-6)
    with pytest.raises(TunerError, match="v_prediction"):
        target_for(SCHEDULER, "sample", latents, noise, t)


def test_min_snr_weights():
    t = torch.tensor([0, 400, 999])
    ac = SCHEDULER.alphas_cumprod[t]
    assert torch.allclose(compute_snr(SCHEDULER, t), ac / (1 - ac))
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_prior_split_weighting():
    loss = torch.tensor([1.0, 2.0, 3.0, 5.0])
    is_prior = torch.tensor([False, False, True, True])
    assert split_prior(loss, is_prior, 0.5) == pytest.approx(1.5 + 0.5 * 4.0)
    assert split_prior(loss, None, 0.5) == pytest.approx(2.75)
    assert split_prior(loss, torch.zeros(4, dtype=torch.bool), 0.5) == pytest.approx(2.75)
    assert split_prior(loss, torch.ones(4, dtype=torch.bool), 0.5) == pytest.approx(0.5 * 2.75)


def test_noise_offset_is_one_value_per_example_and_channel():
    latents = torch.zeros(2, 4, 8, 8)
    plain = sample_noise(latents, LossOptions(), torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn(2, 4, 8, 8, generator=_g(3)))
    offset = sample_noise(latents, LossOptions(noise_offset=0.1), torch.Generator().manual_seed(3))
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))  # constant over height and width
    assert 0 < shift.abs().max() < 0.5 and shift[:, :, 0, 0].unique().numel() == 8


class _ZeroUNet(nn.Module):
    """Predicts zeros, so the loss is exactly the (weighted) mean square of the target."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        return SimpleNamespace(sample=torch.zeros_like(sample) + 0 * self.anchor)


@pytest.fixture(scope="module")
def sd1_parts(tiny_models):
    """Tiny SD1 parts, run with one intra-op thread (faster for a model this small on busy cores)."""
    from tuner.models import load_parts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_parts(str(tiny_models["sd1"]))
    torch.set_num_threads(threads)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n=4):
    g = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(n, 4, 8, 8, generator=g), "prompt_embeds": torch.randn(n, 77, 32, generator=g)}


def test_diffusion_loss_draws_only_from_the_given_generator(sd1_parts):
    batch, options = _batch(), LossOptions()
    a = diffusion_loss(sd1_parts, batch, options, generator=_g(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = diffusion_loss(sd1_parts, batch, options, generator=_g(7))
    c = diffusion_loss(sd1_parts, batch, options, generator=_g(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dim() == 0


def test_input_perturbation_changes_the_input_not_the_target(sd1_parts):
    parts = dataclasses.replace(sd1_parts, denoiser=_ZeroUNet())
    batch = _batch()
    plain = diffusion_loss(parts, batch, LossOptions(), generator=_g(4))
    perturbed = diffusion_loss(parts, batch, LossOptions(input_perturbation=0.5), generator=_g(4))
    assert torch.equal(plain, perturbed)  # zero prediction: loss = mean(target²) = mean(noise²), unperturbed
    real = diffusion_loss(sd1_parts, batch, LossOptions(input_perturbation=0.5), generator=_g(4))
    assert not torch.equal(real, diffusion_loss(sd1_parts, batch, LossOptions(), generator=_g(4)))


def test_snr_gamma_and_prior_weight_reach_the_loss(sd1_parts):
    parts = dataclasses.replace(sd1_parts, denoiser=_ZeroUNet())
    batch = _batch()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    per_example = noise.pow(2).mean(dim=(1, 2, 3))
    weights = min_snr_weights(compute_snr(SCHEDULER, t), 5.0, "epsilon")
    loss = diffusion_loss(parts, batch, LossOptions(snr_gamma=5.0), generator=_g(5))
    assert loss.item() == pytest.approx((per_example * weights).mean().item(), rel=1e-5)
    batch["is_prior"] = torch.tensor([False, False, True, True])
    loss = diffusion_loss(parts, batch, LossOptions(prior_loss_weight=0.25), generator=_g(5))
    assert loss.item() == pytest.approx(per_example[:2].mean().item() + 0.25 * per_example[2:].mean().item(), rel=1e-5)


def test_prior_target_replaces_the_class_half(sd1_parts):
    parts = dataclasses.replace(sd1_parts, denoiser=_ZeroUNet())
    batch = {**_batch(), "is_prior": torch.tensor([False, False, True, True])}
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(4, 4, 8, 8, generator=g)

    def frozen(noisy, timesteps, cond):
        return torch.full_like(noisy, 2.0)

    loss = diffusion_loss(parts, batch, LossOptions(), generator=_g(6), prior_target=frozen)
    assert loss.item() == pytest.approx(noise[:2].pow(2).mean().item() + 4.0, rel=1e-5)


def test_logit_normal_timesteps_gather_at_mid_noise_and_follow_their_mean():
    def draw(**kw):
        return sample_timesteps(20000, 1000, LossOptions(**kw), torch.Generator().manual_seed(0))

    uniform, centered, shifted = (
        draw(),
        draw(timestep_sampling="logit_normal"),
        draw(timestep_sampling="logit_normal", timestep_mean=1.0),
    )
    for t in (uniform, centered, shifted):
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    mid = [float(((t >= 300) & (t < 700)).float().mean()) for t in (uniform, centered)]
    assert abs(mid[0] - 0.4) < 0.02 and mid[1] > 0.5, mid
    assert abs(float(centered.float().median()) - 500) < 15
    assert abs(float(shifted.float().median()) - 731) < 15  # sigmoid(1.0) * 1000
    assert torch.equal(centered, draw(timestep_sampling="logit_normal")), "same generator, same timesteps"
    with pytest.raises(TunerError, match="timestep_sampling"):
        draw(timestep_sampling="cosine")


def test_mean_targets_reach_uncached_batches(sd1_parts):
    """`latent_cache_mode = "mean"` holds for batches the cache skips (random crops): the VAE's mean, no draw."""
    from tuner.conditioning import batch_latents, encode_pixels, scale_latents
    from tuner.config import build_config

    pixels = torch.rand(2, 3, 64, 64, generator=_g(2)) * 2 - 1
    mean, _ = encode_pixels(sd1_parts, pixels)
    batch = {"pixel_values": pixels}
    clean = batch_latents(sd1_parts, batch, _g(1), sample=False)
    assert torch.allclose(clean, scale_latents(sd1_parts, mean.float()))
    assert torch.equal(clean, batch_latents(sd1_parts, batch, _g(2), sample=False))
    drawn = [batch_latents(sd1_parts, batch, _g(seed)) for seed in (1, 2)]
    assert not torch.equal(drawn[0], drawn[1]) and not torch.allclose(drawn[0], clean)

    def options(mode):
        model, data = {"pretrained_model_name_or_path": "m"}, {"path": "d", "latent_cache_mode": mode}
        return LossOptions.from_config(
            build_config([("test", {"method": "dreambooth", "model": model, "data": data})])
        )

    assert (
        not options("mean").sample_latents
        and options("distribution").sample_latents
        and options("sample").sample_latents
    )
