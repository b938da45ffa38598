"""The random-init micro pipeline: SD1 architecture at micro widths, micro-world vocabulary, loadable as diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuner.micro import world
from tuner.micro.init import EXTRA_WORDS, build_micro_pipeline, main, param_counts


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro-init") / "pipe"
    assert main([str(folder)]) == 0
    return folder


def test_sizes_and_structure():
    pipe = build_micro_pipeline()
    counts = param_counts(pipe)
    assert 0.3e6 < counts["vae"] < 1.5e6 and 2e6 < counts["unet"] < 7e6 and counts["text_encoder"] < 1e6
    assert pipe.vae.config.latent_channels == 4 and len(pipe.vae.config.block_out_channels) == 3  # 4x: 64 -> 16
    assert "CrossAttnDownBlock2D" in pipe.unet.config.down_block_types
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.num_hidden_layers == 2


def test_every_world_word_is_one_token():
    tokenizer = build_micro_pipeline().tokenizer
    for word in [*world.WORDS, *EXTRA_WORDS]:
        assert len(tokenizer.tokenize(word)) == 1, word


def test_seeded_init_is_deterministic():
    a, b = build_micro_pipeline(seed=3), build_micro_pipeline(seed=3)
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), name


def test_saved_folder_loads_in_the_suite_and_in_diffusers(micro_dir):
    from diffusers import StableDiffusionPipeline

    from tuner.models import load_parts

    parts = load_parts(str(micro_dir))
    assert parts.family.name == "sd1"
    pipe = StableDiffusionPipeline.from_pretrained(micro_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a white background", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
