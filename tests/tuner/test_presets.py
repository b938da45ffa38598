"""Presets: every shipped preset validates at every memory tier, tiers and scaling rules resolve as documented,
the CLI lists and explains them, and each preset's own header command trains 3 steps on a tiny model of its family."""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.config import build_config, load_config
from tuner.errors import ConfigError
from tuner.presets import list_presets, read_preset, scale

OURS = [info for info in list_presets() if info.tiers]  # the task presets (micro-* presets have no tiers)
TASKS = ("style-lora", "subject-dreambooth", "subject-dreambooth-lora", "subject-textual-inversion",
         "subject-pivotal", "decoder-finetune")  # fmt: skip
# What the tiny models understand, for the fields a preset requires from the user.
TEST_VALUES = {
    "data.instance_prompt": "a photo of sks heart",
    "data.class_prompt": "a photo of heart",
    "textual_inversion.initializer_token": "cat",
}


def tiny_family(info) -> str:
    return info.family[0] if info.family else "sd1"  # the micro base's build stages: an SD1-shaped pipeline


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six captioned 64 px photos of one micro-world concept, shared by every test here."""
    from tuner.micro.render import render_set

    folder = tmp_path_factory.mktemp("photos")
    render_set(folder, "concept", 6, seed=3)
    return folder


def photo_folder(tmp_path, count: int):
    """`count` distinct images big enough for any preset resolution (scaling only counts them)."""
    from PIL import Image

    folder = tmp_path / f"images-{count}"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (256, 256), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a photo")
    return folder


# --- the catalogue ---------------------------------------------------------------------------------------------


def test_every_task_has_its_presets_for_the_families_that_make_sense():
    names = {info.name for info in OURS}
    for task in TASKS:
        families = ("sd", "sdxl") if task == "decoder-finetune" else ("sd15", "sd21", "sdxl")
        for family in families:
            assert f"{task}-{family}" in names
    decoder = read_preset("decoder-finetune-sd")
    assert decoder.meta.family == ["sd1", "sd2"]  # SD1 and SD2 share the kl-f8 VAE


@pytest.mark.parametrize("name", [info.name for info in list_presets(include_stages=True)])
def test_every_preset_validates_at_every_tier(name):
    preset = read_preset(name)
    for tier in preset.tiers or [None]:
        config = load_config(preset=name, vram=tier)
        assert config.method == preset.info.method
    if preset.tiers:
        assert preset.meta.default_tier in preset.tiers and preset.meta.family and preset.scaling is not None


@pytest.mark.parametrize("info", OURS, ids=lambda i: i.name)
def test_preset_comment_documents_purpose_model_tier_steps_scaling_and_command(info):
    text = info.path.read_text(encoding="utf-8")
    head = info.description
    assert head.splitlines()[0] == info.summary and len(info.summary) > 20
    for needle in ("Base model:", "Memory tiers:", "Expected steps:", "Scaling:", f"tuner train --preset {info.name}"):
        assert needle in head, f"{info.name}: comment lacks {needle!r}"
    assert f"{info.default_tier} (default)" in head
    assert "--vram" in head and "--data" in head and "--model" in head
    assert text.startswith("#")


@pytest.mark.parametrize("info", OURS, ids=lambda i: i.name)
def test_tiers_set_the_memory_levers(info):
    preset = read_preset(info.name)
    levers = {"train.train_batch_size", "train.gradient_checkpointing", "train.mixed_precision", "optimizer.name",
              "data.resolution", "data.cache_latents"}  # fmt: skip
    for tier, overlay in preset.tiers.items():
        keys = {f"{table}.{key}" for table, fields in overlay.items() for key in fields}
        assert levers <= keys, f"{info.name} tier {tier} lacks {levers - keys}"
    if "sdxl" in info.family:
        assert all(o["data"]["resolution"] >= 1024 or info.method == "decoder" for o in preset.tiers.values())
        assert {o["train"]["mixed_precision"] for o in preset.tiers.values()} == {"bf16"}
    if "sd2" in info.family and info.method != "decoder":
        assert {o["data"]["resolution"] for o in preset.tiers.values()} == {768}


# --- tiers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vram", "tier"), [(None, 12), (8, 8), (11.9, 8), (12, 12), (15, 12), (16, 16), (80, 24)])
def test_vram_picks_the_largest_tier_not_above_it(vram, tier):
    preset = read_preset("style-lora-sd15")
    assert preset.pick_tier(vram) == tier
    config = load_config(preset="style-lora-sd15", vram=vram)
    assert config.train.train_batch_size == preset.tiers[tier]["train"]["train_batch_size"]


def test_tier_values_reach_the_config_and_user_values_beat_them():
    low = load_config(preset="style-lora-sdxl", vram=8)
    high = load_config(preset="style-lora-sdxl", vram=24)
    assert (low.lora.train_text_encoder, high.lora.train_text_encoder) == (False, True)
    assert low.train.gradient_checkpointing and low.optimizer.name == "adamw8bit" and high.optimizer.name == "adamw"
    mine = load_config(preset="style-lora-sdxl", vram=8, sets=["train.train_batch_size=3", "lora.rank=4"])
    assert mine.train.train_batch_size == 3 and mine.lora.rank == 4


@pytest.mark.parametrize(
    ("name", "vram", "message"),
    [
        ("subject-dreambooth-sd15", 8, "needs at least 12 GB"),
        ("subject-dreambooth-sdxl", 24, "needs at least 40 GB"),
        ("style-lora-sd15", 0, "expected the GPU's memory in GB"),
        ("micro-base", 12, "has no memory tiers"),
    ],
)
def test_unusable_vram_is_a_clear_error(name, vram, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset=name, vram=vram)


def test_vram_without_a_preset_is_an_error(tmp_path):
    user = tmp_path / "run.toml"
    user.write_text('method = "lora"\n')
    with pytest.raises(ConfigError, match="--vram 12: picks a memory tier of a preset"):
        load_config(user, vram=12)


def test_preset_only_tables_are_validated_too(tmp_path, monkeypatch):
    folder = tmp_path / "presets" / "lora"
    folder.mkdir(parents=True)
    base = '# Broken.\n[preset]\nfamily = "sd1"\ndefault_tier = 8\n[tiers.8.train]\ntrain_batch_size = 1\n'
    monkeypatch.setattr("tuner.presets.presets_dir", lambda: tmp_path / "presets")
    (folder / "typo.toml").write_text(base + "[scaling]\nsteps_per_imgae = 3\n")
    with pytest.raises(ConfigError, match="steps_per_imgae: unknown key"):
        load_config(preset="typo")
    (folder / "typo.toml").write_text(base + "[tiers.8.trian]\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"trian\.seed: unknown key; did you mean train\.seed\?"):
        load_config(preset="typo")
    (folder / "typo.toml").write_text(base.replace("default_tier = 8", "default_tier = 12"))
    with pytest.raises(ConfigError, match="default_tier = 12: must name one of the tiers"):
        load_config(preset="typo")


# --- scaling ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "vram", "images", "steps", "repeats"),
    [
        ("subject-dreambooth-lora-sd15", 12, 5, 500, 20),  # 5 × 100 = 500 (the minimum), batch 1
        ("subject-dreambooth-lora-sd15", 12, 100, 1500, 1),  # 100 × 100 capped at 1500
        ("subject-dreambooth-lora-sd15", 24, 5, 125, 20),  # batch 4 sees each photo as often in fewer steps
        ("style-lora-sd15", 12, 5, 750, 20),  # 5 × 60 = 300 → minimum 1500, ÷ batch 2
        ("style-lora-sd15", 12, 100, 3000, 1),  # 100 × 60 = 6000 (the cap), ÷ batch 2
        ("subject-textual-inversion-sd15", 8, 5, 750, 20),  # 3000 at batch 1 × accumulation 4
        ("subject-dreambooth-sd15", 12, 100, 1600, 1),
    ],
)
def test_scaling_follows_the_number_of_images(name, vram, images, steps, repeats, tmp_path):
    data = photo_folder(tmp_path, images)
    sets = [f"{k}={v}" for k, v in {**TEST_VALUES, "data.class_data_dir": str(tmp_path / "c")}.items()
            if k in read_preset(name).meta.requires]  # fmt: skip
    config = load_config(preset=name, vram=vram, overrides={"data": {"path": str(data)}}, sets=sets)
    assert config.train.max_train_steps == steps
    assert config.data.num_repeats == repeats
    assert config.optimizer.lr_warmup_steps == round(0.05 * steps)


def test_rules_with_5_and_100_images():
    """The documented formulas, with no data on disk: steps, repeats, warmup, pivotal phase 1, scaled lr."""
    preset = read_preset("subject-pivotal-sd15")
    label, layer, _ = preset.layer(vram=16)  # batch 2
    config = build_config([(label, layer)])  # the preset as written, before any rule
    for images, steps in ((5, 500), (100, 1500)):  # 5×200=1000 → /2; 100×200=20000 → cap 3000 → /2
        derived = scale(preset.scaling, config, images, explicit=set()).layer
        assert derived["train"]["max_train_steps"] == steps
        assert derived["data"]["num_repeats"] == max(1, math.ceil(100 / images))
        assert derived["optimizer"]["lr_warmup_steps"] == round(0.05 * steps)
        assert derived["textual_inversion"]["pivotal_ti_steps"] == round(0.35 * steps)
        assert derived["optimizer"]["embedding_lr"] == pytest.approx(5e-4 * 2)


def test_explicit_user_values_win_over_scaling(tmp_path, caplog):
    data = photo_folder(tmp_path, 5)
    user = tmp_path / "mine.toml"
    user.write_text("[train]\nmax_train_steps = 321\n[optimizer]\nlearning_rate = 0.01\n")
    with caplog.at_level(logging.INFO, logger="tuner"):
        config = load_config(
            user,
            "subject-textual-inversion-sd15",
            sets=["data.num_repeats=3", "textual_inversion.initializer_token=cat"],
            overrides={"data": {"path": str(data)}},
            vram=12,
        )
    assert config.train.max_train_steps == 321  # file
    assert config.data.num_repeats == 3  # --set
    assert config.optimizer.learning_rate == 0.01  # not multiplied by the batch: the user's own rate
    assert config.optimizer.lr_warmup_steps == round(0.05 * 321)  # derived from the user's steps
    assert "train.max_train_steps = 321 (yours; the rule would give 750" in caplog.text
    assert "12 GB tier (--vram 12)" in caplog.text and "5 usable images" in caplog.text


def test_scaling_without_data_keeps_the_preset_steps_and_lr_still_follows_the_batch():
    config = load_config(preset="subject-textual-inversion-sdxl", vram=24)
    assert config.train.max_train_steps == 750
    assert config.optimizer.learning_rate == pytest.approx(3e-4 * 4)


def test_required_fields_are_named_all_at_once_with_examples(tmp_path):
    data = photo_folder(tmp_path, 5)
    with pytest.raises(ConfigError) as err:
        load_config(preset="subject-dreambooth-sd15", overrides={"data": {"path": str(data)}})
    message = str(err.value)
    for key in ("data.instance_prompt", "data.class_prompt", "data.class_data_dir"):
        assert key in message
    assert '--set data.instance_prompt="a photo of sks dog"' in message


def test_a_model_of_another_family_is_warned_about(tiny_models, tmp_path, caplog):
    data = photo_folder(tmp_path, 5)
    with caplog.at_level(logging.WARNING, logger="tuner"):
        load_config(preset="style-lora-sdxl", overrides={"data": {"path": str(data)},
                    "model": {"pretrained_model_name_or_path": str(tiny_models["sd1"])}})  # fmt: skip
    assert "tuned for sdxl" in caplog.text and "sd1 model" in caplog.text


# --- the command line -------------------------------------------------------------------------------------------


def test_presets_list_is_a_table_with_family_and_tiers(capsys):
    assert main(["presets", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "METHOD", "FAMILY", "TIERS"]
    row = next(line for line in lines if line.startswith("subject-dreambooth-sd15 "))
    assert "dreambooth" in row and "sd1" in row and "12* 16 24" in row and "DreamBooth for SD1.5" in row
    assert len(lines) == len(list_presets()) + 1


def test_presets_show_explain_prints_every_field_tiers_and_rules(capsys):
    assert main(["presets", "show", "subject-pivotal-sd15", "--explain", "--vram", "16"]) == 0
    out = capsys.readouterr().out
    assert "train.train_batch_size = 2\n    Micro-batch size per process." in out  # the 16 GB tier's value
    assert "textual_inversion.lora.rank = 16" in out and "optimizer.embedding_lr = 0.001" in out
    tables = ("[tiers.8]", "[tiers.12]  # default", "  train.gradient_checkpointing = True")
    rules = ("scaling.steps_per_image = 200", "scaling.pivotal_ti_fraction = 0.35", "initializer_token  (e.g. 'dog')")
    assert all(needle in out for needle in tables + rules)
    config = load_config(preset="subject-pivotal-sd15", vram=16)
    from tuner.config import explain

    assert all(f"{key} = " in out for key, _, _ in explain(config))


def test_flux_preset_explains_every_field_including_the_flow_matching_ones(capsys):
    assert main(["presets", "show", "style-lora-flux", "--explain"]) == 0
    out = capsys.readouterr().out
    from tuner.config import explain

    config = load_config(preset="style-lora-flux")
    assert all(f"{key} = " in out for key, _, _ in explain(config))
    needles = (
        "train.weighting_scheme = 'none'",
        "train.timestep_sampling = 'logit_normal'",
        "train.guidance_scale = 1.0",
        "lora.unet_target_modules = 'attn+ff'",
        "[tiers.24]  # default",
    )
    for needle in needles:
        assert needle in out, needle
    assert "Flow-matching loss weighting" in out  # each field's docstring comes along


def test_train_reports_a_bad_vram_clearly(capsys):
    assert main(["train", "--preset", "subject-dreambooth-sdxl", "--vram", "12"]) == 1
    assert "needs at least 40 GB" in capsys.readouterr().err


# --- every preset trains --------------------------------------------------------------------------------------


def header_command(info) -> list[str]:
    """The `tuner train --preset NAME ...` command of the preset's comment header, as arguments after `tuner`."""
    lines = info.description.splitlines()
    first = next(i for i, line in enumerate(lines) if f"tuner train --preset {info.name}" in line)
    text = lines[first][lines[first].index("tuner train") :]
    while text.endswith("\\"):
        first += 1
        text = text[:-1] + " " + lines[first]
    return shlex.split(text)[1:]


