"""A quantized frozen base (`model.quantize`): refusals before any weight loads, fp8 storage on the CPU with fp32
adapters, a Flux LoRA trained on an fp8 base through the shared loop whose export has the full-precision run's
format and lowers the loss in a fresh full-precision stock pipeline, and merges into a quantized base refused.
bitsandbytes int8/nf4 need CUDA: those runs are marked `cuda`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tuner.cli import main
from tuner.errors import ConfigError, TunerError
from tuner.losses import LossOptions
from tuner.models import check_trainable, load_parts

TRIGGER = "a photo of sks toy"  # the captions of the `subject` photos (tests/conftest.py)
NO_LOSS = LossOptions()


def configs_only(model: Path, dest: Path) -> Path:
    """A copy of a pipeline folder without any weight file: what is read from it can only be JSON."""
    for path in model.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            (dest / path.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / path.relative_to(model))
    return dest


def test_unsupported_combinations_are_refused_before_any_weight_loads(tiny_models, subject, tmp_path, capsys):
    model = str(configs_only(tiny_models["flux"], tmp_path / "no-weights"))
    for capability, reason in [("dreambooth", "full DreamBooth"), ("decoder", "decoder fine-tuning"),
                               ("textual_inversion", "textual inversion")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"model.quantize = 'fp8': {reason}.*works with dreambooth-lora"):
            check_trainable(model, None, capability, NO_LOSS, "fp8")
    for capability in ("lora", "dreambooth-lora", "pivotal"):
        assert check_trainable(model, None, capability, NO_LOSS, "fp8").name == "flux"
    if not torch.cuda.is_available():  # bitsandbytes quantizes through diffusers on CUDA only
        for kind in ("int8", "nf4"):
            with pytest.raises(ConfigError, match=f"'{kind}'.*needs a CUDA GPU.*use model.quantize = 'fp8'"):
                check_trainable(model, None, "lora", NO_LOSS, kind)
        # The CLI: one line naming the field and the fix, no trace.
        capsys.readouterr()
        code = main(["train", "--preset", "style-lora-flux", "--model", model, "--data", str(subject),
                     "--vram", "16", "--set", "train.output_dir=" + str(tmp_path / "run")])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 1 and err.count("\n") == 0 and "Traceback" not in err, err
        assert "model.quantize = 'nf4'" in err and "fp8" in err, err


def weight_of(module: torch.nn.Module, suffix: str) -> torch.Tensor:
    return next(m.weight for name, m in module.named_modules() if name.endswith(suffix))


def test_fp8_base_stores_float8_and_trains_fp32_adapters(tiny_models):
    from trainers.lora import LoraTrainer
    from tuner.config import RunConfig
    from tuner.quantize import quantization_of

    parts = load_parts(str(tiny_models["flux"]), quantize="fp8")
    t5 = parts.text_encoders[1]
    assert quantization_of(parts.denoiser) == "fp8" and quantization_of(t5) == "fp8"
    assert parts.denoiser.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert weight_of(t5, ".q").dtype == torch.float8_e4m3fn
    assert weight_of(t5, ".wo").dtype == torch.float32  # transformers keeps T5's `wo` full (its input is cast to it)
    assert parts.denoiser.norm_out.linear.weight.dtype == torch.float32  # diffusers keeps norms full
    assert weight_of(parts.text_encoders[0], "q_proj").dtype == torch.float32  # CLIP stays: pivotal trains it
    assert all(p.dtype == torch.float32 for p in parts.vae.parameters())

    table = {"method": "lora", "lora": {"rank": 4}, "data": {"token": "sks"}}
    trainer = LoraTrainer(RunConfig.for_method("lora").model_validate(table))
    params = trainer.prepare(parts).parameters()
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    frozen = {n: p.detach().view(torch.uint8).clone() for n, p in parts.denoiser.named_parameters()
              if p.dtype == torch.float8_e4m3fn}  # fmt: skip
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        batch = {"latents": latents, "input_ids": parts.family.tokenize(parts, [TRIGGER] * 2),
                 "generator": torch.Generator().manual_seed(1)}  # fmt: skip
        loss = trainer.compute_loss(parts, batch)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(parts.denoiser.named_parameters())
    assert all(torch.equal(after[n].detach().view(torch.uint8), w) for n, w in frozen.items())  # bitwise frozen
    assert any(not torch.equal(a, b) for a, b in zip(params, before))


def _run(model: Path, images: Path, out: Path, quantize: str) -> Path:
    from tuner.config import RunConfig
    from tuner.loop import train

    torch.manual_seed(0)  # peft draws the adapters' initial down-projections from the global RNG
    table = {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(model), "quantize": quantize},
        "data": {"path": str(images), "resolution": 64, "enable_bucket": False, "token": "sks"},
        "lora": {"rank": 8, "alpha": 8},
        "optimizer": {"name": "adamw", "learning_rate": 1e-2},
        "train": {
            "output_dir": str(out),
            "max_train_steps": 12,
            "train_batch_size": 2,
            "report_to": "none",
            "checkpointing_steps": 100,
        },  # fmt: skip
        "validation": {"enabled": False},
    }
    return train(RunConfig.for_method("lora").model_validate(table), summary=False)


def _header(path: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _flat(value, prefix=""):
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def same_format(a: Path, b: Path) -> None:
    """Same tensors (names, shapes, dtypes) and metadata; values may differ only in the run's quantize field, and
    in hashes and times of the tensors and the run."""
    (tensors_a, meta_a), (tensors_b, meta_b) = _header(a), _header(b)
    assert tensors_a == tensors_b
    assert set(meta_a) == set(meta_b)
    for key in meta_a:
        if meta_a[key] == meta_b[key] or any(w in key for w in ("hash", "date", "time", "_at")):
            continue
        flat_a, flat_b = _flat(json.loads(meta_a[key])), _flat(json.loads(meta_b[key]))
        assert set(flat_a) == set(flat_b), key
        differing = {k for k in flat_a if flat_a[k] != flat_b[k]}
        assert differing and all("quantize" in k for k in differing), (key, differing)


def test_flux_lora_on_an_fp8_base_trains_and_exports_as_from_full_precision(tiny_models, subject, tmp_path):
    """Acceptance: the LoRA trained on the fp8 base lowers the instance loss of a fresh full-precision stock
    pipeline it is loaded into, and its files have the format of the full-precision run's."""
    from diffusers import FluxPipeline

    from tuner.conditioning import encode_pixels
    from tuner.losses import diffusion_loss
    from tuner.models import Parts

    model = tiny_models["flux"]
    quantized = _run(model, subject, tmp_path / "fp8" / "run", "fp8")
    full = _run(model, subject, tmp_path / "full" / "run", "none")
    for name in ("pytorch_lora_weights.safetensors", "run.safetensors"):
        same_format(quantized / name, full / name)

    pipe = FluxPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(quantized), weight_name="pytorch_lora_weights.safetensors")
    parts = Parts.from_pipeline(pipe)
    assert all(p.dtype == torch.float32 for p in parts.denoiser.parameters())
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in sorted(subject.glob("*.png"))])  # fmt: skip
    with torch.no_grad():
        mean, std = encode_pixels(parts, pixels)
        ids = parts.family.tokenize(parts, [TRIGGER] * 4)

        def instance_loss(adapter: bool) -> float:
            pipe.enable_lora() if adapter else pipe.disable_lora()
            fixed = torch.Generator().manual_seed(123)
            batch = {"latent_mean": mean, "latent_std": std, "input_ids": ids}
            return float(np.mean([diffusion_loss(parts, batch, NO_LOSS, fixed).item() for _ in range(6)]))

        before, after = instance_loss(False), instance_loss(True)
    print(f"fp8-base LoRA in a full-precision pipeline: instance loss {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before, (before, after)


def test_merging_into_a_quantized_base_is_refused(tiny_models, tmp_path, capsys):
    from tuner.export.merge import apply_kohya
    from tuner.export.roundtrip import fresh_pipeline
    from tuner.quantize import store_fp8

    pipe = fresh_pipeline(tiny_models["sd1"])
    store_fp8(pipe.unet, torch.float32)
    with pytest.raises(TunerError, match=r"merging adapter into unet: the base is quantized \(fp8\)"):
        apply_kohya(pipe, {})
    # A checkpoint saved quantized (bitsandbytes writes its quantization_config into the component's config):
    # `tuner export --to fused` refuses it before loading any weight, in one line.
    saved = configs_only(tiny_models["sd1"], tmp_path / "nf4-base")
    config_file = saved / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
    }
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)}, str(lora))  # fmt: skip
    code = main(["export", str(lora), "--to", "fused", "--model", str(saved), "--out", str(tmp_path / "fused")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0, err
    assert "unet is saved quantized (nf4)" in err and "full-precision base" in err, err
    assert not (tmp_path / "fused").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantizes through diffusers on CUDA only")
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_base_trains_a_lora_with_the_full_precision_format(tiny_models, subject, tmp_path, kind):
    import bitsandbytes as bnb

    from trainers.lora import LoraTrainer
    from tuner.config import RunConfig

    parts = load_parts(str(tiny_models["flux"]), device="cuda", weight_dtype=torch.bfloat16, quantize=kind)
    layer = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert isinstance(parts.denoiser.transformer_blocks[0].attn.to_q, layer)
    assert isinstance(next(m for n, m in parts.text_encoders[1].named_modules() if n.endswith(".q")), layer)
    trainer = LoraTrainer(RunConfig.for_method("lora").model_validate({"method": "lora", "data": {"token": "sks"}}))
    assert trainer.prepare(parts).parameters()
    quantized = _run(tiny_models["flux"], subject, tmp_path / kind / "run", kind)
    full = _run(tiny_models["flux"], subject, tmp_path / "full" / "run", "none")
    for name in ("pytorch_lora_weights.safetensors", "run.safetensors"):
        same_format(quantized / name, full / name)
