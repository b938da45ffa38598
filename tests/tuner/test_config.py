import json

import pytest

from tuner.config import build_config, load_config, parse_set, save_config
from tuner.errors import ConfigError


def test_unknown_key_in_method_table_names_dotted_path_and_allowed_keys(toy_method):
    with pytest.raises(ConfigError) as err:
        build_config([("file", {"method": "toy", "toy": {"rnak": 8}})])
    message = str(err.value)
    assert "toy.rnak: unknown key" in message
    assert "alpha, rank" in message


@pytest.mark.parametrize(
    ("layer", "path"),
    [
        ({"oops": 1}, "oops"),
        ({"train": {"max_steps": 1}}, "train.max_steps"),
        ({"data": {"subsets": [{"path": "a"}, {"path": "b", "repeats": 2}]}}, "data.subsets.1.repeats"),
    ],
)
def test_unknown_key_at_any_depth_fails_with_its_dotted_path(toy_method, layer, path):
    with pytest.raises(ConfigError, match=rf"{path}: unknown key"):
        build_config([("file", {"method": "toy", **layer})])


def test_bad_value_names_field_value_and_what_is_allowed(toy_method):
    with pytest.raises(ConfigError) as err:
        build_config([("file", {"method": "toy", "train": {"mixed_precision": "fp8"}})])
    message = str(err.value)
    assert 'train.mixed_precision = "fp8"' in message and "'bf16'" in message


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*lora"):
        build_config([("file", {"method": "lorra"})])


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("train.max_train_steps=100", {"train": {"max_train_steps": 100}}),
        ("optimizer.learning_rate=1e-4", {"optimizer": {"learning_rate": 1e-4}}),
        ("train.gradient_checkpointing=true", {"train": {"gradient_checkpointing": True}}),
        ('validation.prompts=["a dog", "a cat"]', {"validation": {"prompts": ["a dog", "a cat"]}}),
        ('data.instance_prompt="a photo of sks dog"', {"data": {"instance_prompt": "a photo of sks dog"}}),
        ("model.pretrained_model_name_or_path=./my model", {"model": {"pretrained_model_name_or_path": "./my model"}}),
        ("data.path=C:/data=x", {"data": {"path": "C:/data=x"}}),
    ],
)
def test_set_parses_toml_literals_and_falls_back_to_strings(assignment, expected):
    assert parse_set(assignment) == expected


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_set_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="expected table.key=value"):
        parse_set(bad)


def test_resolution_order_defaults_preset_file_overrides_set(toy_method, tmp_path, monkeypatch):
    presets = tmp_path / "presets" / "toy"
    presets.mkdir(parents=True)
    (presets / "toy-preset.toml").write_text(
        "# A toy preset.\n[toy]\nrank = 8\nalpha = 8.0\n[train]\nmax_train_steps = 10\nseed = 1\n"
    )
    monkeypatch.setattr("tuner.presets.presets_dir", lambda: tmp_path / "presets")
    user = tmp_path / "user.toml"
    user.write_text("[toy]\nalpha = 16.0\n[train]\nmax_train_steps = 20\n")
    config = load_config(user, "toy-preset", ["train.max_train_steps=30"], {"data": {"path": "/d"}})
    assert config.method == "toy"  # from the preset's folder
    assert config.toy.rank == 8  # preset beats the default
    assert config.toy.alpha == 16.0  # file beats the preset
    assert config.train.seed == 1  # preset value survives the file
    assert config.train.max_train_steps == 30  # --set beats everything
    assert config.data.path == "/d"
    assert config.optimizer.learning_rate == 1e-4  # code default


def test_resolved_config_round_trips_as_json(toy_method, tmp_path):
    config = build_config([("file", {"method": "toy", "toy": {"rank": 2}})])
    path = save_config(config, tmp_path / "run" / "config.json")
    data = json.loads(path.read_text())
    assert data["toy"]["rank"] == 2 and data["method"] == "toy"
    assert build_config([("json", data)]) == config


def test_missing_file_and_bad_toml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
