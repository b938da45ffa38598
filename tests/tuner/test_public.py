"""What may leave the machine (`tuner.public`): local paths made public in configs and headers, normal file modes,
and the default validation prompts a captioned LoRA run takes from its data."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner.config import RunConfig
from tuner.public import (
    LOCAL_MODEL,
    copy_with_metadata,
    is_hub_id,
    normal_mode,
    private_paths,
    public_base_model,
    public_config,
    public_metadata,
    public_path,
    scrub_text,
)
from tuner.trainer import Artifact, ArtifactFile


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_hub_ids_and_local_models(tmp_path, monkeypatch):
    assert is_hub_id("stabilityai/stable-diffusion-xl-base-1.0")
    for local in (str(tmp_path), "builtin:micro", "./model", "~/models/sd", "/abs/model.safetensors", "a/b/c", ""):
        assert not is_hub_id(local), local
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)  # an existing folder that looks like a hub id is local
    assert not is_hub_id("org/name")
    assert public_base_model(str(tmp_path / "org"), None) == LOCAL_MODEL
    assert public_base_model("builtin:micro") == LOCAL_MODEL
    assert public_base_model(str(tmp_path / "org"), "me/base") == "me/base"
    assert public_base_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


def test_public_paths_are_relative_to_the_run_or_a_last_component(tmp_path):
    run = tmp_path / "runs" / "dog"
    (run / "cache").mkdir(parents=True)
    assert public_path(str(run), run) == "."
    assert public_path(str(run / "cache" / "class_images"), run) == "cache/class_images"
    assert public_path(str(tmp_path / "photos" / "dog"), run) == "dog"
    assert public_path("/home/someone/data/", run) == "data"
    assert public_path("~/photos", run) == "photos"
    assert public_path("a photo of sks dog", run) == "a photo of sks dog"  # not a path
    assert public_path("me/dataset", run) == "me/dataset"  # a hub id stays


def test_public_config_names_no_local_path(tmp_path):
    data, klass, out, cache, base = (tmp_path / n for n in ("secret-data", "secret-class", "out", "c", "base"))
    config = RunConfig.for_method("lora").model_validate(
        {
            "method": "lora",
            "model": {"pretrained_model_name_or_path": str(base), "vae": str(tmp_path / "my-vae")},
            "data": {
                "path": str(data),
                "class_data_dir": str(klass),
                "cache_dir": str(cache),
                "subsets": [{"path": str(tmp_path / "sub" / "10_dog")}],
            },  # fmt: skip
            "train": {"output_dir": str(out)},
            "validation": {"prompts": ["a photo of sks dog"]},
        }
    )
    shared = config.public_dict()
    text = json.dumps(shared)
    assert str(tmp_path) not in text
    assert shared["model"]["pretrained_model_name_or_path"] == LOCAL_MODEL
    assert shared["model"]["vae"] == "my-vae"
    assert (shared["data"]["path"], shared["data"]["class_data_dir"], shared["data"]["cache_dir"]) == (
        "secret-data", "secret-class", "c"
    )  # fmt: skip
    assert shared["data"]["subsets"][0]["path"] == "10_dog" and shared["train"]["output_dir"] == "out"
    assert shared["validation"]["prompts"] == ["a photo of sks dog"]
    assert config.to_dict()["data"]["path"] == str(data)  # the local record keeps full paths
    named = public_config(config.to_dict(), base_model="org/base")
    assert named["model"]["pretrained_model_name_or_path"] == "org/base"
    config.hub.base_model = "org/base"
    assert config.public_dict()["model"]["pretrained_model_name_or_path"] == "org/base"


def test_safetensors_header_is_rewritten_and_tensors_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    secret = str(tmp_path / "secret-data")
    config = {"model": {"pretrained_model_name_or_path": str(tmp_path / "base")}, "data": {"path": secret},
              "train": {"output_dir": str(run)}}  # fmt: skip
    meta = {"tuner.config": json.dumps(config), "ss_sd_model_name": str(tmp_path / "base"),
            "note": f"trained on {secret}/photos today", "ss_network_dim": "4"}  # fmt: skip
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64)}
    save_file(tensors, run / "w.safetensors", metadata=meta)
    shared = public_metadata(meta, run, private_paths(config, run))
    assert str(tmp_path) not in json.dumps(shared)
    assert json.loads(shared["tuner.config"])["model"]["pretrained_model_name_or_path"] == LOCAL_MODEL
    assert shared["ss_sd_model_name"] == "base" and shared["note"] == "trained on photos today"
    assert shared["ss_network_dim"] == "4"
    untouched = {"ss_network_args": '{"conv_dim":"4", "algo": "lora"}', "tuner.config": '{"model": {}, "b": 1}'}
    assert public_metadata(untouched, run) == untouched  # nothing private: the header stays byte for byte
    copy_with_metadata(run / "w.safetensors", tmp_path / "copy.safetensors", shared)
    loaded = load_file(tmp_path / "copy.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "copy.safetensors", "pt") as fh:
        assert fh.metadata() == shared
    assert str(tmp_path).encode() not in (tmp_path / "copy.safetensors").read_bytes()
    assert scrub_text(f"see {run}/grids/final.png", [str(run)], run) == "see grids/final.png"


def test_artifacts_get_the_umask_mode(tmp_path, umask_027):
    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, run / "adapter.safetensors")  # safetensors writes 0600 by itself
    save_file({"w": torch.ones(2)}, run / "unet" / "model.safetensors")
    Artifact("lora", "sd1", "b/m", [ArtifactFile("adapter.safetensors", "diffusers-lora", ""),
                                    ArtifactFile("unet", "diffusers-unet", "")]).write(run)  # fmt: skip
    for path in (run / "adapter.safetensors", run / "unet" / "model.safetensors", run / "artifact.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask_027, path
    assert stat.S_IMODE((run / "unet").stat().st_mode) == 0o777 & ~umask_027
    script = run / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    normal_mode(script)
    assert stat.S_IMODE(script.stat().st_mode) == 0o777 & ~umask_027  # executables stay executable


def _captioned(folder: Path, captions: list[str]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (64, 64), (200, 20 * i, 20)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def test_lora_validation_prompts_default_to_the_data_captions(tmp_path):
    from trainers.lora import LoraTrainer
    from tuner.validation import validation_prompt_list

    captions = [f"a red square number {i}" for i in range(7)]
    data = _captioned(tmp_path / "data", captions)

    def trainer(**table):
        cfg = {"method": "lora", "data": {"path": str(data), **table}}
        return LoraTrainer(RunConfig.for_method("lora").model_validate(cfg))

    prompts = validation_prompt_list(trainer())
    assert len(prompts) == 3 and set(prompts) <= set(captions) and prompts[0] == captions[0]
    assert validation_prompt_list(trainer(token="sks")) == [f"sks, {p}" for p in prompts]
    templated = validation_prompt_list(trainer(token="sks", caption_template="{token} style, {caption}"))
    assert templated[0] == "sks style, a red square number 0"  # as trained: the trigger is already there
    assert validation_prompt_list(trainer(instance_prompt="a photo of sks toy")) == ["a photo of sks toy"]
    empty = LoraTrainer(RunConfig.for_method("lora").model_validate({"method": "lora", "data": {"token": "sks"}}))
    assert validation_prompt_list(empty) == ["a photo of sks"]


def test_checkpoints_get_the_umask_mode(tmp_path, umask_027):
    from tuner.checkpoint import save_atomically

    def shared(folder: Path) -> None:
        save_file({"w": torch.ones(2)}, folder / "model.safetensors")

    final = save_atomically(tmp_path, 3, shared, lambda folder: None, True, lambda: None, None)
    assert final.name == "checkpoint-3"
    for path in final.rglob("*"):
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask_027
        assert stat.S_IMODE(path.stat().st_mode) == wanted, path