def tiny_command(info, argv: list[str], model, photos, tmp_path) -> list[str]:
    """The header command on test scale: the tiny model of the preset's family replaces `--model` (a command
    without one, a micro preset's, keeps its built-in micro base), the test photos replace `--data`; the build
    stages' `/tmp/micro/...` folders move under `tmp_path`; `--set`s at the end keep the run to 3 small steps on the
    CPU. Everything else stays as written (the run happens in `tmp_path`)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--model", "--data"):
            i += 2
            continue
        out.append(argv[i].replace("/tmp/micro/", f"{tmp_path}/micro/"))
        i += 1
    for assignment in (a for a in out if a.startswith("data.subsets=")):  # a build stage's extra subset folders
        for folder in re.findall(r'path = "([^"]+)"', assignment):
            if not Path(folder).exists():
                shutil.copytree(photos, folder)
    out += (["--model", str(model)] if "--model" in argv else []) + ["--data", str(photos)]
    tier = read_preset(info.name).pick_tier(float(argv[argv.index("--vram") + 1]) if "--vram" in argv else None)
    overlay = read_preset(info.name).tiers.get(tier, {}) if tier else {}
    sets = ["train.max_train_steps=3", "data.resolution=64", "data.enable_bucket=false", "train.train_batch_size=1",
            "train.gradient_accumulation_steps=1", "train.report_to=none", "validation.enabled=false",
            "data.num_class_images=1", "data.class_inference_steps=1"]  # fmt: skip
    if overlay.get("train", {}).get("mixed_precision") == "fp16":
        sets.append("train.mixed_precision=no")  # fp16 autocast is CUDA-only; bf16 runs on the CPU as is
    if "pivotal_ti_steps" in read_preset(info.name).table.get("textual_inversion", {}):
        sets.append("textual_inversion.pivotal_ti_steps=2")  # a fixed phase 1 must end before step 3
    for assignment in sets:
        out += ["--set", assignment]
    return out


def test_header_commands_are_found_for_every_preset():
    for info in list_presets(include_stages=True):
        argv = header_command(info)
        assert argv[:3] == ["train", "--preset", info.name], info.name


@pytest.mark.parametrize("info", list_presets(include_stages=True), ids=lambda i: i.name)
def test_preset_header_command_runs_as_written(info, tiny_models, photos, tmp_path, monkeypatch, capsys):
    """Each preset's documented command, on its family's tiny model and the test photos, for 3 steps."""
    argv = header_command(info)
    monkeypatch.chdir(tmp_path)
    args = tiny_command(info, argv, tiny_models[tiny_family(info)], photos, tmp_path)
    assert main(args) == 0, " ".join(args)
    printed = capsys.readouterr().out
    assert "3 steps × batch 1" in printed  # the loop's summary of the resolved config
    summary = printed[printed.index("Done. Everything is in") :]  # the run ends with where things are
    code = summary.split("Load it in diffusers:\n", 1)[1].split("\n\n", 1)[0]
    compile("\n".join(line[2:] for line in code.splitlines()), "load snippet", "exec")  # runnable as printed
    assert "Publish it: tuner publish " in summary
    out = Path(argv[argv.index("--output-dir") + 1]) if "--output-dir" in argv else Path("runs/latest")
    out = tmp_path / Path(str(out).replace("/tmp/micro/", f"{tmp_path}/micro/"))
    artifact = json.loads((out / "artifact.json").read_text())
    assert artifact["method"] == info.method
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["max_train_steps"] == 3
    tier = read_preset(info.name).pick_tier(float(argv[argv.index("--vram") + 1]) if "--vram" in argv else None)
    precision = read_preset(info.name).tiers[tier]["train"]["mixed_precision"] if tier else None
    if precision in ("no", "bf16"):  # bf16: the full-DreamBooth UNet trains in fp32 beside bf16 frozen parts
        assert resolved["train"]["mixed_precision"] == precision
    data = resolved["data"]
    if data["with_prior_preservation"] and data["prior_mode"] == "images":
        # The class folder as written (relative to where the command ran), else the default under the run.
        folder = tmp_path / data["class_data_dir"] if data["class_data_dir"] else out / "cache" / "class_images"
        assert len(list(folder.glob("*.png"))) == 1  # generated (under the tier's precision) and captioned


def test_a_mistyped_preset_name_suggests_the_close_ones():
    with pytest.raises(ConfigError, match="did you mean style-lora-flux, style-lora-sd15, style-lora-sd21"):
        load_config(preset="style-lora")
