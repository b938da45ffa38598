"""Publishing: the card parses and carries the hub fields, the staged folder is exactly what arrives, errors are clean.

Uploads use the real huggingface_hub client over real HTTP against the loopback fake in `hub_server.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner import hub
from tuner.config import RunConfig
from tuner.errors import TunerError
from tuner.trainer import Artifact, ArtifactFile


def _load_fake_hub():
    spec = importlib.util.spec_from_file_location("tuner_test_hub_server", Path(__file__).with_name("hub_server.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.FakeHub


FakeHub = _load_fake_hub()
TOKEN = "hf_tEsTsEcReT0123456789abcdef"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """No real login cache, no ambient endpoint or Xet switch; huggingface_hub reads some of these at import."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py turns it on for everything else
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # hf_xet is installed: publish must turn it off
    return home


@pytest.fixture
def fake_hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished LoRA run with everything a real one has, including what must never be uploaded."""
    run = tmp_path / "run"
    (run / "grids").mkdir(parents=True)
    torch.manual_seed(0)
    lora = {"unet.down.lora_A.weight": torch.randn(4, 8), "unet.down.lora_B.weight": torch.randn(8, 4)}
    save_file(lora, str(run / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    kohya = {"lora_unet_down.lora_down.weight": torch.randn(4, 8), "lora_unet_down.alpha": torch.tensor(8.0)}
    save_file(kohya, str(run / "sks_dog.safetensors"), metadata={"ss_network_dim": "4"})
    Image.new("RGB", (32, 16), (200, 30, 30)).save(run / "grids" / "final.png")
    Image.new("RGB", (32, 16), (30, 200, 30)).save(run / "grids" / "step-000005.png")
    config = RunConfig(method="lora").to_dict()
    config["model"]["pretrained_model_name_or_path"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    config["data"].update(instance_prompt="a photo of sks dog", token="sks")
    config["validation"].update(prompts=["a photo of {token} dog in a bucket"], negative_prompt=f"oops {TOKEN}")
    config["train"].update(max_train_steps=5, output_dir=str(run))
    config["hub"].update(license="openrail++", repo_id="me/from-config")
    config["lora"] = {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_v"]}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    (run / "metrics.json").write_text(json.dumps({"final_loss": 0.0123456, "clip_score": {"tuned": 0.31}}))
    Artifact(
        method="lora",
        family="sd1",
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        files=[
            ArtifactFile(
                "pytorch_lora_weights.safetensors",
                "diffusers",
                f'pipe.load_lora_weights("{run}", weight_name="pytorch_lora_weights.safetensors")',
                ["diffusers"],
            ),
            ArtifactFile(
                "sks_dog.safetensors",
                "kohya-lora",
                f'pipe.load_lora_weights("{run}", weight_name="sks_dog.safetensors")',
                ["A1111", "ComfyUI", "diffusers", "kohya"],
            ),
        ],
        trigger="sks",
        instance_prompt="a photo of sks dog",
    ).write(run)
    # never uploaded
    (run / "checkpoint-5").mkdir()
    save_file({"w": torch.zeros(2)}, str(run / "checkpoint-5" / "model.safetensors"))
    (run / "checkpoint-5" / "optimizer.bin").write_bytes(b"\0" * 64)
    (run / "logs").mkdir()
    (run / "logs" / "events.out.tfevents.1").write_bytes(b"log")
    (run / "logs" / "notes.txt").write_text("log notes")
    (run / ".tuner-cache").mkdir()
    (run / ".tuner-cache" / "latents.safetensors").write_bytes(b"cache")
    (run / "train.bin").write_bytes(b"\1" * 16)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    (run / "grids" / "elsewhere.png").symlink_to(outside)
    return run


EXPECTED = {
    "README.md",
    "artifact.json",
    "config.json",
    "metrics.json",
    "pytorch_lora_weights.safetensors",
    "sks_dog.safetensors",
    "grids/final.png",
    "grids/step-000005.png",
}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_files(run: Path) -> dict[str, bytes]:
    return {k: v for k, v in _tree(run).items() if k != "README.md" and not k.startswith(hub.STAGING_DIR)}


def test_card_parses_back_with_hub_fields(run_dir, tmp_path, hub_env):
    card = hub.build_model_card(run_dir, repo_id="me/sks-dog")
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["library_name"] == "diffusers"
    assert data["license"] == "openrail++"
    for tag in ("text-to-image", "diffusers", "diffusers-training", "lora", "template:sd-lora", "stable-diffusion"):
        assert tag in data["tags"]
    assert "stable-diffusion-xl" not in data["tags"]
    assert data["instance_prompt"] == "a photo of sks dog"
    assert data["widget"] == [{"text": "a photo of sks dog in a bucket", "output": {"url": "grids/final.png"}}]
    text = card.text
    assert 'pipe.load_lora_weights("me/sks-dog", weight_name="pytorch_lora_weights.safetensors")' in text
    assert str(run_dir) not in text  # the snippet names the repo, not this machine
    assert 'pipe.load_lora_weights("me/sks-dog", weight_name="sks_dog.safetensors")' in text
    assert "`sks_dog.safetensors` (kohya-lora format; loads in A1111, ComfyUI, kohya)" in text
    assert "`models/Lora`" in text and "<lora:sks_dog:1>" in text
    assert "![validation grid](grids/final.png)" in text
    assert "| steps | 5 |" in text and "| lora.rank | 4 |" in text and "| learning rate | 0.0001 |" in text
    assert "| final_loss | 0.0123456 |" in text and "| clip_score.tuned | 0.31 |" in text


def test_stage_upload_is_exactly_the_allowed_files(run_dir, tmp_path, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = _run_files(run_dir)
    dest = tmp_path / "staged"
    files = hub.stage_upload(run_dir, dest, repo_id="me/sks-dog")
    assert {p.relative_to(dest).as_posix() for p in files} == EXPECTED == set(_tree(dest))
    staged = _tree(dest)
    for rel in ("pytorch_lora_weights.safetensors", "sks_dog.safetensors", "grids/final.png", "metrics.json"):
        assert staged[rel] == before[rel]
    assert all(TOKEN.encode() not in content for content in staged.values())
    assert TOKEN not in (run_dir / "README.md").read_text()  # the card written into the run is scrubbed too
    assert ModelCard.load(run_dir / "README.md").data.license == "openrail++"
    assert _run_files(run_dir) == before  # nothing else in the run folder changed
    with pytest.raises(hub.HubError, match="not empty"):
        hub.stage_upload(run_dir, dest)


def test_binary_file_holding_the_token_is_refused(run_dir, tmp_path, hub_env):
    with (run_dir / "grids" / "final.png").open("ab") as fh:
        fh.write(TOKEN.encode())
    with pytest.raises(hub.HubError, match="grids/final.png contains your hub token") as err:
        hub.stage_upload(run_dir, tmp_path / "staged", token=TOKEN)
    assert TOKEN not in str(err.value)


def test_user_written_card_is_kept(run_dir, tmp_path, hub_env):
    (run_dir / "README.md").write_text("---\nlicense: mit\n---\n# my own words\n")
    hub.write_model_card(run_dir)
    hub.stage_upload(run_dir, tmp_path / "staged")
    assert (tmp_path / "staged" / "README.md").read_text() == (run_dir / "README.md").read_text()
    assert "my own words" in (run_dir / "README.md").read_text()


def test_publish_uploads_the_staged_folder_byte_for_byte(run_dir, tmp_path, hub_env, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)  # set after huggingface_hub was imported: must still apply
    before = _run_files(run_dir)
    lines: list[str] = []
    result = hub.publish(run_dir, "me/sks-dog", private=True, retries=1, backoff=0.01, out=lines.append)

    expected = _tree(Path(hub.stage_upload(run_dir, tmp_path / "again", repo_id="me/sks-dog")[0]).parent)
    received = fake_hub.state.received("me/sks-dog")
    assert set(received) == EXPECTED
    assert received == expected
    assert all(TOKEN.encode() not in content for content in received.values())
    card_path = tmp_path / "card.md"
    card_path.write_bytes(received["README.md"])
    card = ModelCard.load(card_path)
    assert card.data.widget[0]["output"]["url"] in received
    assert fake_hub.state.repos["me/sks-dog"].get("visibility") == "private"
    assert result.url == f"{fake_hub.url}/me/sks-dog" and result.attempts == 1
    assert any(r.method == "PUT" and r.path.startswith("/__lfs/") for r in fake_hub.state.requests)  # LFS, not Xet
    assert not any("xet" in r.path for r in fake_hub.state.requests)
    for request in fake_hub.state.requests:
        leaked = [k for k, v in request.headers.items() if TOKEN in v and k != "authorization"]
        assert not leaked and TOKEN.encode() not in request.body
        if request.path.startswith("/__lfs/"):
            assert "authorization" not in request.headers  # the storage URL never sees the token
    assert all(TOKEN not in line for line in lines)
    assert _run_files(run_dir) == before and not result.staged_dir.exists()
    assert constants.HF_HUB_DISABLE_XET is False and "HF_HUB_DISABLE_XET" not in os.environ  # restored


def test_publish_endpoint_argument_and_login_cache(run_dir, hub_env, fake_hub):
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)  # what `huggingface-cli login` leaves behind
    result = hub.publish(run_dir, "me/public", endpoint=fake_hub.url, retries=0, out=lambda _: None)
    assert set(fake_hub.state.received("me/public")) == EXPECTED
    assert fake_hub.state.repos["me/public"].get("visibility") in (None, "public")
    auth = [r.headers.get("authorization") for r in fake_hub.state.requests if r.path == "/api/repos/create"]
    assert auth == [f"Bearer {TOKEN}"] and result.attempts == 1


def test_no_token_is_a_clear_error(run_dir, hub_env, fake_hub):
    with pytest.raises(hub.MissingToken, match=r"huggingface-cli login.*HF_TOKEN"):
        hub.publish(run_dir, "me/x", endpoint=fake_hub.url, out=lambda _: None)
    assert fake_hub.state.requests == []


def test_someone_elses_repo_is_cannot_write(run_dir, hub_env, fake_hub):
    fake_hub.state.forbidden_namespaces.add("someone")
    with pytest.raises(hub.CannotWrite, match="you cannot write to someone/model") as err:
        hub.publish(run_dir, "someone/model", token=TOKEN, endpoint=fake_hub.url, backoff=0.01, out=lambda _: None)
    assert TOKEN not in str(err.value) and err.value.__cause__ is None
    assert "Nothing local was removed" in str(err.value) and fake_hub.state.received("someone/model") == {}


def test_rejected_token_is_invalid_token(run_dir, hub_env, fake_hub):
    fake_hub.state.tokens = {"hf_the_right_one"}
    with pytest.raises(hub.InvalidToken, match="401") as err:
        hub.publish(run_dir, "me/x", token=TOKEN, endpoint=fake_hub.url, backoff=0.01, out=lambda _: None)
    assert TOKEN not in str(err.value)


def test_transient_503s_are_retried(run_dir, hub_env, fake_hub):
    fake_hub.state.fail_503 = {"/api/repos/create": 2}
    lines: list[str] = []
    result = hub.publish(
        run_dir, "me/x", token=TOKEN, endpoint=fake_hub.url, retries=3, backoff=0.01, out=lines.append
    )
    assert result.attempts == 3 and sum("retrying" in line for line in lines) == 2
    assert set(fake_hub.state.received("me/x")) == EXPECTED


def test_server_down_gives_up_cleanly(run_dir, hub_env):
    with FakeHub() as server:
        url = server.url  # a port that was just free and is now closed
    before = _run_files(run_dir)
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(hub.HubUnreachable) as err:
        hub.publish(run_dir, "me/x", token=TOKEN, endpoint=url, retries=2, backoff=0.01, out=lines.append)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "after 3 attempt(s)" in message and "Nothing local was removed" in message and TOKEN not in message
    assert len(lines) == 2 and all(TOKEN not in line for line in lines)
    assert isinstance(err.value, TunerError) and err.value.__cause__ is None
    assert _run_files(run_dir) == before


def test_dry_run_writes_the_folder_and_sends_nothing(run_dir, hub_env, fake_hub):
    lines: list[str] = []
    result = hub.publish(run_dir, "me/x", endpoint=fake_hub.url, dry_run=True, out=lines.append)
    assert fake_hub.state.requests == []
    assert result.dry_run and set(_tree(result.staged_dir)) == EXPECTED == set(result.files)
    assert str(result.staged_dir) in lines[0] and {line.strip() for line in lines[1:]} == EXPECTED


def test_unfinished_run_and_bad_repo_id(run_dir, tmp_path, hub_env):
    (tmp_path / "half").mkdir()
    with pytest.raises(hub.NotAFinishedRun, match="not a finished run"):
        hub.publish(tmp_path / "half", "me/x", token=TOKEN)
    with pytest.raises(hub.NotAFinishedRun):
        hub.build_model_card(run_dir / "checkpoint-5")
    with pytest.raises(hub.HubError, match="expected user/name"):
        hub.publish(run_dir, "me/../x", token=TOKEN)


def test_offline_mode_is_refused(run_dir, hub_env, fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        hub.publish(run_dir, "me/x", token=TOKEN, endpoint=fake_hub.url, out=lambda _: None)


def test_cli_arguments_default_to_the_runs_hub_table(run_dir, hub_env, capsys):
    from tuner.cli import build_parser, main

    args = build_parser().parse_args(["publish", str(run_dir), "--dry-run"])
    assert args.private is None and args.endpoint is None
    assert main(["publish", str(run_dir), "--dry-run"]) == 0
    assert "me/from-config" in capsys.readouterr().out


def test_folder_artifacts_upload_whole_and_load_by_subfolder(tmp_path, hub_env):
    run = tmp_path / "db"
    (run / "unet").mkdir(parents=True)
    (run / "unet" / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    (run / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")  # not an allowed format
    load = f'unet = UNet2DConditionModel.from_pretrained("{run}/unet"); '
    load += 'pipe = DiffusionPipeline.from_pretrained("b/m", unet=unet)'
    Artifact("dreambooth", "sdxl", "b/m", [ArtifactFile("unet", "diffusers-unet", load, ["diffusers"])]).write(run)
    files = hub.stage_upload(run, tmp_path / "staged", repo_id="me/db")
    assert sorted(p.relative_to(tmp_path / "staged").as_posix() for p in files) == [
        "README.md", "artifact.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"
    ]  # fmt: skip
    card = ModelCard.load(tmp_path / "staged" / "README.md")
    assert 'UNet2DConditionModel.from_pretrained("me/db", subfolder="unet")' in card.text
    assert "from diffusers import DiffusionPipeline, UNet2DConditionModel" in card.text
    assert {"dreambooth", "stable-diffusion-xl"} <= set(card.data.tags) and "widget" not in card.data.to_dict()


def test_webui_folders_follow_the_file_format_not_the_method():
    from tuner.model_card import webui_folders

    assert webui_folders("kohya-lora") == ("models/Lora", "models/loras")  # DreamBooth-LoRA files too
    assert webui_folders("textual_inversion/portable") == ("embeddings", "models/embeddings")
    assert webui_folders("ldm-vae-safetensors") == ("models/VAE", "models/vae")
    assert webui_folders("diffusers-pipeline") == ("models/Stable-diffusion", "models/checkpoints")


# --- nothing private leaves; cards right to publish (issue 22) ---------------------------------------------------
ABSOLUTE_PATH = re.compile(r"(?:^|[\s\"'`(=\[])(?:/|~/|[A-Za-z]:\\)[\w.~-]", re.M)


def test_dry_run_of_a_local_run_uploads_no_local_path(tiny_models, tmp_path, hub_env, capsys):
    """A LoRA run whose base, data, class, cache and output folders are absolute paths of this machine, without
    validation prompts or instance prompt: it validates with the data's captions, writes files with the umask's
    mode, and its dry-run publish (`--base-model org/name`) stages no byte naming any of those folders."""
    from PIL import Image

    from tuner.cli import main
    from tuner.loop import train

    base = tmp_path / "private-models" / "my-base"
    shutil.copytree(tiny_models["sd1"], base)
    data = tmp_path / "private-photos" / "dog"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 30)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a red dog number {i}", encoding="utf-8")
    klass, cache, run = (
        tmp_path / "private-class" / "dogs",
        tmp_path / "private-cache",
        tmp_path / "private-runs" / "r",
    )
    table = {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {
            "path": str(data),
            "resolution": 64,
            "enable_bucket": False,
            "class_data_dir": str(klass),
            "cache_dir": str(cache),
            "token": "sks",
        },  # fmt: skip
        "optimizer": {"name": "adamw"},
        "train": {"output_dir": str(run), "max_train_steps": 2, "report_to": "none"},
        "validation": {"num_inference_steps": 1, "seeds": [0]},
        "lora": {"rank": 2},
    }
    old = os.umask(0o027)
    try:
        run_dir = train(RunConfig.for_method("lora").model_validate(table))
    finally:
        os.umask(old)
    artifact = Artifact.read(run_dir)
    for f in [*artifact.files, ArtifactFile("artifact.json", "", "")]:
        assert stat.S_IMODE((run_dir / f.path).stat().st_mode) == 0o640, f.path
    assert (run_dir / "grids" / "final.png").is_file()  # validated with the captions, no refusal
    for f in artifact.files:  # headers are written public at train time, not only when staged
        with safe_open(run_dir / f.path, "pt") as fh:
            assert not any(p in v for v in fh.metadata().values() for p in (str(tmp_path), str(run))), f.path

    assert main(["publish", str(run_dir), "--repo-id", "me/dog", "--dry-run", "--base-model", "org/name"]) == 0
    staged = run_dir / hub.STAGING_DIR
    private = [str(p) for p in (tmp_path, base, data, klass, cache, run, run.resolve())]
    tree = _tree(staged)
    assert {"README.md", "config.json", "artifact.json", "pytorch_lora_weights.safetensors"} <= set(tree)
    for rel, content in tree.items():
        leaked = [p for p in private if p.encode() in content]
        assert not leaked, (rel, leaked)
    for rel in (r for r in tree if r.endswith(".safetensors")):
        with safe_open(staged / rel, "pt") as fh:
            metadata = fh.metadata()
        assert not any(p in v for v in metadata.values() for p in private), rel
        shared = json.loads(metadata["tuner.config"])
        assert shared["data"]["path"] == "dog" and shared["data"]["class_data_dir"] == "dogs"
    config = json.loads(tree["config.json"])
    assert config["model"]["pretrained_model_name_or_path"] == "org/name" and config["train"]["output_dir"] == "r"
    assert json.loads(tree["artifact.json"])["base_model"] == "org/name"
    assert json.loads((run_dir / "config.json").read_text())["data"]["path"] == str(data)  # kept locally

    card = ModelCard.load(staged / "README.md")
    assert card.data.base_model == "org/name"
    assert not ABSOLUTE_PATH.search(card.text), ABSOLUTE_PATH.search(card.text)
    assert "import tuner" not in card.text and "from tuner" not in card.text
    assert 'pipe("sks, a red dog number 0")' in card.text and 'pipe("")' not in card.text
    assert 'torch.cuda.is_available() else "cpu"' in card.text and '.to("cuda")' not in card.text
    assert card.data.widget[0]["text"] == "sks, a red dog number 0"


def test_local_card_snippet_runs_as_written_on_cpu(tiny_models, tmp_path, hub_env, monkeypatch):
    """The card written into the run folder (no repo yet) names the run by its folder name and a local base by a
    marked placeholder; with the placeholder filled in, the snippet runs from the folder holding the run."""
    run = tmp_path / "runs" / "dog"
    run.mkdir(parents=True)
    save_file({}, str(run / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    config = RunConfig(method="lora").to_dict()
    config["model"]["pretrained_model_name_or_path"] = str(tiny_models["sd1"])
    config["data"].update(instance_prompt="a photo of sks dog", path=str(tmp_path / "photos"))
    config["train"].update(output_dir=str(run))
    (run / "config.json").write_text(json.dumps(config))
    load = f'pipe.load_lora_weights("{run}", weight_name="pytorch_lora_weights.safetensors")'
    file = ArtifactFile("pytorch_lora_weights.safetensors", "diffusers-lora", load, ["diffusers"])
    Artifact("lora", "sd1", str(tiny_models["sd1"]), [file], instance_prompt="a photo of sks dog").write(run)
    text = hub.write_model_card(run).read_text()
    assert not ABSOLUTE_PATH.search(text) and str(tmp_path) not in text
    assert "a local model" in text and "--base-model" in text and "base_model:" not in text
    code = text.split("```py\n", 1)[1].split("```", 1)[0]
    assert 'pipe.load_lora_weights("dog", weight_name="pytorch_lora_weights.safetensors")' in code
    code = code.replace('"path/to/the-base-model"', json.dumps(str(tiny_models["sd1"])), 1)
    code = code.replace('pipe("a photo of sks dog")', 'pipe("a photo of sks dog", num_inference_steps=2)')
    monkeypatch.chdir(run.parent)
    scope: dict = {}
    exec(compile(code, "card-snippet", "exec"), scope)  # noqa: S102 - the snippet as a user would run it
    assert scope["image"].size[0] > 0 and scope["device"] in ("cpu", "cuda")


def test_builtin_base_is_a_local_model_and_base_model_names_it(run_dir, tmp_path, hub_env):
    artifact = Artifact.read(run_dir)
    artifact.base_model, artifact.instance_prompt = "builtin:micro", None
    artifact.write(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["pretrained_model_name_or_path"] = "builtin:micro"
    config["validation"]["prompts"] = []
    config["data"]["instance_prompt"] = None
    (run_dir / "config.json").write_text(json.dumps(config))
    card = hub.build_model_card(run_dir, repo_id="me/sks-dog")
    assert card.data.base_model is None and "builtin_model_path" not in card.text and "import tuner" not in card.text
    assert "for a local model (Stable Diffusion 1.x)" in card.text and "`builtin:micro`" in card.text
    assert 'base = "path/to/the-base-model"' in card.text and "| base model | a local model |" in card.text
    assert 'pipe("a photo of sks")' in card.text  # the trigger in a sentence, never an empty prompt
    named = hub.build_model_card(run_dir, repo_id="me/sks-dog", base_model="org/micro")
    assert named.data.base_model == "org/micro" and 'from_pretrained("org/micro", torch_dtype=dtype)' in named.text
    with pytest.raises(hub.HubError, match="expected a hub id"):
        hub.build_model_card(run_dir, base_model=str(tmp_path))


def test_headers_of_older_runs_are_made_public_when_staged(run_dir, tmp_path, hub_env):
    secret = str(tmp_path / "secret-photos")
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["path"] = secret
    (run_dir / "config.json").write_text(json.dumps(config))
    tensors = {"lora_unet_down.lora_down.weight": torch.randn(4, 8), "lora_unet_down.alpha": torch.tensor(8.0)}
    meta = {"ss_network_dim": "4", "tuner.config": json.dumps(config), "ss_sd_model_name": str(tmp_path / "base")}
    save_file(tensors, str(run_dir / "sks_dog.safetensors"), metadata=meta)
    hub.stage_upload(run_dir, tmp_path / "staged", repo_id="me/sks-dog")
    staged = tmp_path / "staged" / "sks_dog.safetensors"
    assert str(tmp_path).encode() not in staged.read_bytes()
    assert all(torch.equal(load_file(staged)[k], v) for k, v in tensors.items())
    assert json.loads(safe_open(staged, "pt").metadata()["tuner.config"])["data"]["path"] == "secret-photos"
    assert secret in (run_dir / "sks_dog.safetensors").read_bytes().decode("latin-1")  # the run is untouched
    with (run_dir / "grids" / "final.png").open("ab") as fh:
        fh.write(secret.encode())
    with pytest.raises(hub.HubError, match="grids/final.png contains the local path"):
        hub.stage_upload(run_dir, tmp_path / "again")


def test_settings_table_lists_only_what_the_method_used(run_dir, hub_env):
    config = json.loads((run_dir / "config.json").read_text())
    config["optimizer"].update(text_encoder_lr=5e-5, embedding_lr=1e-3)
    config["lora"].update(train_text_encoder=False, text_encoder_target_modules="attn", rank_pattern={})
    (run_dir / "config.json").write_text(json.dumps(config))
    text = hub.build_model_card(run_dir, repo_id="me/sks-dog").text
    assert "| lora.rank | 4 |" in text and "text_encoder_target_modules" not in text
    assert "text encoder lr" not in text and "embedding lr" not in text and "rank_pattern" not in text
    config["lora"]["train_text_encoder"] = True
    (run_dir / "config.json").write_text(json.dumps(config))
    text = hub.build_model_card(run_dir, repo_id="me/sks-dog").text
    assert "| text encoder lr | 5e-05 |" in text and "| lora.text_encoder_target_modules | attn |" in text


def test_component_snippets_name_the_base_not_a_local_path(tmp_path, hub_env):
    run = tmp_path / "dec"
    (run / "vae").mkdir(parents=True)
    (run / "vae" / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(run / "vae.safetensors"))
    source = tmp_path / "converted" / "micro"  # the folder a built-in or single-file base was loaded from
    files = [
        ArtifactFile("vae", "diffusers-autoencoderkl", f'vae = AutoencoderKL.from_pretrained("{run}/vae"); '
                     f'pipe = DiffusionPipeline.from_pretrained("{source}", vae=vae)', ["diffusers"]),
        ArtifactFile("vae.safetensors", "ldm-vae-safetensors",
                     f'vae = AutoencoderKL.from_single_file("{run}/vae.safetensors", config="{run}/vae")',
                     ["diffusers"]),
    ]  # fmt: skip
    Artifact("decoder", "sd1", "builtin:micro", files).write(run)
    local = hub.build_model_card(run).text
    assert "DiffusionPipeline.from_pretrained(base, vae=vae)" in local and str(tmp_path) not in local
    assert 'from_single_file("dec/vae.safetensors", config="dec/vae")' in local
    named = hub.build_model_card(run, repo_id="me/vae", base_model="org/micro").text
    assert 'DiffusionPipeline.from_pretrained("org/micro", vae=vae)' in named and "base =" not in named
    assert 'snapshot_download("me/vae", allow_patterns=["vae/*"]) + "/vae")' in named


def test_method_rows_leave_out_what_the_settings_did_not_use():
    from tuner.model_card import _method_rows

    db_lora = {"lora": True, "rank": 4, "save_format": "pipeline", "single_file_dtype": "fp16",
               "train_text_encoder": False, "text_encoder_steps": 3}  # fmt: skip
    assert _method_rows("dreambooth", db_lora) == [
        ("dreambooth.lora", True), ("dreambooth.rank", 4), ("dreambooth.train_text_encoder", False)
    ]  # fmt: skip
    full = {"lora": False, "rank": 4, "save_format": "both", "single_file_dtype": "bf16"}
    assert [k for k, _ in _method_rows("dreambooth", full)] == [
        "dreambooth.lora", "dreambooth.save_format", "dreambooth.single_file_dtype"
    ]  # fmt: skip
    pivotal = {"pivotal": True, "num_vectors": 2, "lora": {"rank": 4, "rank_pattern": {}}}
    assert _method_rows("textual_inversion", pivotal)[-1] == ("textual_inversion.lora.rank", 4)
    assert [k for k, _ in _method_rows("textual_inversion", {**pivotal, "pivotal": False})] == [
        "textual_inversion.pivotal", "textual_inversion.num_vectors"
    ]  # fmt: skip
