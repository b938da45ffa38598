"""Z-Image (tiny, Z-Image-shaped pipeline) beyond the flow families' shared LoRA / DreamBooth-LoRA acceptance in
test_flow_families.py: prompts encoded as its pipeline encodes them, the loss by its definition (static shift,
t = 1 - sigma, negated prediction), refusals, the ComfyUI file checked and converted both ways, and a resume after
a crash that ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from trainers.lora import LoraTrainer
from tuner.config import RunConfig
from tuner.errors import ConfigError, TunerError
from tuner.families import call_kwargs
from tuner.losses import LossOptions, diffusion_loss
from tuner.models import detect_family, load_parts

sys.path.insert(0, str(Path(__file__).parent))
from test_flow_families import TRIGGER, run_table, train_here  # noqa: E402


def test_zimage_is_detected_and_encodes_prompts_exactly_as_its_pipeline(tiny_models):
    family, prediction = detect_family(str(tiny_models["zimage"]))
    assert (family.name, prediction, family.modelspec_architecture) == ("zimage", "flow_matching", "Z-Image")
    parts = load_parts(str(tiny_models["zimage"]))
    assert [type(m).__name__ for m in (parts.denoiser, *parts.text_encoders, *parts.tokenizers)] == [
        "ZImageTransformer2DModel", "Qwen3Model", "Qwen2Tokenizer"]  # fmt: skip
    assert parts.text_encoder_modules(adaptable_only=True) == {}  # no LoRA loader reads a Qwen3 adapter
    pipe = parts.pipeline()
    assert call_kwargs(pipe) == {"max_sequence_length": 32}  # the tiny tokenizer's window (Z-Image: 512)
    prompts = [TRIGGER, "a yellow star on a black background, bright"]
    with torch.no_grad():
        want = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=32)[0]
        embeds, mask = family.encode(parts, family.tokenize(parts, prompts))
    got = family.conditioning(parts, embeds, mask, {})["cap_feats"]
    assert [g.shape[0] for g in got] == [w.shape[0] for w in want] and got[0].shape[0] < got[1].shape[0]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_zimage_flow_loss_is_its_definition(tiny_models):
    """Target ε - x, input (1 - σ)x + σε with σ shifted statically by 3.0 (the scheduler's), the transformer told
    t = 1 - σ on lists of (C, 1, H, W) latents and caption rows, its output negated: by hand."""
    parts = load_parts(str(tiny_models["zimage"]))
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = parts.family.tokenize(parts, [TRIGGER, "a blue circle"])
    with torch.no_grad():
        embeds, mask = parts.family.encode(parts, ids)
        batch = {"latents": latent, "prompt_embeds": embeds, "pooled_prompt_embeds": mask}
        options = LossOptions(timestep_sampling="logit_normal", sample_latents=False)
        loss = diffusion_loss(parts, batch, options, torch.Generator().manual_seed(7))

        gen = torch.Generator().manual_seed(7)
        x = (latent - 0.1159) * 0.3611  # the VAE's shift and scale
        noise = torch.randn(x.shape, generator=gen)
        u = torch.sigmoid(torch.randn((2,), generator=gen))
        sigma = 3 * u / (1 + 2 * u)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x + s * noise
        captions = [embeds[i][mask[i]] for i in range(2)]
        out = parts.denoiser([n.unsqueeze(1) for n in noisy], 1 - sigma, captions, return_dict=False)[0]
        pred = -torch.stack(out)[:, :, 0]
        expected = F.mse_loss(pred, noise - x)
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


def test_zimage_refuses_text_encoder_lora_and_new_tokens(tiny_models, subject, tmp_path):
    table = run_table(tiny_models["zimage"], subject, tmp_path / "run", lora={"train_text_encoder": True})
    with pytest.raises(ConfigError, match=r"lora.train_text_encoder = true: .*ZImagePipeline \(Qwen3\).*false"):
        train_here(table)
    configs_only = tmp_path / "configs-only"  # no weights: the refusal comes before any load
    shutil.copytree(tiny_models["zimage"], configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    table = run_table(configs_only, subject, tmp_path / "ti", method="textual_inversion")
    table["textual_inversion"] = {"initializer_token": "toy"}
    with pytest.raises(TunerError, match=r"zimage \(ZImagePipeline\).*textual_inversion"):
        train_here(table)


def test_zimage_comfyui_file_means_what_was_trained_and_converts_both_ways(tiny_models, tmp_path):
    from trainers.lora import ADAPTER_NAME, adapted_models
    from tuner.export.convert import export, file_format
    from tuner.export.lora import export_lora
    from tuner.export.roundtrip import Check, verify_files
    from tuner.export.state import collect_state

    model = str(tiny_models["zimage"])
    parts = load_parts(model)
    lora = {"rank": 4, "alpha": 8, "unet_target_modules": "all-linear"}
    table = run_table(tiny_models["zimage"], Path("."), Path("."), lora=lora)
    LoraTrainer(RunConfig.for_method("lora").model_validate(table)).prepare(parts)
    gen = torch.Generator().manual_seed(0)
    for name, param in parts.denoiser.named_parameters():  # an adapter with an effect, without training steps
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05
    out = tmp_path / "out"
    state = collect_state(adapted_models(parts), ADAPTER_NAME)
    files, _ = export_lora(parts, state, out, "zi", 64, verify=False)  # the loop's runs check them (flow tests)
    assert [f.path for f in files] == ["pytorch_lora_weights.safetensors", "zi.safetensors"]
    tensors = load_file(str(out / "zi.safetensors"))
    assert any(k.startswith("diffusion_model.layers.0.feed_forward.w2.") for k in tensors)
    assert not any("embedder" in k or "adaLN" in k or "norm" in k for k in tensors)  # all-linear's exclusions

    dropped = {k: v for k, v in tensors.items() if ".layers.0.feed_forward.w2." not in k}
    save_file(dropped, str(tmp_path / "dropped.safetensors"))
    reference = Check(out / "pytorch_lora_weights.safetensors", "diffusers")
    with pytest.raises(TunerError, match=r"dropped.safetensors via comfyui: transformer"):
        verify_files(model, reference, [Check(tmp_path / "dropped.safetensors", "comfyui")])

    back = export(out / "zi.safetensors", "diffusers", tmp_path / "conv", model=model)  # both loaded and compared
    assert file_format(back) == "peft"
    again = export(back, "kohya", tmp_path / "conv" / "again.safetensors")  # the family from the file's ModelSpec
    assert file_format(again) == "comfyui"
    twice = load_file(str(again))
    assert twice.keys() == tensors.keys() and all(torch.allclose(twice[k], tensors[k], rtol=1e-6) for k in tensors)


class CrashingLora(LoraTrainer):
    """The real LoRA trainer, dying as optimizer step `crash_at` + 1 starts (after checkpoint `crash_at`)."""

    name = "lora_crash"
    crash_at: int | None = None

    def compute_loss(self, parts, batch):
        if self.global_step == CrashingLora.crash_at:
            raise RuntimeError("simulated crash after the checkpoint")
        return super().compute_loss(parts, batch)


def test_zimage_lora_crash_then_resume_is_bitwise_identical(tiny_models, subject, tmp_path):
    """A run dies after checkpoint 2 of 4 (in this process: a kill -9 subprocess costs ~25 s of imports here, and
    test_flow_families kills one for FLUX.1); `resume="latest"` ends with the uninterrupted run's LoRA, bit for
    bit: transformer adapter, optimizer, sigma and noise draws (the family's CPU generator) all restored."""
    from tuner import registry

    def table(out: Path) -> dict:
        t = run_table(tiny_models["zimage"], subject, out, method=CrashingLora.name, steps=4,
                      lora_crash={"rank": 4, "alpha": 8, "verify_export": False})  # fmt: skip
        t["train"].update(checkpointing_steps=2, checkpoints_total_limit=5)
        return t

    registry.register(CrashingLora.name, CrashingLora)
    try:
        straight = train_here(table(tmp_path / "straight"))
        CrashingLora.crash_at = 2
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_here(table(tmp_path / "crashed"))
        assert not (tmp_path / "crashed" / "pytorch_lora_weights.safetensors").exists()
        CrashingLora.crash_at = None
        resumed = train_here(table(tmp_path / "crashed"), resume="latest")
    finally:
        CrashingLora.crash_at = None
        registry._extra.pop(CrashingLora.name, None)
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)
