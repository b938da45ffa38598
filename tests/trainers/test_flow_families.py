"""The flow-matching transformer families (tiny SD3.5-, FLUX.1-dev- and Z-Image-shaped pipelines): family detection
and refusals, the rectified-flow loss against its definition, LoRA and DreamBooth-LoRA through the shared loop with
every export round-tripped and loaded into fresh stock pipelines, subject learning on Flux, exact resume and DDP.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from tuner.config import RunConfig
from tuner.errors import TunerError
from tuner.export.roundtrip import Probe, fresh_pipeline, outputs
from tuner.families import call_kwargs
from tuner.losses import LossOptions, diffusion_loss
from tuner.models import detect_family, load_parts
from tuner.trainer import Artifact

TRIGGER = "a photo of sks toy"  # the captions of the `subject` photos (tests/conftest.py)
FLOW = ["sd3", "flux"]
ADAPTER_FAMILIES = [*FLOW, "zimage"]  # Z-Image: LoRA and DreamBooth-LoRA of the transformer (no text-encoder LoRA)


def run_table(model: Path, images: Path, out: Path, method: str = "lora", steps: int = 10, **tables) -> dict:
    table = {
        "method": method,
        "model": {"pretrained_model_name_or_path": str(model)},
        "data": {"path": str(images), "resolution": 64, "enable_bucket": False, "token": "sks"},
        "optimizer": {"name": "adamw", "learning_rate": 5e-3},
        "train": {
            "output_dir": str(out),
            "max_train_steps": steps,
            "train_batch_size": 2,
            "report_to": "none",
            "logging_steps": 1,
            "timestep_sampling": "logit_normal",
        },  # fmt: skip
        "validation": {"enabled": False},
    }
    for name, values in tables.items():
        table.setdefault(name, {}).update(values)
    return table


def train_here(table: dict, resume: str | None = None) -> Path:
    from tuner.loop import train

    return train(RunConfig.for_method(table["method"]).model_validate(table), resume=resume)


def sample(pipe, prompt: str = TRIGGER, seed: int = 0) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(seed), **call_kwargs(pipe)).images[0]  # fmt: skip
    assert np.isfinite(image).all()
    return image


# --- the model layer ------------------------------------------------------------------------------------------
def test_families_are_detected_with_their_variant(tiny_models, tmp_path):
    sd3, prediction = detect_family(str(tiny_models["sd3"]))
    assert (sd3.name, prediction, sd3.modelspec_architecture) == ("sd3", "flow_matching", "stable-diffusion-3-5-large")
    flux, _ = detect_family(str(tiny_models["flux"]))
    assert (flux.name, flux.modelspec_architecture, flux.t5_length) == ("flux", "flux-1-dev", 512)
    schnell = tmp_path / "schnell"
    shutil.copytree(tiny_models["flux"], schnell)
    config = json.loads((schnell / "transformer" / "config.json").read_text())
    (schnell / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    assert detect_family(str(schnell))[0].modelspec_architecture == "flux-1-schnell"
    parts = load_parts(str(tiny_models["flux"]))
    assert type(parts.denoiser).__name__ == "FluxTransformer2DModel" and parts.vae.config.latent_channels == 16
    assert [type(e).__name__ for e in parts.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert list(parts.text_encoder_modules(adaptable_only=True)) == ["text_encoder"]  # T5 stays frozen


@pytest.mark.parametrize("family", FLOW)
def test_an_unsupported_loss_option_is_refused_before_any_weight_loads(tiny_models, subject, tmp_path, family):
    configs_only = tmp_path / "configs-only"  # no weights at all: a refusal must come before loading
    shutil.copytree(tiny_models[family], configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(TunerError, match=r"train.snr_gamma.*weighting_scheme"):
        train_here(run_table(configs_only, subject, tmp_path / "run", train={"snr_gamma": 5.0}))


def test_the_flow_loss_is_its_definition(tiny_models):
    """Target ε - x, input (1 - σ)x + σε with σ shifted by Flux's image-size rule, cosmap weights: by hand."""
    parts = load_parts(str(tiny_models["flux"]))
    options = LossOptions(timestep_sampling="logit_normal", weighting_scheme="cosmap", sample_latents=False)
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = parts.family.tokenize(parts, [TRIGGER, "a blue circle"])
    with torch.no_grad():
        embeds, pooled = parts.family.encode(parts, ids)
        batch = {"latents": latent, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        loss = diffusion_loss(parts, batch, options, torch.Generator().manual_seed(7))

        gen = torch.Generator().manual_seed(7)
        x = (latent - 0.1159) * 0.3611  # the VAE's shift and scale
        noise = torch.randn(x.shape, generator=gen)
        u = torch.sigmoid(torch.randn((2,), generator=gen))
        mu = 0.5 + (16 - 256) * (1.15 - 0.5) / (4096 - 256)  # 16 packed tokens of an 8x8 latent
        sigma = np.exp(mu) / (np.exp(mu) + (1 / u - 1))
        s = sigma.view(-1, 1, 1, 1)
        packed = ((1 - s) * x + s * noise).view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)
        img_ids = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
        img_ids = torch.cat([torch.zeros(16, 1), img_ids], 1)
        out = parts.denoiser(hidden_states=packed, timestep=sigma, guidance=torch.ones(2), pooled_projections=pooled,
                             encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=img_ids,
                             return_dict=False)[0]  # fmt: skip
        pred = out.view(2, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 8, 8)
        weights = 2 / (np.pi * (1 - 2 * sigma + 2 * sigma**2))
        expected = (weights * F.mse_loss(pred, noise - x, reduction="none").mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


# --- LoRA and DreamBooth-LoRA end to end ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ADAPTER_FAMILIES)
def test_lora_trains_only_the_adapter_and_scale_zero_is_the_base(tiny_models, family):
    from trainers.lora import LoraTrainer

    parts = load_parts(str(tiny_models[family]))
    probe = Probe.for_pipeline(parts.pipeline())
    base_out = outputs(parts, probe)
    models = (parts.denoiser, *parts.text_encoders)
    frozen = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    lora = {"rank": 4, "alpha": 8, "train_text_encoder": family != "zimage", "unet_target_modules": "attn+ff"}
    table = run_table(tiny_models[family], Path("."), Path("."), lora=lora)
    trainer = LoraTrainer(RunConfig.for_method("lora").model_validate(table))
    trainables = trainer.prepare(parts)
    optimizer = torch.optim.AdamW(trainables.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = parts.family.tokenize(parts, [TRIGGER] * 2)
    for _ in range(3):
        latents = torch.randn(2, 16, 8, 8, generator=gen)
        loss = trainer.compute_loss(parts, {"latents": latents, "input_ids": ids, "generator": gen})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for model, before in zip(models, frozen):  # frozen base weights: bitwise unchanged
        for key, value in model.state_dict().items():
            if ".tuner" not in key:
                assert torch.equal(value, before[key.replace(".base_layer", "")]), key
    assert not any("tuner" in k for k in parts.text_encoders[-1].state_dict())  # no adapter in T5
    trainer.set_adapter_scale(parts, 0.0)
    assert all(torch.equal(outputs(parts, probe)[k], base_out[k]) for k in base_out)
    trainer.set_adapter_scale(parts, 1.0)
    tuned = outputs(parts, probe)
    assert (tuned[parts.family.denoiser_component] - base_out[parts.family.denoiser_component]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("family", "method", "data"),
    [
        ("sd3", "lora", {}),
        ("flux", "lora", {}),
        ("zimage", "lora", {}),
        ("sd3", "dreambooth", {"with_prior_preservation": True, "prior_mode": "model"}),
        ("zimage", "dreambooth", {"with_prior_preservation": True, "prior_mode": "model"}),
        (
            "flux",
            "dreambooth",
            {
                "with_prior_preservation": True,
                "prior_mode": "images",
                "num_class_images": 2,
                "class_inference_steps": 2,
            },
        ),  # fmt: skip
    ],
    ids=[
        "sd3-lora",
        "flux-lora",
        "zimage-lora",
        "sd3-dreambooth-lora-model-prior",
        "zimage-dreambooth-lora-model-prior",
        "flux-dreambooth-lora-image-prior",
    ],
)
def test_trains_ten_steps_and_every_export_loads_in_a_fresh_pipeline(tiny_models, subject, tmp_path, family,
                                                                      method, data):  # fmt: skip
    run = tmp_path / "run"
    te = family != "zimage"  # Z-Image's Qwen3 encoder takes no LoRA (diffusers' loader reads the transformer only)
    tables = {"lora": {"rank": 4, "alpha": 8, "train_text_encoder": te}}
    if method == "dreambooth":
        tables = {"dreambooth": {"lora": True, "rank": 4, "alpha": 8, "train_text_encoder": te},
                  "data": {"instance_prompt": TRIGGER, "class_prompt": "a photo of toy",
                           "class_data_dir": str(tmp_path / "class"), **data}}  # fmt: skip
    tables["validation"] = {"enabled": family in ("flux", "zimage") and method == "lora", "num_inference_steps": 2,
                            "seeds": [0],
                            "scales": [0.0, 1.0]}  # fmt: skip
    train_here(run_table(tiny_models[family], subject, run, method=method, **tables))
    artifact = Artifact.read(run)
    assert artifact.method == method and artifact.family == family and artifact.trigger == "sks"
    report = artifact.extra["roundtrip"]
    assert report and all(max(d.values()) < 1e-4 for d in report.values()), report
    paths = [f.path for f in artifact.files]
    assert paths[0] == "pytorch_lora_weights.safetensors"
    if family == "flux":  # the kohya/BFL file ComfyUI, Forge and kohya load, checked by splitting it back
        assert paths[1] == "run.safetensors" and artifact.files[1].format == "kohya-flux-lora"
        assert "run.safetensors via kohya-flux" in report
        keys = load_file(str(run / "run.safetensors")).keys()
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in keys)
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0") for k in keys)
        assert (run / "grids" / "final.png").is_file() == tables["validation"]["enabled"]
        if method == "lora":  # `tuner export` between the two forms, each checked in the base model
            from tuner.export.convert import export, file_format

            back = export(run / "run.safetensors", "diffusers", tmp_path / "conv", model=str(tiny_models[family]))
            assert file_format(back) == "peft"
            again = export(back, "kohya", tmp_path / "conv" / "again.safetensors", model=str(tiny_models[family]))
            assert file_format(again) == "kohya-flux"
            from tuner.sampling import sample as tuner_sample  # `tuner sample` renders both forms alike

            renders = [
                tuner_sample(str(tiny_models[family]), [TRIGGER], [0], tmp_path / f"sample{i}", lora=[run / p],
                             steps=2, width=64, height=64, grid=False).images[0]
                for i, p in enumerate(paths)
            ]  # fmt: skip
            a, b = (np.asarray(Image.open(r), dtype=np.int16) for r in renders)
            assert np.abs(a - b).max() <= 1
    elif family == "zimage":  # the `diffusion_model.` file ComfyUI maps onto its fused qkv, checked as it merges
        assert paths[1] == "run.safetensors" and artifact.files[1].format == "comfyui-lora"
        assert {"run.safetensors via comfyui", "run.safetensors via diffusers"} <= set(report)
        keys = load_file(str(run / "run.safetensors")).keys()
        assert all(k.startswith("diffusion_model.") for k in keys)
        assert {
            "diffusion_model.layers.0.attention.to_q.alpha",
            "diffusion_model.noise_refiner.0.attention.to_out.0.lora_up.weight",
            "diffusion_model.context_refiner.0.attention.to_k.lora_down.weight",
        } <= set(keys)
        assert method == "dreambooth" or (run / "grids" / "final.png").is_file()
    else:
        assert paths == ["pytorch_lora_weights.safetensors"] and "ComfyUI" in artifact.files[0].tools
    from safetensors import safe_open

    with safe_open(str(run / paths[-1]), "pt") as f:
        header = f.metadata()
    arch = {"sd3": "stable-diffusion-3-5-large/lora", "flux": "flux-1-dev/lora", "zimage": "Z-Image/lora"}[family]
    assert header["modelspec.architecture"] == arch and header["modelspec.trigger_phrase"] == "sks"

    pipe = fresh_pipeline(tiny_models[family])
    base = sample(pipe)
    pipe.load_lora_weights(str(run), weight_name=paths[0], adapter_name="run")
    tuned = sample(pipe)
    pipe.set_adapters(["run"], [0.0])
    off = sample(pipe)
    assert np.abs(tuned - base).max() > 1e-3
    assert np.array_equal(off, base)  # scale 0 is the base model, exactly


@pytest.mark.parametrize(("family", "variant"), [("flux", "dora"), ("flux", "loha"), ("sd3", "lokr")])
def test_peft_variants_train_on_the_transformer_and_round_trip(tiny_models, subject, tmp_path, family, variant):
    run = train_here(run_table(tiny_models[family], subject, tmp_path / "run", steps=2,
                               lora={"rank": 4, "variant": variant, "unet_target_modules": "all-linear"}))  # fmt: skip
    artifact = Artifact.read(run)
    assert artifact.extra["variant"] == variant and [f.path for f in artifact.files][:1] != []
    report = artifact.extra["roundtrip"]
    assert len(report) == 1 and all(max(d.values()) < 1e-4 for d in report.values()), report
    with_adapter = load_file(str(run / artifact.files[0].path))
    assert not any("norm" in k or "embedder" in k for k in with_adapter)  # all-linear leaves norms and embedders


def test_flux_subject_lora_lowers_its_loss_and_changes_its_trigger_most(tiny_models, subject):
    """As for SD1: with image-free prior preservation on other prompts (the transformer with its adapters off),
    the subject's LoRA lowers the instance loss and changes the trigger prompt's samples more than unrelated
    prompts' (thresholds, not snapshots)."""
    from trainers.lora import LoraTrainer

    torch.manual_seed(0)  # peft draws the adapters' initial down-projections from the global RNG
    table = run_table(tiny_models["flux"], subject, Path("."), optimizer={"learning_rate": 1e-2},
                      lora={"rank": 8, "alpha": 8, "train_text_encoder": True},
                      data={"instance_prompt": TRIGGER, "class_prompt": "a photo of toy",
                            "with_prior_preservation": True, "prior_mode": "model"})  # fmt: skip
    parts = load_parts(str(tiny_models["flux"]))
    trainer = LoraTrainer(RunConfig.for_method("lora").model_validate(table))
    trainables = trainer.prepare(parts)
    optimizer = torch.optim.AdamW(trainables.parameters(), lr=1e-2)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in sorted(subject.glob("*.png"))])  # fmt: skip
    with torch.no_grad():
        dist = parts.vae.encode(pixels).latent_dist
    others = ["a photo of toy", "a blue circle", "a dog in the park", "a yellow star on a black background",
              "a man wearing a hat", "a photo of a red square"]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        captions = [TRIGGER] * 4 + [others[(step * 4 + j) % len(others)] for j in range(4)]
        batch = {"latent_mean": torch.cat([dist.mean] * 2), "latent_std": torch.cat([dist.std] * 2),
                 "input_ids": parts.family.tokenize(parts, captions), "generator": gen,
                 "is_prior": torch.tensor([False] * 4 + [True] * 4)}  # fmt: skip
        trainer.compute_loss(parts, batch).backward()
        optimizer.step()
        optimizer.zero_grad()

    def instance_loss(scale: float) -> float:
        trainer.set_adapter_scale(parts, scale)
        fixed = torch.Generator().manual_seed(123)
        ids = parts.family.tokenize(parts, [TRIGGER] * 4)
        with torch.no_grad():
            batches = [{"latent_mean": dist.mean, "latent_std": dist.std, "input_ids": ids, "generator": fixed}
                       for _ in range(8)]  # fmt: skip
            return float(np.mean([trainer.compute_loss(parts, b).item() for b in batches]))

    before, after = instance_loss(0.0), instance_loss(1.0)
    assert after < 0.9 * before, (before, after)

    pipe = parts.pipeline()

    def change(prompt: str) -> float:
        diffs = []
        for seed in range(3):
            images = []
            for scale in (0.0, 1.0):
                trainer.set_adapter_scale(parts, scale)
                with torch.no_grad():
                    images.append(sample(pipe, prompt, seed))
            diffs.append(np.abs(images[1] - images[0]).mean())
        return float(np.mean(diffs))

    trigger = change(TRIGGER)
    unrelated = max(change("a green house"), change("a painting of a cat in the snow"))
    trainer.set_adapter_scale(parts, 1.0)
    print(f"flux subject: instance loss {before:.4f} -> {after:.4f}, change {trigger:.4f} vs {unrelated:.4f}")
    assert trigger > 1.2 * unrelated, (trigger, unrelated)


