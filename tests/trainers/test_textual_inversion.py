"""Textual inversion and pivotal tuning on tiny SD1/SDXL: only the new rows train, files load back exactly.

Hand-written loops (prepare -> compute_loss -> AdamW step -> after_optimizer_step) check the bitwise
guarantees against the trained parts themselves; `tuner.loop.train` runs check the whole path end to end.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.textual_inversion import TextualInversionTrainer, expand_ids
from tuner.conditioning import tokenize
from tuner.config import build_config
from tuner.errors import ConfigError, TunerError
from tuner.models import load_parts

TOKEN = "<sks-cat>"


def make_config(model, *, steps=4, data=None, train=None, **ti):
    layer = {
        "method": "textual_inversion",
        "model": {"pretrained_model_name_or_path": str(model)},
        "data": {
            "resolution": 64,
            "min_bucket_reso": 32,
            "max_bucket_reso": 128,
            "bucket_reso_steps": 16,
            **(data or {}),
        },  # fmt: skip
        "optimizer": {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 0.1},
        "train": {"max_train_steps": steps, "report_to": "none", "checkpointing_steps": 1000, **(train or {})},
        "validation": {"num_inference_steps": 2, "seeds": [0]},
        "textual_inversion": {"placeholder_token": TOKEN, "initializer_token": "cat", **ti},
    }
    return build_config([("test", layer)])


def hand_train(trainer, parts, steps, captions=None, on_step=None):
    """The loop's contract in miniature, with weight decay on every row of the embedding matrix."""
    trainables = trainer.prepare(parts)
    if on_step:
        on_step(-1)
    optimizer = torch.optim.AdamW(trainables.param_groups, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        trainer.global_step = step
        batch = {"latents": torch.randn(2, 4, 8, 8, generator=gen), "generator": gen}
        if captions:
            batch["input_ids"] = tokenize(parts, captions)
        trainer.compute_loss(parts, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.after_optimizer_step(parts)
        if on_step:
            on_step(step)
    return trainables


def embedding(encoder) -> torch.Tensor:
    return encoder.get_input_embeddings().weight.detach()


def non_embedding_state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "token_embedding" not in k}


# --- the bitwise guarantee, and exact files, against the trained parts ------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_only_new_rows_change_and_files_reproduce_them(family, tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    base, parts = load_parts(str(tiny_models[family])), load_parts(str(tiny_models[family]))
    trainer = TextualInversionTrainer(make_config(tiny_models[family], num_vectors=2))
    unet_before = {k: v.clone() for k, v in parts.denoiser.state_dict().items()}
    hand_train(trainer, parts, steps=3)
    for index, (trained, original) in enumerate(zip(parts.text_encoders, base.text_encoders)):
        old = embedding(original)
        new = embedding(trained)
        assert new.shape[0] == old.shape[0] + 2
        assert torch.equal(new[: old.shape[0]], old), f"a frozen row of text encoder {index + 1} moved"
        cat = base.tokenizers[index].convert_tokens_to_ids("cat</w>")
        assert not torch.equal(new[old.shape[0] :], old[cat].expand(2, -1)), "the new rows did not train"
        rest, rest_base = non_embedding_state(trained), non_embedding_state(original)
        assert all(torch.equal(rest[k], rest_base[k]) for k in rest_base)
    assert all(torch.equal(v, unet_before[k]) for k, v in parts.denoiser.state_dict().items())

    artifact = trainer.save(parts, tmp_path)
    trained = trainer.trained_vectors(parts)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models[family]))
    pipe.set_progress_bar_config(disable=True)
    encoders = [(pipe.text_encoder, pipe.tokenizer)]
    if family == "sdxl":
        encoders.append((pipe.text_encoder_2, pipe.tokenizer_2))
    for index, (encoder, tokenizer) in enumerate(encoders):
        weight_name = "learned_embeds.safetensors" if index == 0 else "learned_embeds_2.safetensors"
        pipe.load_textual_inversion(str(tmp_path / weight_name), text_encoder=encoder, tokenizer=tokenizer)
        ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        assert torch.equal(embedding(encoder)[ids], trained[index])
    assert artifact.trigger == TOKEN and {f.path for f in artifact.files} >= {"sks-cat.safetensors"}

    def sample(prompt):
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images

    with_token = sample(f"a photo of a {TOKEN}")
    assert not np.array_equal(with_token, sample("a photo of a"))
    assert not np.array_equal(with_token, sample("a photo of a cat cat"))  # what the token started as


