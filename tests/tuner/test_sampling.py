"""`sample()`: stock pipeline + real LoRA / embedding files, scale 0 is exactly the base, bad inputs are refused."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tuner.errors import TunerError
from tuner.grid import cell_size, grid_size
from tuner.sampling import Embedding, load_embedding, load_pipeline, sample, slug, unique_slugs

FAST = dict(steps=2, guidance_scale=1.0)
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def lora_dir(tiny_models, tmp_path_factory) -> Path:
    """A real diffusers-format UNet LoRA made with peft on the tiny SD1 UNet (random, non-zero B)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return out


def _kohya_copy(lora_file: Path, out: Path) -> Path:
    """The same LoRA under kohya key names (`lora_unet_<path with _>.lora_down.weight`, `.alpha`)."""
    from safetensors.torch import load_file

    kohya = {}
    for key, tensor in load_file(str(lora_file)).items():
        module, kind = re.match(r"unet\.(.+)\.lora_([AB])\.weight$", key).groups()
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind == 'A' else 'up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(kohya, str(out))
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_scale_zero_is_the_base_model_and_scale_one_changes_it(tiny_models, lora_dir, tmp_path):
    model = str(tiny_models["sd1"])
    base = sample(model, [PROMPT], [0], tmp_path / "base", grid=False, **FAST)
    tuned = sample(model, [PROMPT], [0], tmp_path / "lora", lora=[lora_dir], lora_scales=[0, 1], **FAST)

    names = [p.name for p in tuned.images]
    assert names == ["a-photo-of-sks-dog_seed0_scale0.png", "a-photo-of-sks-dog_seed0_scale1.png"]
    assert [p.name for p in base.images] == ["a-photo-of-sks-dog_seed0.png"] and base.grid is None
    scale0, scale1 = (_pixels(p) for p in tuned.images)
    assert np.array_equal(scale0, _pixels(base.images[0]))
    assert np.abs(scale1 - scale0).max() > 0

    grid = Image.open(tuned.grid)
    assert grid.format == "PNG"
    assert grid.size == grid_size(1, 2, cell_size((64, 64)), title=True, groups=2)


def test_kohya_file_loads_like_the_diffusers_file(tiny_models, lora_dir, tmp_path):
    model = str(tiny_models["sd1"])
    kohya = _kohya_copy(lora_dir / "pytorch_lora_weights.safetensors", tmp_path / "style_kohya.safetensors")
    a = sample(model, [PROMPT], [1], tmp_path / "d", lora=[lora_dir], grid=False, **FAST)
    b = sample(model, [PROMPT], [1], tmp_path / "k", lora=[kohya], grid=False, **FAST)
    assert np.abs(_pixels(a.images[0]) - _pixels(b.images[0])).max() <= 1


def test_grid_only_writes_one_labeled_png(tiny_models, tmp_path):
    prompts = ["a red circle", "日本語 🐶"]
    result = sample(str(tiny_models["sd1"]), prompts, [0, 1], tmp_path, write_images=False, **FAST)
    assert result.images == [] and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    assert Image.open(result.grid).size == grid_size(2, 2, cell_size((64, 64)), title=True)


def test_unknown_scheduler_names_valid_ones(tiny_models, tmp_path):
    with pytest.raises(TunerError, match=r"'Nope'.*EulerDiscreteScheduler"):
        sample(str(tiny_models["sd1"]), [PROMPT], [0], tmp_path, scheduler="Nope", **FAST)
    with pytest.raises(TunerError, match=r"'UNet2DConditionModel': unknown; allowed here: Euler a, "):
        sample(str(tiny_models["sd1"]), [PROMPT], [0], tmp_path, scheduler="UNet2DConditionModel", **FAST)


def test_any_scheduler_by_name(tiny_models):
    pipe = load_pipeline(str(tiny_models["sd1"]), scheduler="DPMSolverMultistepScheduler")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_pickle_lora_files_are_refused_unread(tiny_models, tmp_path, suffix):
    bad = tmp_path / f"lora{suffix}"
    bad.write_bytes(b"not read: refused by name before any loading")
    with pytest.raises(TunerError, match="refusing a pickle file"):
        sample(str(tiny_models["sd1"]), [PROMPT], [0], tmp_path / "out", lora=[bad], **FAST)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_clear_errors(tiny_models, tmp_path):
    model = str(tiny_models["sd1"])
    with pytest.raises(TunerError, match="file not found"):
        sample(model, [PROMPT], [0], tmp_path, lora=[tmp_path / "missing.safetensors"], **FAST)
    with pytest.raises(TunerError, match="has no pytorch_lora_weights.safetensors"):
        sample(model, [PROMPT], [0], tmp_path, lora=[tmp_path], **FAST)
    not_lora = tmp_path / "weights.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(not_lora))
    with pytest.raises(TunerError, match="could not be loaded"):
        sample(model, [PROMPT], [0], tmp_path, lora=[not_lora], **FAST)
    with pytest.raises(TunerError, match="--model"):
        sample(str(tmp_path / "nowhere"), [PROMPT], [0], tmp_path, **FAST)
    with pytest.raises(TunerError, match="no prompts"):
        sample(model, [], [0], tmp_path, **FAST)
    with pytest.raises(TunerError, match="--width 60"):
        sample(model, [PROMPT], [0], tmp_path, width=60, **FAST)