# --- exact resume and two processes ---------------------------------------------------------------------------
def run_cli(table: dict, tmp: Path, *args: str, env: dict | None = None, launcher: list[str] | None = None):
    """The real CLI in its own process, with the tests' hooked LoRA trainer (`tests/tuner/run_loop.py`)."""
    import os
    import subprocess

    import tomli_w

    root = Path(__file__).resolve().parents[2]
    path = tmp / f"run-{len(list(tmp.glob('run-*.toml')))}.toml"
    path.write_bytes(tomli_w.dumps(table).encode())
    full_env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*(launcher or [sys.executable]), str(root / "tests" / "tuner" / "run_loop.py"), "train", "--config",
               str(path), *args]  # fmt: skip
    return subprocess.run(command, cwd=root, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # about 70 s: killed, resumed and DDP runs
def test_flux_lora_sigkill_then_resume_is_bitwise_identical_and_ddp_matches(tiny_models, subject, tmp_path):
    def table(out: Path, batch: int = 2) -> dict:
        lora = {"rank": 4, "alpha": 8, "train_text_encoder": True, "verify_export": False}
        t = run_table(tiny_models["flux"], subject, out, method="lora_hooked", steps=4, lora_hooked=lora)
        t["train"].update(checkpointing_steps=2, checkpoints_total_limit=5, train_batch_size=batch)
        return t

    def lora(run: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run / "pytorch_lora_weights.safetensors"))

    straight = run_cli(table(tmp_path / "straight"), tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    result = run_cli(table(killed), tmp_path, env={"TUNER_TEST_KILL_AT_STEP": "2"})
    assert result.returncode == -9, result.stderr[-3000:]
    assert not (killed / "pytorch_lora_weights.safetensors").exists()
    done = run_cli(table(killed), tmp_path, "--resume", "latest")  # same config, no kill hook
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = lora(tmp_path / "straight"), lora(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed next to this python")
    one = run_cli(table(tmp_path / "one", batch=4), tmp_path, env={"TUNER_TEST_PER_EXAMPLE_NOISE": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as sock:  # a port of its own: test workers run side by side
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    launcher = [str(accelerate), "launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]  # fmt: skip
    two = run_cli(table(tmp_path / "two"), tmp_path, env={"TUNER_TEST_PER_EXAMPLE_NOISE": "1"}, launcher=launcher)
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = lora(tmp_path / "one"), lora(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)
