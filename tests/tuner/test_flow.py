"""Rectified-flow training math (`tuner.flow`) against hand-written formulas and diffusers' own scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from tuner import flow
from tuner.errors import TunerError
from tuner.flow import FlowOptions


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- noisy input and target ---------------------------------------------------------------------------------


def test_noisy_and_target_match_the_interpolation_written_out():
    latents = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 2) / 10 - 1
    noise = torch.linspace(2.0, -3.0, 24).reshape(3, 2, 2, 2)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy, target = flow.noisy_and_target(latents, noise, sigmas)
    for i, s in enumerate([0.0, 0.25, 1.0]):
        expect = latents[i] + s * (noise[i] - latents[i])  # another form of (1 - s) x + s ε
        torch.testing.assert_close(noisy[i], expect, rtol=0, atol=1e-6)
        torch.testing.assert_close(target[i], noise[i] - latents[i], rtol=0, atol=0)
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[2], noise[2])


def test_noisy_and_target_keep_dtype_and_accept_any_rank():
    latents = torch.randn(2, 16, 8, generator=gen(1)).to(torch.bfloat16)  # e.g. packed Flux tokens
    noise = torch.randn(2, 16, 8, generator=gen(2)).to(torch.bfloat16)
    noisy, target = flow.noisy_and_target(latents, noise, torch.tensor([0.3, 0.9]))
    assert noisy.dtype == target.dtype == torch.bfloat16 and noisy.shape == latents.shape
    expect = 0.7 * latents[0].float() + 0.3 * noise[0].float()
    torch.testing.assert_close(noisy[0].float(), expect, rtol=0.01, atol=0.02)
    with pytest.raises(ValueError, match="sigmas"):
        flow.noisy_and_target(latents, noise, torch.tensor([0.3, 0.9, 0.1]))


def test_timesteps_are_sigma_times_the_train_steps():
    sigmas = torch.tensor([0.001, 0.5, 1.0])
    torch.testing.assert_close(flow.timesteps_of(sigmas), torch.tensor([1.0, 500.0, 1000.0]))
    torch.testing.assert_close(flow.timesteps_of(sigmas, 500), torch.tensor([0.5, 250.0, 500.0]))


# --- shifts -------------------------------------------------------------------------------------------------


def test_static_shift_equals_the_schedulers_own_sigmas():
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler()  # shift 1.0: the unshifted table
    u = plain.timesteps / plain.config.num_train_timesteps
    torch.testing.assert_close(flow.shift_sigmas(u, 3.0), shifted.sigmas, rtol=0, atol=1e-6)
    assert torch.equal(flow.shift_sigmas(u, 1.0), u)


def test_static_shift_divides_the_odds_by_the_shift():
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for s in (0.5, 3.0, 6.0):
        sig = flow.shift_sigmas(u, s)
        # (1 - sigma) / sigma == (1 - u) / (s * u)
        torch.testing.assert_close((1 - sig) / sig, (1 - u) / (s * u))
    assert flow.shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_resolution_mu_is_fluxs_linear_interpolation():
    assert flow.resolution_mu(256) == pytest.approx(0.5)
    assert flow.resolution_mu(4096) == pytest.approx(1.15)
    assert flow.resolution_mu((256 + 4096) // 2) == pytest.approx((0.5 + 1.15) / 2)
    assert flow.resolution_mu(8192) == pytest.approx(1.15 + 0.65 * 4096 / 3840)  # extrapolates
    for n in (64, 1024, 4096, 6400):
        assert flow.resolution_mu(n, 256, 4096, 0.5, 1.15) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15))


def test_time_shift_equals_the_dynamic_schedulers_sigmas():
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    u = np.linspace(1.0, 0.02, 24, dtype=np.float32)
    for mu in (0.5, 0.87, 1.15):
        sched.set_timesteps(sigmas=u.tolist(), mu=mu)
        got = flow.time_shift(mu, torch.from_numpy(u))
        torch.testing.assert_close(got, sched.sigmas[:-1], rtol=0, atol=1e-6)
        # and written out: 1 / (1 + e^-mu (1/u - 1))
        hand = torch.tensor([1 / (1 + math.exp(-mu) * (1 / float(x) - 1)) for x in u])
        torch.testing.assert_close(got, hand, rtol=0, atol=1e-6)


def test_training_sigmas_follow_a_static_scheduler_config():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
    opts = FlowOptions(timestep_sampling="logit_normal")
    sigmas = flow.training_sigmas(64, opts, dict(sched.config), image_seq_len=4096, generator=gen(5))
    u = flow.sample_u(64, opts, gen(5))
    sched.set_timesteps(sigmas=u.tolist())
    torch.testing.assert_close(sigmas, sched.sigmas[:-1], rtol=0, atol=1e-6)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (64,)
    # an explicit shift overrides the config's, 1.0 turns the shift off
    same_u = flow.training_sigmas(64, FlowOptions(shift=1.0), dict(sched.config), 4096, gen(5))
    torch.testing.assert_close(same_u, u)


def test_training_sigmas_follow_a_dynamic_scheduler_config():
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0,  # ignored while the shift is dynamic
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    config = dict(sched.config)
    opts = FlowOptions()
    for tokens in (256, 1024, 4096):
        sigmas = flow.training_sigmas(32, opts, config, tokens, gen(9))
        u = flow.sample_u(32, opts, gen(9))
        sched.set_timesteps(sigmas=u.tolist(), mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
        torch.testing.assert_close(sigmas, sched.sigmas[:-1], rtol=0, atol=1e-6)
    # bigger images get noisier levels
    small = flow.training_sigmas(32, opts, config, 256, gen(9))
    large = flow.training_sigmas(32, opts, config, 4096, gen(9))
    assert bool((large > small).all())


def test_shift_precedence_between_options_and_config():
    dynamic = {"use_dynamic_shifting": True, "shift": 3.0}
    u = flow.sample_u(16, FlowOptions(), gen(3))
    # the config's dynamic shift, unless the options turn it off (then the config's static shift) ...
    off = flow.training_sigmas(16, FlowOptions(dynamic_shift=False), dynamic, 1024, gen(3))
    torch.testing.assert_close(off, flow.shift_sigmas(u, 3.0))
    # ... or name a static shift
    static = flow.training_sigmas(16, FlowOptions(shift=2.0), dynamic, 1024, gen(3))
    torch.testing.assert_close(static, flow.shift_sigmas(u, 2.0))
    # the options can ask for the dynamic shift on a static config; missing keys take the scheduler defaults
    on = flow.training_sigmas(16, FlowOptions(dynamic_shift=True), {"shift": 3.0}, 1024, gen(3))
    torch.testing.assert_close(on, flow.time_shift(flow.resolution_mu(1024), u))
    with pytest.raises(TunerError, match="train.flow_shift"):
        flow.training_sigmas(16, FlowOptions(shift=2.0, dynamic_shift=True), dynamic, 1024, gen(3))
    with pytest.raises(TunerError, match="time_shift_type"):
        flow.training_sigmas(16, FlowOptions(), {**dynamic, "time_shift_type": "linear"}, 1024, gen(3))


def test_training_sigmas_stay_in_range_at_extreme_densities():
    config = {"shift": 3.0}
    for mean in (-200.0, 200.0):  # every draw saturates to 0 or 1 before the clamp
        opts = FlowOptions(logit_mean=mean, weighting_scheme="sigma_sqrt")
        for cfg in (config, {"use_dynamic_shifting": True}):
            sigmas = flow.training_sigmas(8, opts, cfg, 4096, gen(0))
            assert bool(((sigmas > 0) & (sigmas <= 1)).all())
            assert bool(torch.isfinite(flow.loss_weighting(sigmas, "sigma_sqrt")).all())


# --- weightings ---------------------------------------------------------------------------------------------


def test_loss_weightings_at_a_few_sigmas():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow.loss_weighting(sigmas, "none"), torch.ones(3))
    torch.testing.assert_close(flow.loss_weighting(sigmas, "sigma_sqrt"), torch.tensor([100.0, 4.0, 1 / 0.81]))
    # 1 - 2s + 2s^2 is 0.82 at 0.1 and 0.9 and 0.5 at 0.5
    expect = torch.tensor([2 / (math.pi * 0.82), 4 / math.pi, 2 / (math.pi * 0.82)])
    torch.testing.assert_close(flow.loss_weighting(sigmas, "cosmap"), expect)
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        w = flow.loss_weighting(sigmas, scheme)
        torch.testing.assert_close(w, compute_loss_weighting_for_sd3(scheme, sigmas).float())
        assert w.dtype == torch.float32 and w.shape == sigmas.shape


def test_cosmap_weight_is_the_density_of_cosmap_sampling():
    # SD3 paper: t = 1 - 1 / (tan(pi u / 2) + 1) with u uniform; its density is d u / d t of the inverse map
    def inverse(t: float) -> float:
        return 2 / math.pi * math.atan(t / (1 - t))  # tan(pi u / 2) = 1 / (1 - t) - 1 = t / (1 - t)

    h = 1e-6
    for t in (0.05, 0.3, 0.5, 0.77):
        density = (inverse(t + h) - inverse(t - h)) / (2 * h)
        assert flow.loss_weighting(torch.tensor([t], dtype=torch.float64), "cosmap").item() == pytest.approx(
            density, rel=1e-5
        )


# --- sampling densities -------------------------------------------------------------------------------------


def test_logit_normal_has_the_asked_mean_and_spread():
    n = 200_000
    opts = FlowOptions(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    u = flow.sample_u(n, opts, gen(1234)).double()
    logit = torch.log(u / (1 - u))
    se = 0.8 / math.sqrt(n)  # standard error of the mean, ~0.0018
    assert logit.mean().item() == pytest.approx(0.5, abs=6 * se)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    assert u.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.005)
    assert bool(((u > 0) & (u < 1)).all())


def test_mode_with_scale_zero_is_uniform():
    n = 100_000
    uniform = flow.sample_u(n, FlowOptions(timestep_sampling="uniform"), gen(7))
    mode0 = flow.sample_u(n, FlowOptions(timestep_sampling="mode", mode_scale=0.0), gen(7))
    # the same draws, mirrored: f_mode(v; 0) = 1 - v
    torch.testing.assert_close(mode0, 1 - uniform, rtol=0, atol=1e-7)
    for q in (0.1, 0.25, 0.5, 0.9):
        assert (mode0 <= q).double().mean().item() == pytest.approx(q, abs=0.005)


def test_mode_sampling_follows_the_papers_mapping():
    n = 100_000
    s = 1.29
    u = flow.sample_u(n, FlowOptions(timestep_sampling="mode", mode_scale=s), gen(11))
    # f(v) = 1 - v - s (v - sin^2(pi v / 2)) decreases, so P(u <= f(v0)) = 1 - v0
    for v0 in (0.1, 0.3, 0.5, 0.8):
        t0 = 1 - v0 - s * (v0 - math.sin(math.pi * v0 / 2) ** 2)
        assert (u <= t0).double().mean().item() == pytest.approx(1 - v0, abs=0.006)
    # a heavier middle than uniform
    assert (((u > 0.25) & (u < 0.75)).double().mean().item()) > 0.6


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_sampling_matches_diffusers_for_the_same_generator(sampling):
    opts = FlowOptions(timestep_sampling=sampling, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = flow.sample_u(256, opts, gen(21))
    theirs = compute_density_for_timestep_sampling(
        sampling, 256, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=gen(21)
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_same_seed_same_draws_and_a_restored_generator_repeats_them(sampling):
    opts = FlowOptions(timestep_sampling=sampling)
    config = {"shift": 3.0}
    a = flow.training_sigmas(32, opts, config, 1024, gen(42))
    b = flow.training_sigmas(32, opts, config, 1024, gen(42))
    assert torch.equal(a, b)
    assert not torch.equal(a, flow.training_sigmas(32, opts, config, 1024, gen(43)))
    g = gen(42)
    flow.sample_u(5, opts, g)
    state = g.get_state()
    first = flow.sample_u(5, opts, g)
    g.set_state(state)
    assert torch.equal(first, flow.sample_u(5, opts, g))
    # the global RNG is untouched when a generator is passed
    torch.manual_seed(0)
    before = torch.get_rng_state()
    flow.training_sigmas(8, opts, config, 1024, gen(1))
    assert torch.equal(before, torch.get_rng_state())


# --- validation ---------------------------------------------------------------------------------------------


def test_bad_names_raise_tuner_errors_naming_the_field():
    with pytest.raises(TunerError, match=r"train\.timestep_sampling.*uniform, logit_normal, mode"):
        flow.sample_u(4, FlowOptions(timestep_sampling="lognorm"), gen())
    with pytest.raises(TunerError, match=r"train\.weighting_scheme.*none, sigma_sqrt, cosmap"):
        flow.training_sigmas(4, FlowOptions(weighting_scheme="cosine"), {}, 256, gen())
    with pytest.raises(TunerError, match=r"train\.weighting_scheme"):
        flow.loss_weighting(torch.tensor([0.5]), "sqrt")
    with pytest.raises(TunerError, match=r"train\.timestep_sampling"):
        flow.validate(FlowOptions(timestep_sampling="Uniform"))
    with pytest.raises(TunerError, match=r"train\.mode_scale"):
        flow.validate(FlowOptions(timestep_sampling="mode", mode_scale=2.0))
    with pytest.raises(TunerError, match=r"train\.timestep_std"):
        flow.validate(FlowOptions(logit_std=0.0))
    flow.validate(FlowOptions(timestep_sampling="uniform", logit_std=0.0, mode_scale=5.0))  # unread: fine
    with pytest.raises(TunerError, match=r"train\.flow_shift"):
        flow.validate(FlowOptions(shift=-1.0))
    flow.validate(FlowOptions())
    for sampling in flow.TIMESTEP_SAMPLINGS:
        for scheme in flow.WEIGHTING_SCHEMES:
            flow.validate(FlowOptions(timestep_sampling=sampling, weighting_scheme=scheme))
