"""What a new user trips on, tried as a new user would: each mistake gets one clear message before any model loads,
`tuner check-data` judges photos as the preset trains them and leaves their folder alone, and `tuner train` ends by
saying where everything is, how to load it and how to publish it."""

from __future__ import annotations

import re

import pytest

from tuner.cli import main
from tuner.config import load_config
from tuner.errors import ConfigError
from tuner.presets import BUILD_STAGES, find_preset, list_presets


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six captioned 64 px micro-world photos (the size of the example sets)."""
    from tuner.micro.render import render_set

    folder = tmp_path_factory.mktemp("photos")
    render_set(folder, "concept", 6, seed=3)
    return folder


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if training gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr("tuner.models.load_parts", refuse)
    monkeypatch.setattr("tuner.models.check_trainable", refuse)


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


# --- configuration ----------------------------------------------------------------------------------------------


def test_a_key_in_the_wrong_table_names_the_table_where_it_lives():
    with pytest.raises(ConfigError) as err:
        load_config(preset="subject-dreambooth-lora-sd15", sets=["lora.rank=4"])
    message = str(err.value)
    assert "lora.rank: unknown key" in message and "did you mean dreambooth.rank?" in message
    assert "[lora] is the table of method = 'lora'" in message
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key; did you mean optimizer\.learning_rate"):
        load_config(preset="style-lora-sd15", sets=["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"lora\.rnak: unknown key; did you mean lora\.rank\?"):
        load_config(preset="style-lora-sd15", sets=["lora.rnak=4"])
    with pytest.raises(ConfigError, match=r"did you mean textual_inversion\.lora\.rank\?"):  # pivotal's LoRA phase
        load_config(preset="subject-pivotal-sd15", sets=["lora.rank=4"])


def test_build_stages_are_not_listed_but_load_by_name(capsys):
    assert main(["presets", "list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed == {info.name for info in list_presets()} and "micro-subject-lora" in listed
    for stage in BUILD_STAGES:
        assert stage not in listed
        assert find_preset(stage).name == stage and load_config(preset=stage).method
    with pytest.raises(ConfigError) as err:
        find_preset("micro-bse")
    assert "micro-base" not in str(err.value)  # suggestions name user presets only


# --- mistakes reported before any model loads ------------------------------------------------------------------


def test_a_mistyped_builtin_name_suggests_the_builtin_ones(photos, tmp_path, no_model_loads, capsys):
    args = ["train", "--preset", "micro-subject-lora", "--model", "builtin:mirco", "--data", str(photos)]
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "'builtin:mirco': no such built-in model; did you mean builtin:micro?" in err
    assert "built-in models: builtin:micro" in err


@pytest.mark.parametrize("preset", ["micro-subject-lora", "style-lora-sd15"])  # the second counts images to scale
@pytest.mark.parametrize("data", ["missing/", "photoz", "/no/such/place"])
def test_a_missing_data_folder_is_reported_before_any_model_loads(
    preset, data, tmp_path, no_model_loads, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tuner.data.sources.load_hf_dataset", lambda *a: pytest.fail("looked up on the hub"))
    assert main(["train", "--preset", preset, "--data", data]) == 1
    err = capsys.readouterr().err
    assert f"data.path = {data!r}: no such folder" in err and "Traceback" not in err


@pytest.mark.parametrize("model", ["./models/sd15", "/no/such/model", "models/sd15/unet", "my-model.safetensors"])
def test_a_local_path_that_is_not_there_says_so_without_a_hub_error(model, photos, tmp_path, no_model_loads, capsys):
    args = ["train", "--preset", "micro-subject-lora", "--model", model, "--data", str(photos)]
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"model.pretrained_model_name_or_path = {model!r}: no such" in err
    assert "repo" not in err.lower() and "hub (" not in err


def test_a_folder_that_is_not_a_model_says_so(photos, tmp_path, capsys):
    out = tmp_path / "runs" / "db"
    args = ["train", "--preset", "micro-subject-lora", "--model", str(photos), "--data", str(photos)]
    assert main([*args, "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "model_index.json" in err and "repo" not in err.lower()
    assert not (tmp_path / "runs").exists(), "a run that wrote nothing leaves no folder behind"


# --- tuner check-data ---------------------------------------------------------------------------------------------


def test_check_data_judges_at_the_preset_resolution_and_writes_nothing(photos, capsys):
    before = _files(photos)
    assert main(["check-data", str(photos)]) == 1  # the default 512 px: 64 px photos are too small
    assert "too small" in capsys.readouterr().out
    assert main(["check-data", "--preset", "micro-subject-lora", str(photos)]) == 0
    out = capsys.readouterr().out
    assert "6 found, 6 used, 0 skipped, 0 refused" in out and "64x64: 6" in out
    assert main(["check-data", "--preset", "subject-dreambooth-lora-sd15", "--vram", "8", "--data", str(photos),
                 "--set", "data.resolution=64", "--json"]) == 0  # fmt: skip
    assert _files(photos) == before  # no .tuner-cache/inspect.json left behind


def test_check_data_vram_needs_a_preset(photos, capsys):
    assert main(["check-data", "--vram", "12", str(photos)]) == 1
    assert "give --preset NAME too" in capsys.readouterr().err


# --- the end of a run -------------------------------------------------------------------------------------------


def test_train_ends_with_where_everything_is_how_to_load_and_publish(photos, tmp_path, capsys, monkeypatch):
    """The micro preset's own command (no class folder given: class images go under the run), with a grid."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "--preset", "micro-subject-lora", "--data", str(photos), "--output-dir", "runs/db"]
    sets = ["train.max_train_steps=2", "train.report_to=none", "data.num_class_images=1",
            "data.class_inference_steps=1", "validation.num_inference_steps=1", "validation.seeds=[0]"]  # fmt: skip
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    run = (tmp_path / "runs" / "db").resolve()
    summary = out[out.index("Done. Everything is in") :]
    assert f"Everything is in {run}" in summary
    assert str(run / "pytorch_lora_weights.safetensors") in summary  # each artifact, where it is
    assert "A1111" in summary and "ComfyUI" in summary  # and what loads it
    print(summary)
    assert re.search(rf"validation grid: +{re.escape(str(run / 'grids' / 'final.png'))}", summary)
    assert re.search(rf"model card: +{re.escape(str(run / 'README.md'))}", summary)
    assert "pipe = DiffusionPipeline.from_pretrained(" in summary and "pipe.load_lora_weights(" in summary
    assert f"Publish it: tuner publish {run} --repo-id" in summary
    assert len(list((run / "cache" / "class_images").glob("*.png"))) == 1


# --- pip install . without -e -------------------------------------------------------------------------------------


@pytest.mark.slow  # builds the wheel: about 10 s (pip sets up the build backend)
def test_the_wheel_carries_the_presets_and_the_builtin_model(tmp_path):
    """What `tuner demo` needs from an installed wheel (CI runs the demo itself from one: .ci/run)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if built.returncode and "hatchling" in built.stderr and "No matching distribution" in built.stderr:
        pytest.skip("the build backend (hatchling) cannot be installed here")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("ldm_tuner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for info in list_presets(include_stages=True):
        assert f"tuner/_presets/{info.method}/{info.name}.toml" in names
    shipped = [
        p.relative_to(root).as_posix() for p in (root / "tuner" / "micro" / "weights").rglob("*") if p.is_file()
    ]
    assert shipped and set(shipped) <= names  # the whole built-in micro model
    assert {"tuner/micro/render.py", "tuner/demo.py", "trainers/dreambooth.py"} <= names  # the demo renders its photos
    assert not [n for n in names if ".tuner-cache" in n or n.endswith(".pyc") or n.startswith("tests/")]
