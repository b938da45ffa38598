"""Every method on the flow-matching transformer families (tiny SD3.5- and FLUX.1-shaped pipelines): full
fine-tuning of the transformer (selected blocks, both kinds of prior preservation, EMA), textual inversion and
pivotal tuning (CLIP-L / CLIP-G, T5 on request) and decoder fine-tuning of the 16-channel VAE, each through the
shared loop, exported, round-tripped and loaded into fresh stock pipelines; frozen parts bitwise the base, and a
run SIGKILLed after a checkpoint resumes to the same bits as one that never stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import load_file

from tuner.config import RunConfig
from tuner.errors import ConfigError, TunerError
from tuner.export.roundtrip import fresh_pipeline
from tuner.families import FAMILIES, call_kwargs
from tuner.trainer import Artifact

PROMPT = "a photo of sks toy"
TOKEN = "<sks-toy>"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four 32 px photos of a red square on white (shifted a little), captioned."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(4):
        img = np.full((32, 32, 3), 255, np.uint8)
        img[4 + 2 * i : 18 + 2 * i, 4 + 2 * i : 18 + 2 * i] = [220, 20, 20]
        Image.fromarray(img).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(PROMPT, encoding="utf-8")
    return folder


def table(base: Path, photos: Path, out: Path, method: str, **tables) -> dict:
    """4 steps of batch 2 at 32 px, a checkpoint at step 2 (what the kill-and-resume runs continue from)."""
    run = {
        "method": method,
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"path": str(photos), "resolution": 32, "enable_bucket": False},
        "optimizer": {"name": "adamw", "learning_rate": 1e-2},
        "train": {
            "output_dir": str(out),
            "max_train_steps": 4,
            "train_batch_size": 2,
            "report_to": "none",
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 5,
        },  # fmt: skip
        "validation": {"enabled": False},
    }
    for name, values in tables.items():
        run.setdefault(name, {}).update(values)
    return run


def train(run: dict, resume: str | None = None) -> Path:
    from accelerate.state import AcceleratorState, GradientState

    from tuner.loop import train as loop_train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return loop_train(RunConfig.for_method(run["method"]).model_validate(run), resume=resume, summary=False)


def _train_then_die(run: dict, step: int) -> None:
    """In the forked child: the method's own trainer, SIGKILLed as optimizer step `step + 1` starts."""
    from tuner import registry

    base = registry.get_trainer(run["method"])

    class Killed(base):
        def compute_loss(self, parts, batch):
            if self.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().compute_loss(parts, batch)

    registry.register(run["method"], Killed)
    train(run)
    os._exit(0)  # not reached when the kill fires


def killed_and_resumed(run: dict, step: int = 3) -> Path:
    """Train in a forked process (a real process, killed by a real SIGKILL after checkpoint 2), then resume the
    same config from its latest checkpoint here."""
    child = multiprocessing.get_context("fork").Process(target=_train_then_die, args=(run, step))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    out = Path(run["train"]["output_dir"])
    assert (out / "checkpoint-2").is_dir() and not (out / "artifact.json").exists()
    return train(run, resume="latest")


def same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), a.name


def sample(pipe, prompt: str = PROMPT) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0), **call_kwargs(pipe)).images[0]  # fmt: skip
    assert np.isfinite(image).all()
    return image


