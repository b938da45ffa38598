"""The first contract: a folder with sidecars gives deterministic, one-bucket batches of the promised keys."""

from __future__ import annotations

import torch

from tuner.data import build_training_data


def test_folder_with_sidecars_gives_batches(tmp_path, tiny_parts, make_config, noise_image):
    for i in range(5):
        noise_image(tmp_path / f"img{i}.png", seed=i, caption=f"a photo of thing {i}")
    config = make_config(tmp_path, enable_bucket=False)
    data = build_training_data(config, tiny_parts("sd1"), frozenset({"latents", "text_embeds"}))
    assert data.num_examples == 5 and data.batches_per_epoch == 3
    batches = list(data.iterate(0))
    assert len(batches) == 3
    batch = batches[0]
    assert batch["latent_mean"].shape == (2, 4, 8, 8) and batch["latent_std"].shape == (2, 4, 8, 8)
    assert batch["prompt_embeds"].shape[:2] == (2, 77)
    assert batch["original_size"].tolist() == [[64, 64], [64, 64]]
    assert batch["target_size"].tolist() == [[64, 64], [64, 64]]
    again = list(data.iterate(0, start=1))
    assert [b["captions"] for b in again] == [b["captions"] for b in batches[1:]]
    assert torch.equal(again[0]["latent_mean"], batches[1]["latent_mean"])