def test_textual_inversion_sd1_formats(tiny_models, tmp_path):
    pipe = load_pipeline(str(tiny_models["sd1"]))
    vector = torch.randn(1, 32)
    save_file({"emb_params": vector}, str(tmp_path / "cat-toy.safetensors"))
    save_file({"<dog-toy>": vector * 2}, str(tmp_path / "learned_embeds.safetensors"))

    assert load_embedding(pipe, Embedding(tmp_path / "cat-toy.safetensors")) == "cat-toy"  # A1111: file stem
    assert load_embedding(pipe, Embedding(tmp_path / "learned_embeds.safetensors")) == "<dog-toy>"  # diffusers key
    emb = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb[pipe.tokenizer.convert_tokens_to_ids("cat-toy")], vector[0])
    assert torch.equal(emb[pipe.tokenizer.convert_tokens_to_ids("<dog-toy>")], vector[0] * 2)

    sdxl_file = tmp_path / "xl.safetensors"
    save_file({"clip_l": vector, "clip_g": vector.clone()}, str(sdxl_file))
    with pytest.raises(TunerError, match="not SDXL"):
        load_embedding(pipe, Embedding(sdxl_file, "<xl>"))


def test_textual_inversion_sdxl_loads_both_encoders(tiny_models, tmp_path):
    pipe = load_pipeline(str(tiny_models["sdxl"]))
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 32)
    path = tmp_path / "concept.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    assert load_embedding(pipe, Embedding(path, "<concept>")) == "<concept>"
    for tokenizer, encoder, expected in [
        (pipe.tokenizer, pipe.text_encoder, clip_l),
        (pipe.tokenizer_2, pipe.text_encoder_2, clip_g),
    ]:
        ids = tokenizer.convert_tokens_to_ids(["<concept>", "<concept>_1"])  # multi-vector: tok, tok_1
        assert torch.equal(encoder.get_input_embeddings().weight[ids], expected)
    one = tmp_path / "one.safetensors"
    save_file({"emb_params": clip_l}, str(one))
    with pytest.raises(TunerError, match="needs both 'clip_l' and 'clip_g'"):
        load_embedding(pipe, Embedding(one, "<one>"))


def test_embedding_prompt_renders_through_sample(tiny_models, tmp_path):
    path = tmp_path / "toy.safetensors"
    save_file({"emb_params": torch.randn(1, 32) * 5}, str(path))
    model = str(tiny_models["sd1"])
    plain = sample(model, ["a photo of toy"], [0], tmp_path / "a", grid=False, **FAST)
    with_emb = sample(model, ["a photo of <toy>"], [0], tmp_path / "b", embeddings=[Embedding(path, "<toy>")], **FAST)
    assert np.abs(_pixels(with_emb.images[0]) - _pixels(plain.images[0])).max() > 0


def test_slugs_are_safe_and_unique():
    assert slug("A photo of <sks> dog!") == "a-photo-of-sks-dog"
    assert slug("café crème") == "cafe-creme"
    assert slug("日本語") == "prompt"
    assert unique_slugs(["日本語", "中文", "a b", "a  b"]) == ["prompt", "prompt-2", "a-b", "a-b-2"]
    assert len(slug("x " * 200)) <= 60


def test_compare_puts_a_tuned_pipeline_next_to_the_base_with_only_differences_labeled(tiny_models):
    import copy

    from tuner.comparison import compare
    from tuner.validation import Row

    base = load_pipeline(str(tiny_models["sd1"]))
    tuned = type(base)(**{**base.components, "unet": copy.deepcopy(base.unet)})
    with torch.no_grad():
        tuned.unet.conv_out.bias.add_(0.5)  # a full fine-tune stands in as changed weights
    own = base.scheduler
    result = compare(base, [Row("a (red:1.2) circle")], [0], tuned=tuned, samplers=["Euler a", "DDIM"],
                     num_inference_steps=2, guidance_scale=1.0, width=32, height=32)  # fmt: skip
    assert [c.label for c in result.columns] == [
        "Euler a · base\nseed 0",
        "Euler a · tuned\nseed 0",
        "DDIM · base\nseed 0",
        "DDIM · tuned\nseed 0",
    ]
    assert result.title == "2 steps, guidance 1" and result.rows[0].label() == "a (red:1.2) circle"
    cells = [np.asarray(image).astype(np.int16) for image in result.images[0]]
    assert np.abs(cells[0] - cells[1]).max() > 0 and np.abs(cells[2] - cells[3]).max() > 0
    assert base.scheduler is own  # the pipeline's own sampler is back
    assert result.grid().size == grid_size(1, 4, cell_size((32, 32)), title=True, groups=4)