def states(model: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(str(next((model / component).glob("*.safetensors"))))


# --- full fine-tuning ----------------------------------------------------------------------------------------------
def test_flux_selected_blocks_with_ema_and_model_prior_train_export_and_resume_bitwise(tiny_models, photos, tmp_path):
    model = tiny_models["flux"]
    dreambooth = {"train_blocks": [1, "transformer_blocks.0.attn.to_q.*"], "save_format": "transformer"}
    data = {"instance_prompt": PROMPT, "class_prompt": "a photo of toy", "with_prior_preservation": True,
            "prior_mode": "model"}  # fmt: skip
    run = table(model, photos, tmp_path / "run", "dreambooth", dreambooth=dreambooth, data=data,
                train={"use_ema": True, "ema_decay": 0.5})  # fmt: skip
    out = train(run)
    artifact = Artifact.read(out)
    assert [(f.path, f.format) for f in artifact.files] == [("transformer", "diffusers-transformer")]
    assert artifact.files[0].load.startswith('transformer = FluxTransformer2DModel.from_pretrained("')

    base, tuned = states(model, "transformer"), states(out, "transformer")
    chosen = [k for k in base if k.startswith(("single_transformer_blocks.0.", "transformer_blocks.0.attn.to_q."))]
    assert chosen and all(not torch.equal(base[k], tuned[k]) for k in chosen if k.endswith("weight"))
    assert all(torch.equal(base[k], tuned[k]) for k in base if k not in chosen)  # the rest: bitwise the base

    from diffusers import FluxTransformer2DModel

    pipe = fresh_pipeline(model)
    before = sample(pipe)
    pipe.transformer = FluxTransformer2DModel.from_pretrained(out / "transformer")
    assert np.abs(sample(pipe) - before).max() > 1e-4

    resumed = killed_and_resumed({**run, "train": {**run["train"], "output_dir": str(tmp_path / "killed")}})
    same_tensors(
        next((out / "transformer").glob("*.safetensors")), next((resumed / "transformer").glob("*.safetensors"))
    )


def test_sd3_whole_transformer_and_clip_encoders_with_class_images_save_a_pipeline(tiny_models, photos, tmp_path):
    model = tiny_models["sd3"]
    data = {"instance_prompt": PROMPT, "class_prompt": "a photo of toy", "with_prior_preservation": True,
            "prior_mode": "images", "num_class_images": 2, "class_inference_steps": 2,
            "class_data_dir": str(tmp_path / "class")}  # fmt: skip
    out = train(table(model, photos, tmp_path / "run", "dreambooth", data=data,
                      dreambooth={"train_text_encoder": True, "text_encoder_steps": 2}))  # fmt: skip
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # drawn by the stock SD3 pipeline
    artifact = Artifact.read(out)
    assert artifact.files[0].load == f'pipe = DiffusionPipeline.from_pretrained("{out / "pipeline"}")'
    saved = out / "pipeline"
    for component in ("vae", "text_encoder_3"):  # never trained: bitwise the base
        assert all(torch.equal(v, states(model, component)[k]) for k, v in states(saved, component).items())
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        base = states(model, component)
        assert any(not torch.equal(v, base[k]) for k, v in states(saved, component).items()), component
    pipe = fresh_pipeline(saved)
    assert np.abs(sample(pipe) - sample(fresh_pipeline(model))).max() > 1e-4


# --- textual inversion and pivotal tuning --------------------------------------------------------------------------
def embedding_rows(checkpoint: Path, component: str) -> torch.Tensor:
    """A text encoder's whole token-embedding matrix as the checkpoint holds it (CLIP: token_embedding, T5: shared)."""
    trained = load_file(str(checkpoint / "trainable.safetensors"))
    return next(v for k, v in trained.items() if k.startswith(f"/{component}.") and k.endswith(
        ("token_embedding.weight", "shared.weight")))  # fmt: skip


def test_sd3_textual_inversion_in_both_clip_encoders_loads_by_its_load_lines(tiny_models, photos, tmp_path):
    model = tiny_models["sd3"]
    ti = {"placeholder_token": TOKEN, "initializer_token": "toy"}
    out = train(table(model, photos, tmp_path / "run", "textual_inversion", textual_inversion=ti))
    artifact = Artifact.read(out)
    assert [f.path for f in artifact.files] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors",
                                                 "sks-toy.safetensors"]  # fmt: skip
    portable = load_file(str(out / "sks-toy.safetensors"))
    assert set(portable) == {"clip_l", "clip_g"} and artifact.files[2].tools == ["ComfyUI", "diffusers"]
    assert torch.equal(portable["clip_g"], load_file(str(out / "learned_embeds_2.safetensors"))[TOKEN])

    for component in ("text_encoder", "text_encoder_2"):  # every old row bitwise the base, the new one moved
        rows, base = embedding_rows(out / "checkpoint-4", component), states(model, component)
        base_rows = next(v for k, v in base.items() if "token_embedding" in k)
        assert torch.equal(rows[: len(base_rows)], base_rows) and rows.shape[0] == len(base_rows) + 1
        assert not (base_rows == rows[-1]).all(dim=1).any()  # started from "toy"'s row, moved off every old one

    pipe = fresh_pipeline(model)
    before = sample(pipe, f"a photo of {TOKEN}")
    exec(artifact.files[2].load, {"pipe": pipe, "safetensors": safetensors})  # the user's own line
    assert np.abs(sample(pipe, f"a photo of {TOKEN}") - before).max() > 1e-4
    assert_sample_loads(model, out / "sks-toy.safetensors", portable, {"clip_l": 0, "clip_g": 1})


