"""DreamBooth class images: generated once with the stock pipeline, reused by the next run, seeded per image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tuner.data import build_training_data, check_data


def test_class_images_are_generated_once_and_reused(tmp_path, make_config, noise_image, tiny_parts):
    parts = tiny_parts("sd1")
    instance, classes = tmp_path / "instance", tmp_path / "class"
    instance.mkdir()
    for i in range(2):
        noise_image(instance / f"{i}.png", seed=i)
    config = make_config(
        instance, instance_prompt="a photo of sks dog", with_prior_preservation=True, class_data_dir=str(classes),
        class_prompt="a photo of dog", num_class_images=3, sample_batch_size=2, class_inference_steps=2,
    )  # fmt: skip
    report = check_data(config)
    assert report.class_images["to_generate"] == 3 and not classes.exists(), "the check generates nothing"

    calls = []
    handle = parts.denoiser.register_forward_hook(lambda *_: calls.append(1))
    try:
        data = build_training_data(config, parts, frozenset({"latents", "text_embeds"}), verbose=False)
        first = len(calls)
        assert first > 0
        made = sorted(p.name for p in classes.glob("*.png"))
        assert len(made) == 3 and len(list(classes.glob("*.txt"))) == 3
        assert (classes / made[0]).with_suffix(".txt").read_text(encoding="utf-8").strip() == "a photo of dog"
        batch = next(data.iterate(0))
        assert batch["is_prior"].tolist() == [False, False, True, True]
        assert batch["captions"] == ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
        assert batch["latent_mean"].shape[0] == 4

        build_training_data(config, parts, frozenset({"latents", "text_embeds"}), verbose=False)
        assert len(calls) == first, "the second run must not call the pipeline"
        assert check_data(config).class_images["to_generate"] == 0

        original = np.asarray(Image.open(classes / made[1]), dtype=np.int16)
        (classes / made[1]).unlink()
        build_training_data(config, parts, frozenset({"latents"}), verbose=False)
        assert len(calls) > first, "a missing class image is generated again"
        # Same seed per image -> the same image; alone instead of in a batch of 3, CPU kernels may round a
        # pixel by one level (measured: at most 1 of 255).
        again = np.asarray(Image.open(classes / made[1]), dtype=np.int16)
        assert np.abs(again - original).max() <= 1, "same seed per image -> same image"
    finally:
        handle.remove()


def test_class_half_shares_the_instance_bucket_and_stays_cached(tmp_path, make_config, noise_image, tiny_parts):
    from tuner.config import SubsetConfig

    parts = tiny_parts("sd1")
    inst, reg = tmp_path / "inst", tmp_path / "reg"
    inst.mkdir(), reg.mkdir()
    for i in range(4):
        noise_image(inst / f"{i}.png", size=[(64, 64), (48, 80)][i % 2], seed=i)
    for i in range(3):
        noise_image(reg / f"{i}.png", seed=10 + i)  # all square
    subsets = [SubsetConfig(path=str(inst), class_tokens="sks dog"), SubsetConfig(path=str(reg), class_tokens="dog",
                                                                                  is_reg=True)]  # fmt: skip
    config = make_config(subsets=subsets, with_prior_preservation=True, random_flip=0.5)
    data = build_training_data(config, parts, frozenset({"latents"}), verbose=False)
    calls = []
    handle = parts.vae.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        shapes = set()
        for epoch in range(3):
            for batch in data.iterate(epoch):
                assert batch["is_prior"].tolist() == [False, False, True, True]
                assert batch["target_size"][0].tolist() == batch["target_size"][2].tolist()
                shapes.add(tuple(batch["latent_mean"].shape[-2:]))
        assert shapes == {(8, 8), (10, 6)} and not calls, "class latents for the 48x80 bucket were cached up front"
    finally:
        handle.remove()


def test_bad_instance_data_stops_before_any_class_image_is_generated(tmp_path, make_config, noise_image, tiny_parts):
    import pytest

    from tuner.errors import DataError

    parts = tiny_parts("sd1")
    noise_image(tmp_path / "a.png", seed=1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    config = make_config(tmp_path, instance_prompt="sks", with_prior_preservation=True, bad_file_policy="error",
                         class_data_dir=str(tmp_path / "class"), class_prompt="dog", num_class_images=2)  # fmt: skip
    calls = []
    handle = parts.denoiser.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(DataError, match="broken.png"):
            build_training_data(config, parts, frozenset({"latents"}), verbose=False)
    finally:
        handle.remove()
    assert not calls and not (tmp_path / "class").exists()
