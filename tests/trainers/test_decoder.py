"""The decoder trainer: what trains and what stays frozen, the PSNR gain on a domain the tiny VAE cannot
reconstruct, the exports (diffusers folder and LDM single file) and their reload checks, grids and metrics.

The domain: smooth two-colour ramps under a fine 2-pixel checkerboard. The random tiny VAE's 8x latents keep
the colours but its decoder cannot draw the checker; a tuned decoder learns to, which raises held-out PSNR.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tuner.config import build_config
from tuner.errors import ConfigError, TunerError

SIZE = 32
STEPS = 80
MIN_PSNR_GAIN = 3.0
"""Measured at 80 steps (edge_weight 1, lr 2e-3, batch 4): +6.3 to +7.4 dB through `tuner.loop.train` over train
seeds 0-3, +7.3 to +7.6 dB with the hand loop over seeds 0-3. A decoder that only learns the mean colours (no
checker; what L1 alone or lr 5e-3 often gives) gains about +1.2 dB, so 3 dB tells the two apart with headroom."""


def pattern(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    checker = ((xs // 2 + ys // 2) % 2) * 2 - 1
    a, b = rng.uniform(-0.8, 0.8, (2, 3, 1, 1))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys) / size * 0.5 + 0.5
    image = np.clip(a * ramp + b * (1 - ramp) + 0.6 * checker, -1, 1)
    return Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8))


@pytest.fixture(scope="module")
def patterns(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("patterns")
    for i in range(20):
        pattern(i).save(folder / f"p{i:02d}.png")
    return folder


def make_config(model: Path, images: Path, out: Path, **tables):
    raw = {
        "method": "decoder",
        "model": {"pretrained_model_name_or_path": str(model)},
        "data": {
            "path": str(images),
            "resolution": SIZE,
            "enable_bucket": False,
            "min_bucket_reso": 32,
            "holdout_fraction": 0.2,
            "instance_prompt": "a pattern",  # captions are unused, but the data check wants one
        },
        "optimizer": {"name": "adamw", "learning_rate": 2e-3},
        "train": {"output_dir": str(out), "max_train_steps": STEPS, "train_batch_size": 4, "report_to": "none"},
        "validation": {"num_inference_steps": 2, "seeds": [0]},
        "decoder": {"edge_weight": 1.0},
    }
    for table, values in tables.items():
        raw.setdefault(table, {}).update(values)
    return build_config([("test", raw)])


def vae_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def split(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    frozen = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "quant_conv."))}
    return frozen, {k: v for k, v in tensors.items() if k.startswith("decoder.")}


def sample_with(model: Path, vae_folder: Path) -> np.ndarray:
    from diffusers import AutoencoderKL, DiffusionPipeline

    vae = AutoencoderKL.from_pretrained(vae_folder)
    pipe = DiffusionPipeline.from_pretrained(model, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a pattern", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np").images
    assert np.isfinite(images).all()
    return images


# --- config --------------------------------------------------------------------------------------------------


def test_config_defaults_and_errors(tiny_models, tmp_path):
    config = make_config(tiny_models["sd1"], tmp_path, tmp_path / "run")
    cfg = config.decoder
    assert (cfg.l1_weight, cfg.mse_weight, cfg.lpips_weight) == (1.0, 0.0, 0.0)
    assert cfg.train_post_quant_conv and not cfg.train_whole_vae and cfg.latent_sampling == "sample"
    zero = {"l1_weight": 0, "edge_weight": 0}
    with pytest.raises(ConfigError, match="l1_weight, mse_weight, lpips_weight and edge_weight are all 0"):
        make_config(tiny_models["sd1"], tmp_path, tmp_path / "run", decoder=zero)
    with pytest.raises(ConfigError, match="decoder.single_file_name"):
        make_config(tiny_models["sd1"], tmp_path, tmp_path / "run", decoder={"single_file_name": "../x.ckpt"})
    with pytest.raises(ConfigError, match="decoder.lpips_wieght: unknown key"):
        make_config(tiny_models["sd1"], tmp_path, tmp_path / "run", decoder={"lpips_wieght": 1})


# --- the trainer driven by hand (no loop) ----------------------------------------------------------------------


def test_prepare_trains_decoder_only(tiny_models, tmp_path):
    from tuner.models import load_parts
    from tuner.registry import get_trainer

    config = make_config(tiny_models["sd1"], tmp_path, tmp_path / "run")
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = get_trainer("decoder")(config)
    trainables = trainer.prepare(parts)
    vae = parts.vae
    assert trainables.needs == {"pixels", "latents"}
    assert [g["name"] for g in trainables.param_groups] == ["vae.decoder", "vae.post_quant_conv"]
    assert all(p.requires_grad for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()])
    frozen = [*vae.encoder.parameters(), *vae.quant_conv.parameters(), *parts.denoiser.parameters()]
    assert not any(p.requires_grad for p in frozen + list(parts.text_encoder.parameters()))


def test_cached_and_encoded_latents_give_the_same_loss(tiny_models, tmp_path):
    from tuner.conditioning import encode_pixels
    from tuner.models import load_parts
    from tuner.registry import get_trainer

    config = make_config(tiny_models["sd1"], tmp_path, tmp_path / "run", decoder={"latent_sampling": "mean"})
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = get_trainer("decoder")(config)
    trainer.prepare(parts)
    pixels = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    mean, std = encode_pixels(parts, pixels)
    cached = trainer.compute_loss(parts, {"pixel_values": pixels, "latent_mean": mean.detach(), "latent_std": std})
    encoded = trainer.compute_loss(parts, {"pixel_values": pixels})
    assert torch.equal(cached, encoded)
    cached.backward()
    assert parts.vae.decoder.conv_out.weight.grad is not None and parts.vae.encoder.conv_in.weight.grad is None

    class Wrapper(torch.nn.Module):  # what DDP looks like to a trainer: `.module` and a forward
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    vae = parts.vae
    parts.vae = Wrapper(vae)
    assert torch.equal(trainer.compute_loss(parts, {"pixel_values": pixels}), encoded)  # through the forward
    parts.vae = vae


def test_whole_vae_trains_the_encoder_too(tiny_models, tmp_path):
    from tuner.models import load_parts
    from tuner.registry import get_trainer

    config = make_config(tiny_models["sd1"], tmp_path, tmp_path / "run", decoder={"train_whole_vae": True})
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = get_trainer("decoder")(config)
    trainables = trainer.prepare(parts)
    assert trainables.needs == {"pixels"}  # cached latents would go stale
    assert [g["name"] for g in trainables.param_groups][2:] == ["vae.encoder", "vae.quant_conv"]
    trainer.compute_loss(parts, {"pixel_values": torch.rand(2, 3, SIZE, SIZE) * 2 - 1}).backward()
    assert parts.vae.encoder.conv_in.weight.grad is not None and parts.vae.quant_conv.weight.grad is not None


def test_lpips_weight_without_lpips_fails_before_training(tiny_models, tmp_path, monkeypatch):
    import sys

    from tuner.models import load_parts
    from tuner.registry import get_trainer

    monkeypatch.setitem(sys.modules, "lpips", None)
    config = make_config(tiny_models["sd1"], tmp_path, tmp_path / "run", decoder={"lpips_weight": 0.1})
    with pytest.raises(TunerError, match=r"decoder.lpips_weight = 0.1: .*pip install lpips.*weights"):
        get_trainer("decoder")(config).prepare(load_parts(str(tiny_models["sd1"])))


def test_hand_loop_raises_heldout_psnr_and_exports(tiny_models, patterns, tmp_path, capsys):
    """A minimal loop (AdamW, clipping, the data pipeline's batches): the gain, frozen parts, both exports."""
    from diffusers import AutoencoderKL

    from tuner.data import build_training_data
    from tuner.models import load_parts
    from tuner.registry import get_trainer

    torch.manual_seed(0)
    model = tiny_models["sd1"]
    config = make_config(model, patterns, tmp_path / "run")
    parts = load_parts(str(model))
    encoder_before = {k: v.clone() for k, v in parts.vae.state_dict().items() if not k.startswith("decoder.")}
    trainer = get_trainer("decoder")(config)
    trainables = trainer.prepare(parts)
    data = build_training_data(config, parts, trainables.needs, verbose=False)
    assert len(data.holdout) == 4
    optimizer = torch.optim.AdamW(trainables.param_groups, lr=config.optimizer.learning_rate)
    batch_gen = torch.Generator().manual_seed(0)
    step, epoch = 0, 0
    while step < STEPS:
        for batch in data.iterate(epoch):
            loss = trainer.compute_loss(parts, {**batch, "generator": batch_gen})
            assert torch.isfinite(loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainables.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == STEPS:
                break
        epoch += 1

    after = parts.vae.state_dict()
    changed = [k for k in encoder_before if not torch.equal(encoder_before[k], after[k])]
    assert changed == [k for k in encoder_before if k.startswith("post_quant_conv.")]  # encoder + quant_conv frozen

    grid = trainer.validation_images(parts, STEPS)
    assert grid.width > 5 * SIZE and grid.height > 2 * SIZE

    out = tmp_path / "run"
    out.mkdir()
    artifact = trainer.save(parts, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated"] == 4 and metrics["latents"] == "mean"
    assert metrics["gain"]["psnr"] == pytest.approx(metrics["tuned"]["psnr"] - metrics["base"]["psnr"])
    assert metrics["gain"]["psnr"] >= MIN_PSNR_GAIN, metrics
    assert metrics["tuned"]["ssim"] > metrics["base"]["ssim"]
    assert len(metrics["per_image"]) == 4 and "lpips" in metrics  # lpips: a note when not installed
    printed = capsys.readouterr().out
    assert "held-out image(s)" in printed and "PSNR" in printed

    base_frozen, base_decoder = split(vae_tensors(model / "vae"))
    tuned_frozen, tuned_decoder = split(vae_tensors(out / "vae"))
    assert base_frozen.keys() == tuned_frozen.keys()
    assert all(torch.equal(base_frozen[k], tuned_frozen[k]) for k in base_frozen)  # bitwise
    assert any(not torch.equal(base_decoder[k], tuned_decoder[k]) for k in base_decoder)

    assert [f.path for f in artifact.files] == ["vae", "decoder.vae.safetensors", "metrics.json"]
    assert artifact.extra["round_trip_max_difference"] == 0.0
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = parts.vae.decode(latents).sample
        for reloaded in (
            AutoencoderKL.from_pretrained(out / "vae"),
            AutoencoderKL.from_single_file(str(out / "decoder.vae.safetensors"), config=str(out / "vae")),
        ):
            assert torch.equal(reloaded.decode(latents).sample, want)
    assert sample_with(model, out / "vae").shape == (1, SIZE, SIZE, 3)


# --- the single file ----------------------------------------------------------------------------------------------


def test_ldm_single_file_names_and_exact_inverse(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from tuner.export.vae import to_ldm_vae_state_dict
    from tuner.tiny import tiny_vae

    vae = tiny_vae()
    original = vae.state_dict()
    ldm = to_ldm_vae_state_dict(original, len(vae.config.up_block_types))
    for key in (
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.norm_out.weight",
        "decoder.up.3.block.0.conv1.weight",  # diffusers up_blocks.0 is LDM's top block up.3
        "decoder.up.3.upsample.conv.weight",
        "decoder.mid.block_2.conv2.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
    ):
        assert key in ldm, key
    assert torch.equal(
        ldm["decoder.up.3.block.0.conv1.weight"], original["decoder.up_blocks.0.resnets.0.conv1.weight"]
    )
    for name in ("q", "k", "v", "proj_out"):
        assert ldm[f"decoder.mid.attn_1.{name}.weight"].shape == (32, 32, 1, 1)
    assert len(ldm) == len(original) and not any("_blocks" in k or "to_q" in k for k in ldm)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_round_trip_check_catches_a_damaged_file(tmp_path):
    from safetensors.torch import save_file

    from tuner.export.vae import check_round_trip, save_single_file
    from tuner.tiny import tiny_vae

    vae = tiny_vae().eval()
    vae.save_pretrained(tmp_path / "vae")
    single = save_single_file(vae, tmp_path / "x.vae.safetensors", {"note": "test"})
    assert check_round_trip(vae, tmp_path / "vae", single) == 0.0
    tensors = load_file(single)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + 0.01
    save_file(tensors, single)
    with pytest.raises(TunerError, match=r"x.vae.safetensors.*max \|difference\| = 0.01"):
        check_round_trip(vae, tmp_path / "vae", single)


# --- end to end through the shared loop ----------------------------------------------------------------------------


def test_loop_raises_heldout_psnr_end_to_end(tiny_models, patterns, tmp_path, capsys):
    from tuner.loop import train
    from tuner.trainer import Artifact

    model = tiny_models["sd1"]
    run = train(make_config(model, patterns, tmp_path / "run"))
    names = {p.name for p in run.iterdir()}
    assert {"vae", "decoder.vae.safetensors", "metrics.json", "artifact.json", "config.json", "grids"} <= names
    assert (run / "grids" / f"step-{STEPS:06d}.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["gain"]["psnr"] >= MIN_PSNR_GAIN, metrics
    assert "decoder evaluation on 4 held-out image(s)" in capsys.readouterr().out
    artifact = Artifact.read(run)
    assert artifact.method == "decoder" and artifact.extra["metrics"]["gain"]["psnr"] == metrics["gain"]["psnr"]
    assert "AutoencoderKL.from_pretrained" in artifact.files[0].load

    base_frozen, base_decoder = split(vae_tensors(model / "vae"))
    tuned_frozen, tuned_decoder = split(vae_tensors(run / "vae"))
    assert all(torch.equal(base_frozen[k], tuned_frozen[k]) for k in base_frozen)
    assert any(not torch.equal(base_decoder[k], tuned_decoder[k]) for k in base_decoder)
    assert sample_with(model, run / "vae").shape == (1, SIZE, SIZE, 3)


def test_loop_sdxl_with_ema_and_no_holdout(tiny_models, patterns, tmp_path, capsys):
    from tuner.loop import train

    model = tiny_models["sdxl"]
    config = make_config(
        model,
        patterns,
        tmp_path / "run",
        data={"holdout_fraction": 0.0},
        train={"max_train_steps": 4, "use_ema": True},
    )
    run = train(config)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["holdout_images"] == 0 and "data.holdout_fraction" in metrics["skipped"]
    assert "decoder evaluation skipped" in capsys.readouterr().out
    assert (run / "grids" / "step-000004.png").is_file()  # text-to-image rows only

    base_frozen, base_decoder = split(vae_tensors(model / "vae"))
    tuned_frozen, tuned_decoder = split(vae_tensors(run / "vae"))
    assert all(torch.equal(base_frozen[k], tuned_frozen[k]) for k in base_frozen)
    assert any(not torch.equal(base_decoder[k], tuned_decoder[k]) for k in base_decoder)
    assert sample_with(model, run / "vae").shape == (1, SIZE, SIZE, 3)
