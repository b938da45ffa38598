"""The VAE round trip the micro benches use as their ceiling: real micro VAE, real renders, judged."""

from __future__ import annotations

import numpy as np
import pytest

from tuner.micro import world
from tuner.micro.evaluate import through_vae
from tuner.micro.judge import Judge
from tuner.models import has_builtin_model, resolve_model_path

pytestmark = pytest.mark.skipif(not has_builtin_model("micro"), reason="this install has no built-in micro model")


def test_through_vae_returns_latent_means_and_decodes_what_it_encoded():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(f"{resolve_model_path('builtin:micro')}/vae").eval()
    scenes = world.scenes("base", 6, seed=5)
    means, images = through_vae(vae, [scene.render() for scene in scenes])
    assert tuple(means.shape) == (6, 4, 16, 16)
    assert all(image.dtype == np.uint8 and image.shape == (64, 64, 3) for image in images)
    again, _ = through_vae(vae, [scene.render() for scene in scenes])
    assert np.array_equal(means.numpy(), again.numpy()), "means, not samples: the round trip is deterministic"
    judge = Judge()
    wanted = [{"color": scene.color, "background": scene.background} for scene in scenes]
    assert all(all(judge.score(image, w).values()) for image, w in zip(images, wanted))