def assert_sample_loads(model: Path, path: Path, portable: dict, encoders: dict[str, int]) -> None:
    """`tuner sample --embedding FILE` puts each key's vectors into its encoder, under the file's stem."""
    from tuner.sampling import Embedding, load_embedding

    pipe = fresh_pipeline(model)
    assert load_embedding(pipe, Embedding(path)) == path.stem
    components = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
    for key, index in encoders.items():
        encoder, tokenizer = components[index]
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(path.stem)]
        assert torch.equal(row, portable[key][0]), key


def test_flux_pivotal_with_t5_resumes_bitwise_in_phase_two(tiny_models, photos, tmp_path):
    model = tiny_models["flux"]
    ti = {"placeholder_token": TOKEN, "initializer_token": "toy", "train_t5": True, "pivotal": True,
          "pivotal_ti_steps": 2, "lora": {"rank": 4}}  # fmt: skip
    run = table(model, photos, tmp_path / "run", "textual_inversion", textual_inversion=ti)
    out = train(run)
    artifact = Artifact.read(out)
    paths = [f.path for f in artifact.files]
    assert paths[:3] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors", "sks-toy.safetensors"]
    assert "pytorch_lora_weights.safetensors" in paths
    portable = load_file(str(out / "sks-toy.safetensors"))
    assert set(portable) == {"clip_l", "t5xxl", "t5"} and torch.equal(portable["t5"], portable["t5xxl"])
    assert portable["t5xxl"].shape[-1] == 32 and portable["clip_l"].shape[-1] == 32

    t5_rows = embedding_rows(out / "checkpoint-4", "text_encoder_2")
    base_t5 = states(model, "text_encoder_2")["shared.weight"]
    assert torch.equal(t5_rows[: len(base_t5)], base_t5)
    # phase 2 froze the embeddings: step 4's rows are step 2's
    assert torch.equal(t5_rows, embedding_rows(out / "checkpoint-2", "text_encoder_2"))

    pipe = fresh_pipeline(model)
    before = sample(pipe, f"a photo of {TOKEN}")
    exec(artifact.files[2].load, {"pipe": pipe, "safetensors": safetensors})
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert np.abs(sample(pipe, f"a photo of {TOKEN}") - before).max() > 1e-4
    assert_sample_loads(model, out / "sks-toy.safetensors", portable, {"clip_l": 0, "t5xxl": 1})

    resumed = killed_and_resumed({**run, "train": {**run["train"], "output_dir": str(tmp_path / "killed")}})
    for name in ("sks-toy.safetensors", "pytorch_lora_weights.safetensors"):
        same_tensors(out / name, resumed / name)


