"""img2img and inpainting through the stock pipelines: strength 0 keeps the init image, a mask keeps the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from tuner.errors import TunerError
from tuner.img2img import InitImage, call_kwargs, image_pipeline, load_init_images, round_trip
from tuner.validation import render

SIZE = 32


@pytest.fixture(scope="module")
def init() -> Image.Image:
    blocks = np.random.default_rng(0).integers(0, 255, (4, 4, 3))
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8))


def _mask(width: int) -> Image.Image:
    """White (repaint) on the left `width` pixels."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    if width:
        mask.paste(255, (0, 0, width, SIZE))
    return mask


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_strength_zero_returns_the_init_image_and_a_mask_keeps_what_is_outside_it(tiny_models, family, init):
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, width=SIZE, height=SIZE)
    kept = np.asarray(round_trip(pipe, init, SIZE, SIZE))
    for mask in (None, _mask(16)):
        (image,) = render(pipe, ["a dog"], [0], init=InitImage(init, 0.0, mask), **kwargs)[0]
        assert np.array_equal(np.asarray(image), kept)  # no step taken: the init image through the VAE
    (moved,) = render(pipe, ["a dog"], [0], init=InitImage(init, 0.6), **kwargs)[0]
    assert np.abs(np.asarray(moved).astype(int) - kept).mean() > 1

    # Inpainting: outside the mask the final latents are the init image's own latents, exactly, so its pixels
    # are the VAE round trip of the init (the tiny VAE's mid-block attention spreads any latent to all pixels,
    # so the check is made on the latents the VAE decodes).
    latents = {}
    for width in (0, 16):
        spec = InitImage(init, 1.0, _mask(width))
        pipe_kwargs = {**call_kwargs(spec, SIZE, SIZE), "num_inference_steps": 2, "guidance_scale": 1.0}
        out = image_pipeline(pipe, spec)(prompt="a dog", generator=torch.Generator().manual_seed(0),
                                         output_type="latent", **pipe_kwargs)  # fmt: skip
        latents[width] = out.images
    scale = pipe.vae_scale_factor
    outside, inside = slice(16 // scale, None), slice(0, 16 // scale)
    assert torch.equal(latents[16][..., outside], latents[0][..., outside])
    assert not torch.allclose(latents[16][..., inside], latents[0][..., inside])


def test_init_image_inputs_are_checked(tmp_path, init):
    init.save(tmp_path / "a.png")
    _mask(8).save(tmp_path / "m.png")
    (spec,) = load_init_images([tmp_path / "a.png"], [tmp_path / "m.png"], [0.5])
    assert spec.kind == "inpaint" and spec.label() == "[inpaint a, strength 0.5]"
    with pytest.raises(TunerError, match="strength 1.5: must be between 0 and 1"):
        load_init_images([tmp_path / "a.png"], strengths=[1.5])
    with pytest.raises(TunerError, match=r"--mask: 2 masks for 1 init images"):
        load_init_images([tmp_path / "a.png"], ["m.png", "m.png"], mask_field="--mask")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(TunerError, match=r"--init-image '.*notes.txt': expected an image"):
        load_init_images([tmp_path / "notes.txt"], field="--init-image")


def test_tuner_sample_renders_img2img_and_inpaint_rows(tiny_models, tmp_path, init):
    from tuner.cli import main

    init.save(tmp_path / "init.png")
    _mask(16).save(tmp_path / "mask.png")
    common = ["--model", str(tiny_models["sd1"]), "--prompt", "a (red:1.3) dog", "--steps", "2", "--width", "32",
              "--height", "32", "--guidance-scale", "1", "--init-image", str(tmp_path / "init.png")]  # fmt: skip
    assert main(["sample", *common, "--strength", "0.5", "--sampler", "Euler a", "DDIM", "--out",
                 str(tmp_path / "i2i")]) == 0  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "i2i").iterdir())
    assert names == [
        "a-red-1-3-dog_img2img0.5_ddim_seed0.png",
        "a-red-1-3-dog_img2img0.5_euler-a_seed0.png",
        "grid.png",
    ]
    assert main(["grid", *common, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "inp")]) == 0
    assert Image.open(tmp_path / "inp" / "grid.png").format == "PNG"
