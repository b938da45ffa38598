import json

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from tuner.cli import main
from tuner.errors import TunerError
from tuner.models import detect_family, load_parts
from tuner.tiny import FAMILIES, build_pipeline, make_tiny

PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
FLOW = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
T5_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
# Modules LoRA trainers and loaders target, in the double-stream (MMDiT) blocks of both and Flux's single blocks.
DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


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


@pytest.mark.parametrize("name", ["sd1", "sd3", "flux", "zimage"])
def test_tiny_models_are_deterministic(tmp_path, name):
    a, b = make_tiny(tmp_path / "a", name), make_tiny(tmp_path / "b", name)
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    assert [f for f in files if f.suffix == ".safetensors"] and "tokenizer.json" in {f.name for f in files}
    assert files == sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    denoiser = "unet" if name == "sd1" else "transformer"
    other = make_tiny(tmp_path / "c", name, seed=1)
    weights = f"{denoiser}/diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (a / weights).read_bytes()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_make_tiny_cli_writes_a_flow_pipeline_that_samples(tmp_path, name, capsys):
    target = tmp_path / f"tiny-{name}"
    assert main(["make-tiny", str(target), "--family", name]) == 0
    assert f"wrote a tiny {name} pipeline" in capsys.readouterr().out
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == FLOW[name].__name__
    assert list(target.glob("transformer/*.safetensors")) and not list(target.rglob("*.bin"))
    # The T5 tokenizer is a tokenizer.json alone: no sentencepiece model to download.
    assert (target / T5_TOKENIZER[name] / "tokenizer.json").is_file() and not list(target.rglob("*.model"))
    pipe = DiffusionPipeline.from_pretrained(target)
    assert type(pipe) is FLOW[name]
    t5 = getattr(pipe, T5_TOKENIZER[name])
    assert (t5.model_max_length, t5.pad_token_id, t5.eos_token_id) == (32, 0, 1)
    for size in (32, 64):
        image = pipe(
            "a red star on a blue background",
            num_inference_steps=2,
            height=size,
            width=size,
            max_sequence_length=t5.model_max_length,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]
        assert image.shape == (size, size, 3) and np.isfinite(image).all()


def test_sd3_widths_fit_the_pipeline():
    """SD3 concatenates CLIP-L and CLIP-G states, zero-pads them to T5's width (the transformer's joint width)
    and concatenates both pooled projections."""
    pipe = build_pipeline("sd3")
    config, clip_l, clip_g, t5 = pipe.transformer.config, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3
    assert config.joint_attention_dim == t5.config.d_model >= clip_l.config.hidden_size + clip_g.config.hidden_size
    assert config.pooled_projection_dim == clip_l.config.projection_dim + clip_g.config.projection_dim
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    assert config.qk_norm == "rms_norm" and config.patch_size == 2 and config.num_layers == 2
    assert config.in_channels == config.out_channels == pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae_scale_factor == 8 and pipe.vae.quant_conv is None and pipe.vae.post_quant_conv is None
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {f"transformer_blocks.0.attn.{m}" for m in DOUBLE} <= names
    assert {"transformer_blocks.0.attn.norm_q", "transformer_blocks.0.attn.norm_added_k"} <= names


def test_flux_widths_fit_the_pipeline():
    """Flux packs 2x2 latent patches into 4x the VAE's channels, takes T5 states and CLIP-L's pooled output, and
    splits each head's rotary dimensions over its three position axes."""
    pipe = build_pipeline("flux")
    config = pipe.transformer.config
    assert config.in_channels == 4 * pipe.vae.config.latent_channels == 64 and config.patch_size == 1
    assert config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert sum(config.axes_dims_rope) == config.attention_head_dim and config.guidance_embeds
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len, scheduler.shift) == (256, 4096, 3.0)
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {f"transformer_blocks.0.attn.{m}" for m in DOUBLE} <= names
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
    assert {f"single_transformer_blocks.0.{m}" for m in single} <= names


def test_zimage_widths_fit_the_pipeline():
    """Z-Image embeds Qwen3's hidden states (its width is the transformer's caption width), splits each head's
    rotary dimensions over three axes, and wraps every prompt in Qwen3's chat layout before tokenizing."""
    pipe = build_pipeline("zimage")
    config, qwen = pipe.transformer.config, pipe.text_encoder.config
    assert config.cap_feat_dim == qwen.hidden_size and qwen.num_hidden_layers >= 2  # penultimate states exist
    assert sum(config.axes_dims) == config.dim // config.n_heads and config.n_refiner_layers == 1
    assert config.in_channels == pipe.vae.config.latent_channels == 16 and config.all_patch_size == (2,)
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    tok = pipe.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "a red star"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)  # fmt: skip
    assert text == "<|im_start|>user\na red star<|im_end|>\n<|im_start|>assistant\n"
    assert tok.tokenize(text)[:6] == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġstar"]
    assert tok.convert_ids_to_tokens(tok.pad_token_id) == "<|endoftext|>" and tok.model_max_length == 32
    names = {n for n, _ in pipe.transformer.named_modules()}
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        assert {f"{block}.attention.to_q", f"{block}.feed_forward.w2"} <= names


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_pipelines_load_a_diffusers_lora(tmp_path, tiny_models, name):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(tiny_models[name])
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(DOUBLE), init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    FLOW[name].save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    loaded = DiffusionPipeline.from_pretrained(tiny_models[name])
    loaded.load_lora_weights(tmp_path)
    adapted = {n for n, m in loaded.transformer.named_modules() if hasattr(m, "lora_A")}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj"} <= adapted

    def render(p):
        kwargs = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="np")
        return p("a photo of sks dog", generator=torch.Generator().manual_seed(0), **kwargs).images[0]

    assert np.allclose(render(loaded), render(pipe), atol=1e-5)


def test_unknown_family_lists_the_allowed_ones(capsys):
    with pytest.raises(TunerError, match="allowed: " + ", ".join(FAMILIES)):
        build_pipeline("sd4")
    assert FAMILIES == ("sd1", "sd2", "sdxl", "sd3", "flux", "zimage")
    with pytest.raises(SystemExit):
        main(["make-tiny", "unused", "--family", "sd4"])
    assert "'sd1', 'sd2', 'sdxl', 'sd3', 'flux', 'zimage'" in capsys.readouterr().err


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


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_families_are_detected_and_load_frozen(tiny_models, name):
    fam, prediction = detect_family(str(tiny_models[name]))
    assert fam.name == name and prediction == "flow_matching"
    parts = load_parts(str(tiny_models[name]))
    assert parts.family.name == name and type(parts.denoiser).__name__.endswith("Transformer2DModel")
    assert len(parts.text_encoders) == len(parts.tokenizers) == (3 if name == "sd3" else 2)
    assert parts.vae_scale_factor == 8
    modules = [parts.denoiser, parts.vae, *parts.text_encoders]
    assert not any(p.requires_grad for m in modules for p in m.parameters())


def test_unsupported_family_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(TunerError, match="'PixArtAlphaPipeline' is not a supported family.*sd3.*flux"):
        detect_family(str(tmp_path))
