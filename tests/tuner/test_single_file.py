"""Single-file checkpoints in and out: full DreamBooth writes one (LDM/SGM names), and such files are the base of
LoRA, DreamBooth and textual-inversion runs, offline; pickles, unknown files and missing tokenizers are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuner import single_file
from tuner.config import build_config
from tuner.errors import TunerError
from tuner.export import ldm_checkpoint
from tuner.loop import train
from tuner.micro.render import render_set
from tuner.models import detect_family, load_parts

DTYPES = {"sd1": "fp16", "sd2": "bf16", "sdxl": "fp32"}
SAVE_FORMAT = {"sd1": "single_file", "sd2": "single_file", "sdxl": "both"}


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Conversions go to a fresh folder, not the user's cache."""
    old = os.environ.get("TUNER_SINGLE_FILE_CACHE")
    os.environ["TUNER_SINGLE_FILE_CACHE"] = str(tmp_path_factory.mktemp("single-file-cache"))
    yield
    if old is None:
        os.environ.pop("TUNER_SINGLE_FILE_CACHE")
    else:
        os.environ["TUNER_SINGLE_FILE_CACHE"] = old


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    render_set(folder, "concept", 2, seed=3)
    (folder / "labels.jsonl").unlink()
    return folder


def config(method, model, photos, out, steps=1, tokenizer_from=None, **table):
    layer = {
        "method": method,
        "model": {"pretrained_model_name_or_path": str(model), "tokenizer_from": tokenizer_from},
        "data": {"path": str(photos), "resolution": 64, "enable_bucket": False, "cache_dir": str(out / "cache")},
        "optimizer": {"name": "adamw", "learning_rate": 1e-3},
        "train": {"output_dir": str(out), "max_train_steps": steps, "checkpointing_steps": 1000, "report_to": "none"},
        "validation": {"enabled": False},
        method: table,
    }
    return build_config([("test", layer)])


@pytest.fixture(scope="module")
def checkpoints(tiny_models, photos, tmp_path_factory):
    """Each family's tiny pipeline, one step of full DreamBooth, written as a single-file checkpoint."""
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        run = tmp_path_factory.mktemp(f"db-{family}")
        cfg = config("dreambooth", tiny_models[family], photos, run, save_format=SAVE_FORMAT[family],
                     single_file_dtype=DTYPES[family])  # fmt: skip
        train(cfg, summary=False)
        artifact = json.loads((run / "artifact.json").read_text())
        (entry,) = [f for f in artifact["files"] if f["format"] == "ldm-checkpoint"]
        out[family] = run / entry["path"]
    return out


