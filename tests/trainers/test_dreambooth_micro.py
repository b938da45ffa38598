"""DreamBooth on the built-in micro model: the instance prompt draws the subject, the class prompt does not.

A random tiny model cannot show this (its random VAE maps every image to nearly the same latents), so the test
uses the shipped micro model and the example subject (a black heart the base can draw, behind `sks`), through the
`micro-subject-lora` preset the demo runs, with the prior images the demo and the quality bench use.
"""

from pathlib import Path

import pytest
import torch

from tuner.config import load_config
from tuner.loop import train
from tuner.micro.evaluate import is_subject, subject_likeness
from tuner.micro.judge import Judge
from tuner.micro.quality import prior_images
from tuner.models import BUILTIN_PREFIX, has_builtin_model
from tuner.sampling import load_loras, load_pipeline, lora_file, set_lora_scale

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "datasets" / "micro-subject"
SEEDS = range(6)
INSTANCE = "a photo of a sks heart on a yellow background"  # a background its photos show
CONTEXT = "a photo of a sks heart on a red background"  # a background none of them shows
CLASS = "a photo of a heart on a blue background"


pytestmark = pytest.mark.skipif(not has_builtin_model("micro"), reason="this install has no built-in micro model")


def samples(pipe, prompt: str) -> list:
    return pipe(
        [prompt] * len(SEEDS),
        num_inference_steps=20,
        guidance_scale=4.0,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images


@pytest.mark.slow  # about 2 min: DreamBooth on the micro base, judged
def test_instance_prompt_draws_the_subject_and_the_class_prompt_does_not(tmp_path):
    overrides = {
        "model": {"pretrained_model_name_or_path": f"{BUILTIN_PREFIX}micro"},
        "data": {"path": str(PHOTOS), "class_data_dir": str(tmp_path / "class"), "cache_dir": str(tmp_path / "c")},
        "train": {"output_dir": str(tmp_path / "run"), "report_to": "none"},
    }
    config = load_config(preset="micro-subject-lora", overrides=overrides, sets=["validation.enabled=false"])
    prior_images("builtin:micro", tmp_path / "class", config.data.num_class_images)
    run = train(config)
    pipe = load_pipeline("builtin:micro")
    names = load_loras(pipe, [lora_file(run)])
    judge, found, moved = Judge(), {}, {}
    for scale in (0.0, 1.0):
        set_lora_scale(pipe, names, scale)
        for prompt in (INSTANCE, CONTEXT, CLASS):
            images = samples(pipe, prompt)
            found[scale, prompt] = sum(is_subject(judge(image)) for image in images)
            moved[scale, prompt] = subject_likeness(images)
    print(f"subject found (of {len(SEEDS)}): {found}\nsubject likeness: {moved}")
    # Measured with the shipped micro model (400 steps): the subject on 7 of 8 instance samples and 4 of 4 on red,
    # none on the class prompt; the base draws it on none of them. An adapter that learns nothing finds it nowhere.
    assert found[1.0, INSTANCE] >= 4 and found[1.0, INSTANCE] > found[0.0, INSTANCE] + 2, found
    assert found[1.0, CONTEXT] >= 3, found
    assert found[1.0, CLASS] <= found[0.0, CLASS] + 1, found
