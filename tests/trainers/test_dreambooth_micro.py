"""DreamBooth on the built-in micro model: the instance prompt moves toward the photos, the class prompt less.

A random tiny model cannot show this (its random VAE maps every image to nearly the same latents), so the test
uses the shipped micro model and the example subject, through the `micro-subject-lora` preset the demo runs.
"""

from pathlib import Path

import pytest
import torch

from tuner.config import load_config
from tuner.loop import train
from tuner.micro.evaluate import subject_likeness
from tuner.models import BUILTIN_PREFIX, has_builtin_model
from tuner.sampling import load_loras, load_pipeline, lora_file, set_lora_scale

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "datasets" / "micro-subject"
SEEDS = range(6)


pytestmark = pytest.mark.skipif(not has_builtin_model("micro"), reason="this install has no built-in micro model")


def likeness(pipe, prompt: str) -> float:
    """How close the samples' palette is to the photos' (1 = same histogram): continuous, so it moves with learning
    long before the judge's verdict on the subject flips."""
    out = pipe(
        [prompt] * len(SEEDS),
        num_inference_steps=20,
        guidance_scale=4.0,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    return subject_likeness(out)


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
    moved = {}
    for prompt in ("a photo of a sks heart", "a photo of a heart"):
        set_lora_scale(pipe, names, 0.0)
        base = likeness(pipe, prompt)
        set_lora_scale(pipe, names, 1.0)
        moved[prompt] = likeness(pipe, prompt) - base
    print(f"subject likeness moved: {moved}")
    instance, klass = moved["a photo of a sks heart"], moved["a photo of a heart"]
    # Measured with the shipped micro model: instance +0.09, class -0.03; without the text encoder trained the
    # instance moves +0.02, and an adapter that learns nothing moves neither. The class prompt must not follow.
    assert instance > 0.045, moved
    assert instance > 2 * abs(klass), moved
