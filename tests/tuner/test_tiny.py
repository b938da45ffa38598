import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from tuner.cli import main
from tuner.errors import TunerError
from tuner.models import detect_family, load_parts

PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def test_make_tiny_cli_writes_a_loadable_pipeline_that_samples(tmp_path, family, capsys):
    target = tmp_path / f"tiny-{family}"
    assert main(["make-tiny", str(target), "--family", family]) == 0
    assert "wrote a tiny" in capsys.readouterr().out
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family].__name__
    assert list(target.glob("unet/*.safetensors")) and not list(target.rglob("*.bin"))
    pipe = PIPELINES[family].from_pretrained(target)
    image = pipe(
        "a red star on a blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_tiny_models_are_deterministic(tmp_path):
    from tuner.tiny import make_tiny

    a, b = make_tiny(tmp_path / "a", "sd1"), make_tiny(tmp_path / "b", "sd1")
    for rel in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_family_detection(tiny_models, family):
    fam, prediction = detect_family(str(tiny_models[family]))
    assert fam.name == family
    assert prediction == ("v_prediction" if family == "sd2" else "epsilon")


def test_load_parts_freezes_everything_and_knows_the_family(tiny_models, family):
    parts = load_parts(str(tiny_models[family]))
    assert parts.family.name == family
    assert len(parts.text_encoders) == len(parts.tokenizers) == (2 if family == "sdxl" else 1)
    assert parts.vae_scale_factor == 8
    modules = [parts.denoiser, parts.vae, *parts.text_encoders]
    assert not any(p.requires_grad for m in modules for p in m.parameters())


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunerError, match="not a local diffusers folder"):
        load_parts("someone/not-a-local-model")


def test_unsupported_family_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    fam, prediction = detect_family(str(tmp_path))
    assert fam.name == "flux" and not fam.trainable and prediction == "flow_matching"
    with pytest.raises(TunerError, match="flux family"):
        load_parts(str(tmp_path))
