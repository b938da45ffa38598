"""DreamBooth on the built-in micro model: the instance prompt moves toward the photos, the class prompt less.

A random tiny model cannot show this (its random VAE maps every image to nearly the same latents), so the test
uses the shipped micro model and the example subject, through the `micro-subject-lora` preset the demo runs.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.config import load_config
from tuner.loop import train
from tuner.micro.world import PALETTE
from tuner.models import BUILTIN_PREFIX, has_builtin_model
from tuner.sampling import load_loras, load_pipeline, lora_file, set_lora_scale

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "datasets" / "micro-subject"
SEEDS = range(6)


pytestmark = pytest.mark.skipif(not has_builtin_model("micro"), reason="this install has no built-in micro model")


def subject_color_coverage(images: np.ndarray) -> float:
    """Fraction of pixels in the subject's own yellow (no base-world object of that shade fills the frame)."""
    yellow = np.array(PALETTE["yellow"], dtype=np.float32) / 255
    return float((np.linalg.norm(images - yellow, axis=-1) < 0.3).mean())


def coverage(pipe, prompt: str) -> float:
    out = pipe(
        [prompt] * len(SEEDS),
        num_inference_steps=20,
        guidance_scale=4.0,
        height=64,
        width=64,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    return subject_color_coverage(out)


def test_instance_prompt_moves_toward_the_photos_more_than_the_class_prompt(tmp_path):
    overrides = {
        "model": {"pretrained_model_name_or_path": f"{BUILTIN_PREFIX}micro"},
        "data": {"path": str(PHOTOS), "class_data_dir": str(tmp_path / "class"), "cache_dir": str(tmp_path / "c")},
        "train": {"output_dir": str(tmp_path / "run"), "report_to": "none"},
    }
    config = load_config(preset="micro-subject-lora", overrides=overrides, sets=["validation.enabled=false"])
    run = train(config)
    pipe = load_pipeline("builtin:micro")
    names = load_loras(pipe, [lora_file(run)])
    photos = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in sorted(PHOTOS.glob("*.png"))])
    target = subject_color_coverage(photos)
    moved = {}
    for prompt in ("a photo of a sks heart", "a photo of a heart"):
        set_lora_scale(pipe, names, 0.0)
        base = coverage(pipe, prompt)
        set_lora_scale(pipe, names, 1.0)
        moved[prompt] = coverage(pipe, prompt) - base
    print(f"subject-colour coverage: photos {target:.3f}, moved {moved}")
    instance, klass = moved["a photo of a sks heart"], moved["a photo of a heart"]
    # Measured with the shipped micro model: instance +0.105, class +0.063 (the photos themselves: 0.080). The class
    # prompt leaks (prior drift, bench/results/quality.md), but the instance prompt must still lead clearly.
    assert instance > 0.05, moved
    assert instance > 1.3 * abs(klass), moved