def test_dreambooth_single_file_has_original_names_dtype_and_loads_in_diffusers(checkpoints, tiny_models):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    for family, path in checkpoints.items():
        with safe_open(str(path), framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata()
            dtypes = {f.get_tensor(k).dtype for k in list(keys)[:20]}
        assert all(k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model", "conditioner") for k in keys)
        assert "model.diffusion_model.input_blocks.0.0.weight" in keys
        assert dtypes == {{"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[DTYPES[family]]}
        assert meta["modelspec.sai_model_spec"] == "1.0.1" and "/" not in meta["modelspec.architecture"]
        found = single_file.recognize(path)
        assert found.family == family and found.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
        assert detect_family(str(path))[0].name == family
    # A stock pipeline built from the checkpoint by diffusers itself (configs from the base folder, offline).
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoints["sd2"]), config=str(tiny_models["sd2"]), local_files_only=True, safety_checker=None
    )
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # `both`: the single file holds exactly the pipeline folder's trained UNet.
    folder_unet = DiffusionPipeline.from_pretrained(checkpoints["sdxl"].parent / "pipeline").unet.state_dict()
    file_unet = single_file.load_pipeline(checkpoints["sdxl"], str(tiny_models["sdxl"])).unet.state_dict()
    assert all(torch.equal(folder_unet[k], file_unet[k]) for k in folder_unet)


def _base(checkpoints, tiny_models, family):
    """The single-file base, converted once with its tokenizers from the tiny folder (what the loop's
    load_parts does with `model.tokenizer_from`)."""
    single_file.convert(checkpoints[family], str(tiny_models[family]))
    return checkpoints[family]


def test_lora_on_a_single_file_base_loads_in_a_stock_pipeline(checkpoints, tiny_models, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = _base(checkpoints, tiny_models, "sd1")
    run = tmp_path / "lora"
    train(config("lora", base, photos, run, steps=2, tokenizer_from=str(tiny_models["sd1"]), rank=2), summary=False)
    artifact = json.loads((run / "artifact.json").read_text())
    assert artifact["base_model"] == str(base)
    peft = next(f for f in artifact["files"] if f["format"].startswith("diffusers"))
    pipe = StableDiffusionPipeline.from_single_file(
        str(base), config=str(tiny_models["sd1"]), local_files_only=True, safety_checker=None
    )
    sample, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        before = pipe.unet(sample, t, context).sample
        pipe.load_lora_weights(str(run), weight_name=peft["path"])
        after = pipe.unet(sample, t, context).sample
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_textual_inversion_on_a_single_file_base_loads_in_a_stock_pipeline(checkpoints, tiny_models, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = _base(checkpoints, tiny_models, "sd2")
    run = tmp_path / "ti"
    cfg = config("textual_inversion", base, photos, run, steps=2, tokenizer_from=str(tiny_models["sd2"]),
                 placeholder_token="<sks>", initializer_token="cat")  # fmt: skip
    train(cfg, summary=False)
    artifact = json.loads((run / "artifact.json").read_text())
    file = next(f for f in artifact["files"] if f["format"] == "textual_inversion/diffusers")
    pipe = StableDiffusionPipeline.from_single_file(
        str(base), config=str(tiny_models["sd2"]), local_files_only=True, safety_checker=None
    )
    pipe.load_textual_inversion(str(run / file["path"]))
    ids = pipe.tokenizer("a <sks> photo").input_ids
    assert pipe.tokenizer.convert_tokens_to_ids("<sks>") in ids


def test_dreambooth_on_a_single_file_sdxl_base_writes_a_checkpoint_again(checkpoints, tiny_models, photos, tmp_path):
    base = _base(checkpoints, tiny_models, "sdxl")
    run = tmp_path / "db2"
    cfg = config("dreambooth", base, photos, run, steps=1, tokenizer_from=str(tiny_models["sdxl"]),
                 save_format="single_file", single_file_dtype="fp32")  # fmt: skip
    train(cfg, summary=False)
    artifact = json.loads((run / "artifact.json").read_text())
    (entry,) = artifact["files"]
    assert entry["format"] == "ldm-checkpoint" and "ComfyUI" in entry["tools"]
    pipe = single_file.load_pipeline(run / entry["path"], str(tiny_models["sdxl"]))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    base_unet = single_file.load_pipeline(base, str(tiny_models["sdxl"])).unet.state_dict()
    assert any(not torch.equal(v, base_unet[k]) for k, v in pipe.unet.state_dict().items())


def test_load_parts_converts_with_tokenizer_from_and_reuses_the_conversion(checkpoints, tiny_models):
    parts = load_parts(str(checkpoints["sd1"]), tokenizer_from=str(tiny_models["sd1"]))
    assert parts.family.name == "sd1" and (single_file.cached_conversion(checkpoints["sd1"]) is not None)
    assert parts.source == str(single_file.converted_folder(checkpoints["sd1"]))
    assert len(parts.tokenizers[0]) == parts.text_encoder.get_input_embeddings().weight.shape[0]


# --- refusals: one message naming the file and the fix -------------------------------------------------------
def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(TunerError, match=r"model\.ckpt.*pickle.*\.safetensors"):
        load_parts(str(path))


def test_unknown_safetensors_is_refused_with_what_was_found(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "encoder.layer.1.weight": torch.zeros(2)}, str(path))
    with pytest.raises(TunerError, match=r"mystery\.safetensors.*no SD1.*found 2 tensors, 2 under 'encoder\.layer'"):
        detect_family(str(path))


def test_missing_tokenizer_names_the_file_and_the_fix(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(single_file.CACHED_TOKENIZERS, "sdxl", [[("tuner-tests/absent", "tokenizer")]] * 2)
    monkeypatch.setenv("TUNER_SINGLE_FILE_CACHE", str(tmp_path / "empty-cache"))  # no earlier conversion
    path = tmp_path / "copy.safetensors"
    path.write_bytes(checkpoints["sdxl"].read_bytes())
    with pytest.raises(TunerError, match=r"copy\.safetensors.*holds no tokenizer.*model\.tokenizer_from"):
        load_parts(str(path))
    with pytest.raises(TunerError, match=r"tokenizer_from = .*absent.*no CLIP tokenizer"):
        load_parts(str(path), tokenizer_from=str(tmp_path / "absent"))


def test_a_file_without_the_suites_configs_uses_the_standard_ones(checkpoints, tiny_models, tmp_path):
    """A community checkpoint carries no configs: the released architecture's are used, and a file that does
    not fit them (here: a tiny model without its metadata) is refused in one message."""
    from safetensors.torch import load_file

    path = tmp_path / "community.safetensors"
    save_file(load_file(str(checkpoints["sd1"])), str(path), metadata={"format": "pt"})
    found = single_file.recognize(path)
    assert not found.from_metadata and found.configs["unet"]["cross_attention_dim"] == 768
    with pytest.raises(TunerError, match=r"community\.safetensors.*does not fit the standard sd1"):
        single_file.load_pipeline(path, str(tiny_models["sd1"]))


def test_transformer_single_files_are_refused_clearly(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)}, str(path))
    with pytest.raises(TunerError, match=r"flux1-dev\.safetensors.*SD3/FLUX\.1 single-file.*diffusers folder"):
        detect_family(str(path))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layouts_round_trip_through_diffusers_converters(family):
    """On the meta device (no weights): a full-size SD1.5 / SD2.1 / SDXL written by the suite has the key names
    diffusers recognizes the family by, and diffusers' own converters map every tensor back."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = single_file.standard_configs(family, "v_prediction" if family == "sd2" else "epsilon")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        encoders = [CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
    unet_ldm = ldm_checkpoint.to_ldm_unet_state_dict(unet.state_dict(), unet.config)
    ldm = {single_file.UNET_PREFIX + k: v for k, v in unet_ldm.items()}
    if family == "sd1":
        clip = single_file.CLIP_PREFIX["sd1"]
        ldm.update(ldm_checkpoint.to_ldm_clip_state_dict(encoders[0].state_dict(), clip))
    elif family == "sd2":
        ldm.update(
            ldm_checkpoint.to_open_clip_state_dict(encoders[0].state_dict(), single_file.OPEN_CLIP_PREFIX["sd2"])
        )
    else:
        clip = single_file.CLIP_PREFIX["sdxl"]
        ldm.update(ldm_checkpoint.to_ldm_clip_state_dict(encoders[0].state_dict(), clip))
        ldm.update(
            ldm_checkpoint.to_open_clip_state_dict(encoders[1].state_dict(), single_file.OPEN_CLIP_PREFIX["sdxl"])
        )
    assert infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    upsampler = {"sd1": "output_blocks.2.1.conv.weight", "sd2": "output_blocks.2.1.conv.weight",
                 "sdxl": "output_blocks.2.2.conv.weight"}[family]  # fmt: skip
    assert single_file.UNET_PREFIX + upsampler in ldm
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(back[k].shape == v.shape for k, v in unet.state_dict().items())
    if family != "sd1":  # OpenCLIP: q/k/v fused and split again, the projection transposed and back
        prefix = single_file.OPEN_CLIP_PREFIX[family]
        back = {
            k.removeprefix("text_model."): v
            for k, v in convert_open_clip_checkpoint(encoders[-1], ldm, prefix).items()
        }
        expected = {k.removeprefix("text_model."): v for k, v in encoders[-1].state_dict().items()}
        expected.pop("embeddings.position_ids", None)
        assert set(back) == set(expected)
        assert all(back[k].shape == v.shape for k, v in expected.items())


def test_cli_refusals_are_one_line_without_a_trace(checkpoints, photos, tmp_path, monkeypatch, capsys):
    """What a user sees from `tuner train --model FILE`: one `error:` line naming the file and the fix."""
    from tuner.cli import main

    monkeypatch.setitem(single_file.CACHED_TOKENIZERS, "sd1", [[("tuner-tests/absent", "tokenizer")]])
    monkeypatch.setenv("TUNER_SINGLE_FILE_CACHE", str(tmp_path / "empty-cache"))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    no_tokenizer = tmp_path / "community.safetensors"
    no_tokenizer.write_bytes(checkpoints["sd1"].read_bytes())
    common = ["train", "--data", str(photos), "--set", "method=dreambooth", "--set", "train.max_train_steps=1",
              "--set", "validation.enabled=false", "--set", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    for model, fix in ((pickle, "to .safetensors"), (no_tokenizer, "model.tokenizer_from")):
        code = main([*common, "--model", str(model), "--output-dir", str(tmp_path / model.stem)])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert str(model) in line and fix in line


def test_a_checkpoint_that_does_not_reproduce_the_unet_fails_the_check(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from tuner.models import Parts

    parts = Parts.from_pipeline(DiffusionPipeline.from_pretrained(tiny_models["sd1"]), str(tiny_models["sd1"]))
    path = ldm_checkpoint.save_checkpoint(parts, tmp_path / "ok.safetensors", torch.float16)
    assert ldm_checkpoint.check_checkpoint(parts.denoiser, path, torch.float16) < 1e-2
    tensors, meta = load_file(str(path)), single_file.read_header(path).metadata
    q, k = (f"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_{n}.weight" for n in "qk")
    tensors[q], tensors[k] = tensors[k], tensors[q]  # a renaming slip that keeps every shape
    save_file(tensors, str(tmp_path / "swapped.safetensors"), metadata=meta)
    with pytest.raises(TunerError, match=r"swapped\.safetensors.*predicts differently"):
        ldm_checkpoint.check_checkpoint(parts.denoiser, tmp_path / "swapped.safetensors", torch.float16)


def test_sd2_prediction_type_test_follows_a1111():
    """An SD2 file that does not say v or epsilon: the UNet's answer on a flat input at t=999 decides."""
    from types import SimpleNamespace

    class Unet(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.sign, self.dtype = sign, torch.float32
            self.config = SimpleNamespace(in_channels=4, cross_attention_dim=8)

        def forward(self, x, t, context):
            return SimpleNamespace(sample=self.sign * 4 * x)

    assert single_file.predicts_v(Unet(-1)) and not single_file.predicts_v(Unet(1))
