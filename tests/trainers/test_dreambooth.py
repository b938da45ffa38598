"""DreamBooth end to end on tiny models: full fine-tune with prior preservation, DreamBooth-LoRA, image-free prior."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from trainers.dreambooth import DreamBoothTrainer, check_identifier, identifier_of
from tuner.config import build_config
from tuner.errors import ConfigError
from tuner.loop import train
from tuner.losses import split_prior
from tuner.micro.render import render_set
from tuner.models import load_parts


def make_config(model, photos, out, *, steps=6, data=None, dreambooth=None, validation=None, train_cfg=None):
    layer = {
        "method": "dreambooth",
        "model": {"pretrained_model_name_or_path": str(model)},
        "data": {
            "path": str(photos),
            "resolution": 64,
            "enable_bucket": False,
            "instance_prompt": "a photo of sks heart",
            "class_prompt": "a photo of heart",
            **(data or {}),
        },
        "optimizer": {"name": "adamw", "learning_rate": 1e-4},
        "train": {
            "output_dir": str(out),
            "max_train_steps": steps,
            "checkpointing_steps": 1000,
            "report_to": "none",
            **(train_cfg or {}),
        },
        "validation": {"enabled": False, **(validation or {})},
        "dreambooth": dreambooth or {},
    }
    return build_config([("test", layer)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six photos of the micro world's checkered-heart concept, without caption files."""
    folder = tmp_path_factory.mktemp("photos")
    for path in render_set(folder, "concept", 6, seed=3):
        path.with_suffix(".txt").unlink()
    (folder / "labels.jsonl").unlink()
    return folder


def unet_state(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_dreambooth_with_prior_preservation_writes_a_pipeline_that_samples(family, tiny_models, photos, tmp_path):
    class_dir = tmp_path / "class"
    config = make_config(
        tiny_models[family],
        photos,
        tmp_path / "run",
        data={
            "with_prior_preservation": True,
            "class_data_dir": str(class_dir),
            "num_class_images": 3,
            "class_inference_steps": 2,
        },
        validation={"enabled": True, "num_inference_steps": 2, "seeds": [0]},
    )
    run = train(config)
    artifact = json.loads((run / "artifact.json").read_text())
    assert artifact["method"] == "dreambooth" and artifact["trigger"] == "sks"
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")
    base = load_parts(str(tiny_models[family]))
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base.denoiser.state_dict()[k])]
    assert changed, "the UNet did not train"
    for name in ("vae", "text_encoder"):
        saved, original = getattr(pipe, name).state_dict(), getattr(base, "vae" if name == "vae" else "text_encoder")
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in saved.items()), f"{name} must stay frozen"
    image = pipe("a photo of sks heart", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert np.isfinite(image).all()
    assert len(list(class_dir.glob("*.png"))) == 3
    assert list((run / "grids").glob("*.png"))


def test_class_images_are_generated_once_and_reused(tiny_models, photos, tmp_path):
    class_dir = tmp_path / "class"
    data = {
        "with_prior_preservation": True,
        "class_data_dir": str(class_dir),
        "num_class_images": 2,
        "class_inference_steps": 2,
    }
    train(make_config(tiny_models["sd1"], photos, tmp_path / "a", steps=1, data=data))
    first = {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")}
    assert len(first) == 2
    train(make_config(tiny_models["sd1"], photos, tmp_path / "b", steps=1, data=data))
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")} == first


def test_dreambooth_lora_passes_the_round_trip_check(tiny_models, photos, tmp_path):
    config = make_config(
        tiny_models["sd1"], photos, tmp_path / "run", dreambooth={"lora": True, "rank": 4, "alpha": 8}
    )
    run = train(config)
    artifact = json.loads((run / "artifact.json").read_text())
    formats = {f["format"] for f in artifact["files"]}
    assert (run / "pytorch_lora_weights.safetensors").is_file() and len(formats) >= 2
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd1"])
    pipe.load_lora_weights(run)
    assert not (run / "pipeline").exists()


def test_image_free_prior_targets_come_from_the_frozen_base(tiny_models, photos, tmp_path):
    config = make_config(tiny_models["sd1"], photos, tmp_path / "run", data={"with_prior_preservation": True})
    config.data.prior_mode = "model"
    trainer = DreamBoothTrainer(config)
    parts = load_parts(str(tiny_models["sd1"]))
    base = unet_state(parts.denoiser)
    trainer.prepare(parts)
    with torch.no_grad():
        for p in parts.denoiser.parameters():
            p.add_(0.01)  # the trained UNet moves ...
    assert all(torch.equal(v, base[k]) for k, v in trainer.frozen_unet.state_dict().items())  # ... the copy not
    noisy = torch.randn(1, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(1, 77, 32)}
    t = torch.tensor([10])
    frozen = trainer._frozen_prediction(parts, noisy, t, cond)
    parts_base = load_parts(str(tiny_models["sd1"]))
    assert torch.allclose(frozen, parts_base.denoiser(noisy, t, **cond).sample, atol=1e-5)
    assert not torch.allclose(frozen, parts.denoiser(noisy, t, **cond).sample, atol=1e-3)


def test_prior_loss_is_computed_on_the_class_half_and_weighted():
    loss = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_prior = torch.tensor([False, False, True, True])
    assert split_prior(loss, is_prior, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert split_prior(loss, None, 0.5).item() == pytest.approx(loss.mean().item())


def test_text_encoder_trains_only_for_its_first_steps(tiny_models, photos, tmp_path):
    config = make_config(
        tiny_models["sd1"],
        photos,
        tmp_path / "run",
        steps=4,
        dreambooth={"train_text_encoder": True, "text_encoder_steps": 2, "save_format": "unet"},
    )
    run = train(config)
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "unet=unet" in json.loads((run / "artifact.json").read_text())["files"][0]["load"]


def test_identifier_checks(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    assert identifier_of("a photo of sks dog", "a photo of dog", None) == "sks"
    assert identifier_of("a photo of sks dog", None, "zwx") == "zwx"
    assert any("common word" in w for w in check_identifier(parts, "dog"))
    assert any("splits into" in w for w in check_identifier(parts, "qzxvbk"))
    assert check_identifier(parts, "sks") == []


def test_missing_prompts_are_config_errors(tiny_models, photos, tmp_path):
    config = make_config(tiny_models["sd1"], photos, tmp_path / "run", data={"with_prior_preservation": True})
    config.data.class_prompt = None
    with pytest.raises(ConfigError, match="data.class_prompt"):
        DreamBoothTrainer(config)