def test_adapter_scale_interpolates_from_the_initializer(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = TextualInversionTrainer(make_config(tiny_models["sd1"]))
    hand_train(trainer, parts, steps=2)
    weight = embedding(parts.text_encoder)
    token_id = parts.tokenizers[0].convert_tokens_to_ids(TOKEN)
    cat_row = weight[parts.tokenizers[0].convert_tokens_to_ids("cat</w>")].clone()
    trained = weight[token_id].clone()
    assert trainer.set_adapter_scale(parts, 0.0)
    assert torch.equal(weight[token_id], cat_row)  # scale 0 reads the prompt as the base model reads "cat"
    trainer.set_adapter_scale(parts, 0.5)
    assert torch.allclose(weight[token_id], (cat_row + trained) / 2)
    trainer.set_adapter_scale(parts, 1.0)
    assert torch.equal(weight[token_id], trained)


def test_init_modes(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    old = embedding(parts.text_encoder).clone()
    trainer = TextualInversionTrainer(make_config(tiny_models["sd1"], init="mean", initializer_token=None))
    trainer.prepare(parts)
    assert torch.allclose(embedding(parts.text_encoder)[-1], old.mean(0))
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = TextualInversionTrainer(make_config(tiny_models["sd1"], init="random", num_vectors=2))
    trainer.prepare(parts)
    rows = embedding(parts.text_encoder)[-2:]
    assert not torch.equal(rows[0], rows[1]) and not torch.allclose(rows[0], old.mean(0))


# --- pivotal tuning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_pivotal_phases(mode, tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    config = make_config(tiny_models["sd1"], steps=4, pivotal=True, pivotal_ti_steps=2, pivotal_embedding_mode=mode,
                         lora={"rank": 2})  # fmt: skip
    trainer = TextualInversionTrainer(config)
    seen = {}

    def record(step):
        seen[step] = ([p.detach().clone() for p in trainer.lora_params], trainer.trained_vectors(parts)[0])

    trainables = hand_train(trainer, parts, steps=4, on_step=record)
    assert [g["name"] for g in trainables.param_groups] == ["embeddings", "unet_lora"]
    initial = seen[-1][0]
    assert all(torch.equal(a, b) for a, b in zip(seen[1][0], initial)), "LoRA moved during phase 1"
    assert not torch.equal(seen[0][1], seen[1][1]), "embeddings did not train in phase 1"
    assert any(not torch.equal(a, b) for a, b in zip(seen[3][0], initial)), "LoRA did not train in phase 2"
    phase_two_moved = not torch.equal(seen[1][1], seen[3][1])
    assert phase_two_moved == (mode == "train")


# --- token clashes and config errors -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ti", "message"),
    [
        ({"placeholder_token": "cat"}, "'cat' is already in the vocabulary of tokenizer 1"),
        ({"placeholder_token": "sks"}, "'sks' is already in the vocabulary"),
        ({"placeholder_token": "<|endoftext|>"}, "already in the vocabulary"),
        ({"initializer_token": ""}, "initializer_token = '': empty"),
        ({"initializer_token": "   "}, "initializer_token = '   ': empty"),
        ({"initializer_token": None}, "initializer_token = None: empty"),
        ({"initializer_token": "kitten"}, "reads it as 6 tokens ['k', 'i', 't', 't', 'e', 'n</w>']"),
        ({"initializer_token": "red cat"}, "reads it as 2 tokens ['red</w>', 'cat</w>']"),
        ({"placeholder_token": "<SKS-cat>"}, "lowercase prompts, so use '<sks-cat>'"),
        ({"placeholder_token": "<sks cat>"}, "one word without spaces"),
        ({"placeholder_token": None}, "placeholder_token: not set"),
        ({"pivotal": True, "pivotal_ti_steps": 4}, "pivotal_ti_steps = 4: must be below train.max_train_steps = 4"),
    ],
)
def test_token_clashes_are_config_errors(ti, message, tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        TextualInversionTrainer(make_config(tiny_models["sd1"], **ti)).prepare(parts)


def test_clash_in_the_second_tokenizer_and_with_extra_vectors(tiny_models):
    parts = load_parts(str(tiny_models["sdxl"]))
    parts.tokenizers[1].add_tokens([f"{TOKEN}_1"])
    with pytest.raises(ConfigError, match=re.escape(f"'{TOKEN}_1' is already in the vocabulary of tokenizer 2")):
        TextualInversionTrainer(make_config(tiny_models["sdxl"], num_vectors=2)).prepare(parts)


def test_placeholder_and_data_token(tiny_models):
    with pytest.raises(ConfigError, match="placeholder_token = '<sks-cat>' but data.token = '<other>'"):
        TextualInversionTrainer(make_config(tiny_models["sd1"], data={"token": "<other>"}))
    config = make_config(tiny_models["sd1"], data={"token": TOKEN}, placeholder_token=None)
    trainer = TextualInversionTrainer(config)
    assert trainer.token == TOKEN and config.data.caption_template == "{token}"
    assert all(TOKEN in prompt for prompt in trainer.validation_prompts())


# --- captions ------------------------------------------------------------------------------------------
def test_multi_vector_ids_match_the_pipelines_prompt_conversion(tiny_models):
    from diffusers.loaders import TextualInversionLoaderMixin

    parts = load_parts(str(tiny_models["sd1"]))
    tokenizer = parts.tokenizers[0]
    names = [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    convert = TextualInversionLoaderMixin().maybe_convert_prompt
    for text in [f"a photo of {TOKEN} and a {TOKEN}", f"{TOKEN} " + "red " * 80]:
        want = tokenize(parts, [convert(text, tokenizer)])[0]
        got = expand_ids(tokenize(parts, [text])[0], ids[0], ids[1:], tokenizer.eos_token_id)
        assert torch.equal(got, want)


def test_captions_without_the_placeholder_are_refused(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = TextualInversionTrainer(make_config(tiny_models["sd1"], templates="captions"))
    with pytest.raises(TunerError, match=re.escape("the caption 'a photo of a cat' does not contain")):
        hand_train(trainer, parts, steps=1, captions=["a photo of <sks-cat>", "a photo of a cat"])


# --- end to end through tuner.loop.train ---------------------------------------------------------------
def write_images(folder, caption):
    folder.mkdir(parents=True)
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("caption", "data"),
    [("a photo of {token} on the beach", {}), ("a photo of sks on the beach", {"token_in_captions": "sks"})],
    ids=["token-in-template", "dreambooth-captions"],
)
def test_loop_sd1_multi_vector_from_captions(tiny_models, tmp_path, caption, data):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from tuner.loop import train
    from tuner.trainer import Artifact

    data = {"path": str(write_images(tmp_path / "data", caption)), **data}
    config = make_config(tiny_models["sd1"], steps=3, data=data,
                         train={"output_dir": str(tmp_path / "run")}, templates="captions", num_vectors=2)  # fmt: skip
    run = train(config)
    artifact = Artifact.read(run)
    assert [f.path for f in artifact.files] == ["learned_embeds.safetensors", "sks-cat.safetensors"]
    assert list((run / "grids").glob("*.png")), "no validation grid"
    vectors = load_file(run / "sks-cat.safetensors")["emb_params"]
    assert vectors.shape == (2, 32)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sd1"]))
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(TOKEN, pipe.tokenizer), add_special_tokens=False).input_ids
    assert torch.equal(embedding(pipe.text_encoder)[ids], vectors)


def test_loop_sdxl_pivotal_writes_both_and_they_load_together(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from tuner.loop import train

    data = write_images(tmp_path / "data", "ignored by the object templates")
    run_dir = str(tmp_path / "run")
    config = make_config(tiny_models["sdxl"], steps=4, data={"path": str(data)}, train={"output_dir": run_dir},
                         pivotal=True, pivotal_ti_steps=2, lora={"rank": 2})  # fmt: skip
    config.validation.enabled = False
    run = train(config)
    names = {p.name for p in run.iterdir()}
    assert {"learned_embeds.safetensors", "learned_embeds_2.safetensors", "sks-cat.safetensors"} <= names
    assert {"pytorch_lora_weights.safetensors", "sks-cat_lora.safetensors"} <= names
    embeds = load_file(run / "sks-cat.safetensors")
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sdxl"]))
    pipe.set_progress_bar_config(disable=True)
    for key, encoder, tokenizer in [("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)]:  # fmt: skip
        pipe.load_textual_inversion(embeds[key], token=TOKEN, text_encoder=encoder, tokenizer=tokenizer)

    def sample(prompt):
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images

    embeddings_only = sample(f"a photo of a {TOKEN}")
    pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors")
    both = sample(f"a photo of a {TOKEN}")
    assert not np.array_equal(both, embeddings_only), "the LoRA had no effect"
    assert not np.array_equal(both, sample("a photo of a"))
