"""`tuner export`: LoRA format conversion (alpha and metadata kept, tensors exact) and fusing into a pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner.config import RunConfig
from tuner.errors import TunerError
from tuner.export.convert import export, file_format
from tuner.export.lora import export_lora
from tuner.export.lora_diffusers import read_peft_file
from tuner.export.roundtrip import Check, Probe, fresh_pipeline, outputs_of, pipeline_outputs
from tuner.export.state import collect_state
from tuner.models import load_parts


def exported(model_dir, out, variant="lora", rank=4, alpha=8.0, targets="attn", **extra):
    """Write both files of a perturbed adapter (unchecked: the export tests cover that) and return `out`."""
    from trainers.lora import adapted_models, inject_lora

    table = {"rank": rank, "alpha": alpha, "variant": variant, "train_text_encoder": True}
    table.update(unet_target_modules=targets, **extra)
    config = RunConfig.for_method("lora").model_validate({"method": "lora", "lora": table})
    parts = load_parts(str(model_dir))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for group in inject_lora(parts, config.lora, config):
            for p in group["params"]:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    state = collect_state(adapted_models(parts), "tuner")
    export_lora(parts, state, out, output_name="toy", resolution=64, trigger="sks", verify=False)
    return out


def header(path):
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


@pytest.mark.parametrize(("family", "variant"), [("sd1", "lora"), ("sd2", "dora")])
def test_diffusers_to_kohya_to_diffusers_keeps_tensors_alpha_and_metadata(tiny_models, tmp_path, family, variant):
    model = str(tiny_models[family])
    src = exported(model, tmp_path / "src", variant=variant) / "pytorch_lora_weights.safetensors"
    kohya = export(src, "kohya", tmp_path / "k", model=model, name="converted")  # checked against src by loading
    assert kohya == tmp_path / "k" / "converted.safetensors" and file_format(kohya) == "kohya"
    assert load_file(kohya)["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 8.0
    meta = header(kohya)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["modelspec.trigger_phrase"] == "sks" and "sshs_model_hash" in meta
    back = export(kohya, "diffusers", tmp_path / "d", model=model)
    assert back.name == "pytorch_lora_weights.safetensors"
    original, again = load_file(src), load_file(back)
    assert set(original) == set(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    config = json.loads(header(back)["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == 8.0 and config["unet.r"] == 4 and config["text_encoder.lora_alpha"] == 8.0
    assert config["unet.use_dora"] == (variant == "dora")
    assert header(back)["modelspec.title"] == "toy"


def test_per_module_alphas_survive_conversion_both_ways(tiny_models, tmp_path):
    model = str(tiny_models["sd1"])
    src = exported(model, tmp_path / "src", alpha_pattern={"attn2.to_v": 2.0, "k_proj": 1.0})
    kohya = export(src / "pytorch_lora_weights.safetensors", "kohya", tmp_path / "k", model=model)
    tensors = load_file(kohya)
    assert tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.alpha"].item() == 2.0
    assert tensors["lora_te_text_model_encoder_layers_1_self_attn_k_proj.alpha"].item() == 1.0
    back = export(kohya, "diffusers", tmp_path / "d", model=model)  # checked by loading, as kohya tools would
    config = json.loads(header(back)["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == 8.0 and set(config["unet.alpha_pattern"].values()) == {2.0}
    assert all(key.endswith("attn2.to_v") for key in config["unet.alpha_pattern"])


def test_sdxl_family_comes_from_the_file_when_no_model_is_given(tiny_models, tmp_path):
    src = exported(tiny_models["sdxl"], tmp_path / "src", rank=2, alpha=1.0) / "pytorch_lora_weights.safetensors"
    kohya = export(src, "kohya", tmp_path / "toy_xl.safetensors")
    keys = load_file(kohya)
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert header(kohya)["ss_base_model_version"] == "sdxl_base_v1-0"
    with pytest.raises(TunerError, match="needs the base model"):
        export(kohya, "diffusers", tmp_path / "d")


def test_fuse_bakes_the_lora_into_a_pipeline_folder(tiny_models, tmp_path):
    model = str(tiny_models["sd1"])
    src = exported(model, tmp_path / "src") / "toy.safetensors"
    fused = export(src, "fused", tmp_path / "fused", model=model)  # checked against the loaded LoRA inside
    assert (fused / "model_index.json").is_file()
    assert (fused / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = fresh_pipeline(model)
    probe = Probe.for_pipeline(pipe)
    base = pipeline_outputs(pipe, probe)
    baked = outputs_of(lambda: fresh_pipeline(fused), probe)
    for name in base:
        assert (baked[name] - base[name]).abs().max() > 1e-3


def test_fuse_loha_uses_lycoris_math_and_half_scale_is_checked(tiny_models, tmp_path):
    model = str(tiny_models["sd1"])
    src = exported(model, tmp_path / "src", variant="loha") / "pytorch_loha_weights.safetensors"
    assert read_peft_file(src).variant == "loha"
    export(src, "fused", tmp_path / "fused", model=model, scale=0.5)
    assert Check(tmp_path / "fused", "pipeline").label == "fused via pipeline"
    with pytest.raises(TunerError, match="not empty"):
        export(src, "fused", tmp_path / "fused", model=model)


def test_bad_inputs_fail_with_clear_messages(tiny_models, tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(TunerError, match="neither a kohya LoRA"):
        export(tmp_path / "foreign.safetensors", "kohya", tmp_path / "out")
    with pytest.raises(TunerError, match="expected an existing .safetensors"):
        export(tmp_path / "missing.safetensors", "kohya", tmp_path / "out")
    with pytest.raises(TunerError, match="--to 'onnx'"):
        export(tmp_path / "foreign.safetensors", "onnx", tmp_path / "out")
    with pytest.raises(TunerError, match="needs the base model"):
        export(tmp_path / "foreign.safetensors", "fused", tmp_path / "out")
