"""Batching: deterministic per (seed, epoch), exact resume with `start`, rank splits, one bucket per batch."""

from __future__ import annotations

import pytest
import torch

from tuner.data import build_training_data

SIZES = [(64, 64), (48, 80), (80, 48)]


@pytest.fixture
def mixed(tmp_path, noise_image):
    """11 images in three aspect buckets, each with a unique caption."""
    for i in range(11):
        noise_image(tmp_path / f"img{i:02d}.png", size=SIZES[i % 3], seed=i, caption=f"pic {i}, tag{i % 2}, extra")
    return tmp_path


def build(config, parts, needs=("pixels",), **kw):
    return build_training_data(config, parts, frozenset(needs), verbose=False, **kw)


def order(data, epoch, start=0):
    return [tuple(b["captions"]) for b in data.iterate(epoch, start)]


def test_order_is_deterministic_per_seed_and_epoch_and_resumable(mixed, make_config, tiny_parts):
    parts = tiny_parts("sd1")
    config = make_config(mixed, batch_size=2, random_flip=0.5, caption_dropout_rate=0.2, shuffle_tags=True,
                         keep_tokens=1, crop="random")  # fmt: skip
    data = build(config, parts)
    # 3 buckets of 4/4/3 images -> 2+2+2 batches, one padded example
    assert data.batches_per_epoch == 6 and data.report.batching["padded_examples"] == 1
    first = list(data.iterate(0))
    again = build(config, parts)
    second = list(again.iterate(0))
    assert order(data, 0) == [tuple(b["captions"]) for b in second]
    for a, b in zip(first, second):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["crop_top_left"], b["crop_top_left"])
    resumed = list(again.iterate(0, start=4))
    assert len(resumed) == 2
    for a, b in zip(first[4:], resumed):
        assert a["captions"] == b["captions"] and torch.equal(a["pixel_values"], b["pixel_values"])
    assert order(data, 1) != order(data, 0)
    assert order(build(make_config(mixed, batch_size=2, seed=7, random_flip=0.5), parts), 0) != order(data, 0)
    for batch in first:
        h, w = batch["pixel_values"].shape[-2:]
        assert batch["target_size"].tolist() == [[h, w]] * len(batch["captions"])
    assert list(data.iterate(0, start=6)) == []


def test_no_image_is_dropped_and_padding_repeats_the_same_bucket(mixed, make_config, tiny_parts):
    data = build(make_config(mixed, batch_size=4), tiny_parts("sd1"))
    seen = set()
    for batch in data.iterate(3):
        assert len(batch["captions"]) == 4
        seen.update(c.split(",")[0] for c in batch["captions"])
    assert seen == {f"pic {i}" for i in range(11)}
    assert data.report.batching["dropped_from_buckets"] == 0
    assert data.report.batching["padded_examples"] == 1  # buckets of 4, 4 and 3 images


def test_ranks_split_each_global_batch(mixed, make_config, tiny_parts):
    parts = tiny_parts("sd1")
    config = make_config(mixed, batch_size=2, random_flip=0.5)
    single = build(make_config(mixed, batch_size=4, random_flip=0.5), parts)
    ranks = [build(config, parts, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == single.batches_per_epoch
    for whole, a, b in zip(single.iterate(2), ranks[0].iterate(2), ranks[1].iterate(2)):
        assert whole["captions"] == a["captions"] + b["captions"]
        assert torch.equal(whole["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"]]))
        assert a["pixel_values"].shape[-2:] == b["pixel_values"].shape[-2:]


def test_keys_follow_needs(mixed, make_config, tiny_parts):
    parts = tiny_parts("sd1")
    ids = next(build(make_config(mixed), parts, needs=("input_ids",)).iterate(0))
    assert set(ids) == {"captions", "input_ids", "original_size", "crop_top_left", "target_size"}
    assert len(ids["input_ids"]) == 1 and ids["input_ids"][0].shape == (2, 77)
    random_crop = next(build(make_config(mixed, crop="random"), parts, needs=("latents",)).iterate(0))
    assert "pixel_values" in random_crop and "latent_mean" not in random_crop
    sample = next(build(make_config(mixed, latent_cache_mode="sample"), parts, needs=("latents",)).iterate(0))
    assert "latents" in sample and "latent_mean" not in sample and "pixel_values" not in sample
    mean = next(build(make_config(mixed, latent_cache_mode="mean"), parts, needs=("latents",)).iterate(0))
    assert set(mean) & {"latents", "latent_mean", "pixel_values"} == {"latents"}
    distribution = next(build(make_config(mixed), parts, needs=("latents",)).iterate(0))
    assert torch.allclose(mean["latents"], distribution["latent_mean"]), "the mean mode caches the posterior mean"


def test_holdout_and_model_prior(mixed, make_config, tiny_parts):
    parts = tiny_parts("sd1")
    config = make_config(mixed, holdout_fraction=0.2, with_prior_preservation=True, prior_mode="model",
                         class_prompt="a photo of a thing")  # fmt: skip
    data = build(config, parts, needs=("latents", "text_embeds"))
    assert len(data.holdout) == 2 and data.num_examples == 9 and data.report.holdout == 2
    held = {h.name for h in data.holdout}
    assert all(e.name not in held for e in data.entries)
    assert data.holdout[0].pixel_values.shape[0] == 3
    batch = next(data.iterate(0))
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["captions"][2:] == ["a photo of a thing"] * 2
    assert torch.equal(batch["latent_mean"][:2], batch["latent_mean"][2:])
    assert batch["prompt_embeds"].shape[0] == 4


def test_dataloader_workers_give_the_same_batches(mixed, make_config, tiny_parts):
    parts = tiny_parts("sd1")
    needs = ("latents", "text_embeds", "pixels")
    inline = list(build(make_config(mixed, random_flip=0.5), parts, needs=needs).iterate(1, start=1))
    config = make_config(mixed, random_flip=0.5, dataloader_num_workers=2)
    workers = list(build(config, parts, needs=needs).iterate(1, start=1))
    assert len(inline) == len(workers) == 5
    for a, b in zip(inline, workers):
        assert a["captions"] == b["captions"]
        for key in ("pixel_values", "latent_mean", "latent_std", "prompt_embeds", "crop_top_left"):
            assert torch.equal(a[key], b[key]), key
