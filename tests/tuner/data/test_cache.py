"""Caches: warm epochs and warm runs never call the VAE or text encoders; any key change recomputes."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tuner.conditioning import batch_conditioning, encode_captions, encode_pixels
from tuner.data import build_training_data
from tuner.data.assemble import Row


@contextlib.contextmanager
def counting(parts):
    """Forward calls of the real VAE encoder and text encoders, counted with hooks."""
    counts = {"vae": 0, "text": 0}

    def hook(name):
        def bump(*_):
            counts[name] += 1

        return bump

    handles = [parts.vae.encoder.register_forward_hook(hook("vae"))]
    handles += [enc.register_forward_hook(hook("text")) for enc in parts.text_encoders]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


NEEDS = frozenset({"latents", "text_embeds"})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_warm_epochs_and_runs_touch_no_encoder(tmp_path, family, make_config, noise_image, tiny_parts):
    parts = tiny_parts(family)
    for i in range(6):
        noise_image(tmp_path / f"{i}.png", size=[(64, 64), (48, 80)][i % 2], seed=i, caption=f"thing {i}")
    config = make_config(tmp_path, random_flip=0.5, caption_dropout_rate=0.3)
    with counting(parts) as counts:
        data = build_training_data(config, parts, NEEDS, verbose=False)
        assert counts["vae"] > 0 and counts["text"] > 0
        cold = dict(counts)
        batches = [b for epoch in range(3) for b in data.iterate(epoch)]
        assert counts == cold, "warm epochs must not call the VAE or text encoders"
        again = build_training_data(config, parts, NEEDS, verbose=False)
        rerun = [b for epoch in range(3) for b in again.iterate(epoch)]
        assert counts == cold, "a second run reuses the on-disk caches"
    assert data.cache_dir == tmp_path / ".tuner-cache"
    assert len(list((data.cache_dir / "latents").rglob("*.safetensors"))) == 12  # 6 images x (plain, flipped)
    assert len(list((data.cache_dir / "text").rglob("*.safetensors"))) == 7  # 6 captions + the empty one
    for a, b in zip(batches, rerun):
        assert torch.equal(a["latent_mean"], b["latent_mean"]) and torch.equal(a["prompt_embeds"], b["prompt_embeds"])
    assert any("" in b["captions"] for b in batches)
    batch = batches[0]
    if family == "sdxl":
        assert batch["pooled_prompt_embeds"].shape == (2, 32) and batch["prompt_embeds"].shape == (2, 77, 64)
        kwargs = batch_conditioning(parts, batch)
        ids = kwargs["added_cond_kwargs"]["time_ids"]
        expected = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        assert torch.equal(ids, expected.to(ids.dtype))
    with torch.no_grad():
        embeds, _ = encode_captions(parts, batch["captions"])
    torch.testing.assert_close(batch["prompt_embeds"], embeds)


def test_cached_latents_match_fresh_encoding_and_flips_differ(tmp_path, make_config, noise_image, tiny_parts):
    parts = tiny_parts("sd1")
    for i in range(4):
        noise_image(tmp_path / f"{i}.png", seed=i, caption="x")
    data = build_training_data(make_config(tmp_path, random_flip=0.5), parts, frozenset({"latents", "pixels"}),
                               verbose=False)  # fmt: skip
    for batch in data.iterate(0):
        with torch.no_grad():
            mean, std = encode_pixels(parts, batch["pixel_values"])
        torch.testing.assert_close(batch["latent_mean"], mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch["latent_std"], std, atol=1e-5, rtol=1e-4)
    row = data.rows(0, 0)[0]
    plain = data.assembler.latents([Row(row.entry, row.placement, False, row.caption)])["latent_mean"]
    mirrored = data.assembler.latents([Row(row.entry, row.placement, True, row.caption)])["latent_mean"]
    assert not torch.equal(plain, mirrored)


def test_key_changes_invalidate(tmp_path, make_config, noise_image, tiny_parts):
    parts = tiny_parts("sd1")
    for i in range(3):
        noise_image(tmp_path / f"{i}.png", seed=i, caption=f"thing {i}")
    build_training_data(make_config(tmp_path), parts, NEEDS, verbose=False)
    with counting(parts) as counts:
        (tmp_path / "1.txt").write_text("a new caption", encoding="utf-8")
        noise_image(tmp_path / "2.png", seed=99)  # new content, same name
        build_training_data(make_config(tmp_path), parts, NEEDS, verbose=False)
        assert counts == {"vae": 1, "text": 1}, "only the changed image and the changed caption are recomputed"
        build_training_data(make_config(tmp_path, enable_bucket=False, resolution=32, min_image_side=8), parts,
                            frozenset({"latents"}), verbose=False)  # fmt: skip
        assert counts["vae"] == 2, "a new transform (size) is a new key"
        build_training_data(make_config(tmp_path, latent_cache_mode="sample"), parts, frozenset({"latents"}),
                            verbose=False)  # fmt: skip
        assert counts["vae"] == 3, "the cache mode is part of the key"