def test_refusals_name_the_field(tiny_models, photos, tmp_path):
    from trainers.dreambooth import selected_parameters
    from trainers.textual_inversion import TextualInversionTrainer
    from tuner.models import load_parts

    no_clip = replace(FAMILIES["flux"], name="t5-only", encoders=FAMILIES["flux"].encoders[1:])
    with pytest.raises(TunerError, match=r"t5-only.*\(T5\) have no CLIP token embedding.*'pivotal'"):
        no_clip.check_method("pivotal", "some/model")
    configs_only = tmp_path / "configs-only"  # a family without CLIP (Z-Image: Qwen3), no weights at all
    shutil.copytree(tiny_models["zimage"], configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    ti = {"placeholder_token": TOKEN, "initializer_token": "toy"}
    with pytest.raises(TunerError, match=r"zimage.*\(Qwen3\) have no CLIP token embedding"):
        train(table(configs_only, photos, tmp_path / "ti", "textual_inversion", textual_inversion=ti))
    parts = load_parts(str(tiny_models["sd3"]))
    with pytest.raises(ConfigError, match=r"train_blocks: block index 2 does not exist; indices: 0..1"):
        selected_parameters(parts.denoiser, parts.family.block_lists, [2])
    with pytest.raises(ConfigError, match=r"train_blocks: 'single_transformer_blocks.\*' matches no parameter"):
        selected_parameters(parts.denoiser, parts.family.block_lists, ["single_transformer_blocks.*"])
    ti = {**ti, "num_vectors": 2}
    trainer = TextualInversionTrainer(RunConfig.for_method("textual_inversion").model_validate(
        table(tiny_models["sd3"], photos, tmp_path, "textual_inversion", textual_inversion=ti)))  # fmt: skip
    with pytest.raises(ConfigError, match=r"num_vectors = 2: StableDiffusion3Pipeline has no load_textual_inversion"):
        trainer.prepare(parts)
    quantized = table(tiny_models["sd3"], photos, tmp_path, "textual_inversion", model={"quantize": "fp8"},
                      textual_inversion={**ti, "num_vectors": 1, "train_t5": True})  # fmt: skip
    trainer = TextualInversionTrainer(RunConfig.for_method("textual_inversion").model_validate(quantized))
    with pytest.raises(ConfigError, match=r"train_t5 = true with model.quantize = 'fp8': T5 is stored quantized"):
        trainer.prepare(parts)
    lora_blocks = table(
        tiny_models["sd3"], photos, tmp_path, "dreambooth", dreambooth={"lora": True, "train_blocks": [0]}
    )
    with pytest.raises(ConfigError, match=r"train_blocks = \[0\] picks full-weight blocks; with lora = true"):
        train(lora_blocks)
    run = table(tiny_models["sd3"], photos, tmp_path / "single", "dreambooth",
                dreambooth={"save_format": "single_file"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"save_format = 'single_file': no single-file checkpoint writer for sd3"):
        train(run)


# --- decoder fine-tuning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_decoder_of_the_16_channel_vae_trains_exports_and_resumes_bitwise(tiny_models, photos, tmp_path, family):
    from diffusers import AutoencoderKL

    model = tiny_models[family]
    run = table(model, photos, tmp_path / "run", "decoder", data={"holdout_fraction": 0.25},
                decoder={"mse_weight": 1.0})  # fmt: skip
    out = train(run)
    artifact = Artifact.read(out)
    assert artifact.extra["trained"] == ["decoder"] and artifact.extra["round_trip_max_difference"] == 0
    metrics = json.loads((out / "metrics.json").read_text())  # held-out PSNR / SSIM, base vs tuned
    assert metrics["evaluated"] == 1 and {"psnr", "ssim"} <= set(metrics["base"]) == set(metrics["tuned"])
    assert all(np.isfinite(metrics[side][k]) for side in ("base", "tuned") for k in ("psnr", "ssim"))

    base, tuned = states(model, "vae"), load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in tuned)  # SD3 / FLUX.1 VAEs have none
    assert all(torch.equal(v, base[k]) for k, v in tuned.items() if not k.startswith("decoder."))
    assert any(not torch.equal(v, base[k]) for k, v in tuned.items() if k.startswith("decoder."))

    pipe = fresh_pipeline(model)
    before = sample(pipe)
    pipe.vae = AutoencoderKL.from_single_file(str(out / "decoder.vae.safetensors"), config=str(out / "vae"))
    assert pipe.vae.config.shift_factor == base_shift(model) and np.abs(sample(pipe) - before).max() > 1e-4

    if family == "sd3":
        resumed = killed_and_resumed({**run, "train": {**run["train"], "output_dir": str(tmp_path / "killed")}})
        same_tensors(out / "decoder.vae.safetensors", resumed / "decoder.vae.safetensors")


def base_shift(model: Path) -> float:
    return json.loads((model / "vae" / "config.json").read_text())["shift_factor"]


if sys.platform != "linux":  # the kill-and-resume runs fork
    pytestmark = pytest.mark.skip("fork-based SIGKILL runs need Linux")
