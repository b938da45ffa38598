"""Bad input: every file of a hostile corpus ends up used, skipped or refused with the right reason, no trace."""

from __future__ import annotations

import json
import logging

import pytest

from tuner.data import build_training_data, check_data
from tuner.errors import DataError


def test_check_reports_every_file_with_its_reason(corpus, corpus_expected, make_config):
    report = check_data(make_config(corpus))
    got = {f.name: (f.status, f.reason) for f in report.files}
    assert got == corpus_expected
    assert (report.found, report.used) == (len(corpus_expected), 10)
    assert report.skipped == 3 and report.refused == 6
    assert report.ignored_files == 1  # notes.md
    assert report.dropped_from_buckets == 0
    duplicate = next(f for f in report.files if f.name == "twin.png")
    assert "good.png" in duplicate.detail
    bomb = next(f for f in report.files if f.name == "bomb.png")
    assert "10000x10000" in bomb.detail

    text = report.to_text()
    for name, (status, reason) in corpus_expected.items():
        if status != "used":
            assert name in text and reason in text
    assert "10 used, 3 skipped, 6 refused" in text
    data = json.loads(report.to_json())
    assert data["summary"]["reasons"]["truncated"] == 1
    assert sum(b["images"] for b in data["buckets"].values()) == 10
    assert data["captions"]["count"] == 10
    assert ["red", 2] in data["captions"]["top_tags"]
    assert any(f["name"] == "café_日本.png" and f["status"] == "used" for f in data["files"])


def test_policy_skip_warns_and_trains_policy_error_stops(corpus, make_config, tiny_parts, caplog):
    parts = tiny_parts("sd1")
    with caplog.at_level(logging.WARNING, logger="tuner.data"):
        data = build_training_data(make_config(corpus), parts, frozenset({"latents"}), verbose=False)
    assert data.num_examples == 10
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "truncated.jpg" in warning and "bomb.png" in warning and "twin.png" in warning

    with pytest.raises(DataError) as err:
        build_training_data(make_config(corpus, bad_file_policy="error"), parts, frozenset({"latents"}))
    message = str(err.value)
    assert "bad_file_policy" in message and "9 file(s)" in message
    for name in ("truncated.jpg", "bomb.png", "text.png", "empty.png", "corrupt.png", "latin1.png", "tiny.png"):
        assert name in message


def test_missing_and_empty_paths_are_clear_errors(tmp_path, make_config, tiny_parts):
    missing = tmp_path / "nope" / "images"
    with pytest.raises(DataError, match="no such folder") as err:
        check_data(make_config(missing))
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    report = check_data(make_config(empty))
    assert report.found == 0
    with pytest.raises(DataError, match="no usable training images") as err:
        build_training_data(make_config(empty), tiny_parts("sd1"), frozenset({"latents"}), verbose=False)
    assert str(empty) in str(err.value)


def test_only_bad_files_is_an_error_naming_the_reasons(tmp_path, make_config, tiny_parts):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("hello")
    with pytest.raises(DataError) as err:
        build_training_data(make_config(tmp_path), tiny_parts("sd1"), frozenset({"latents"}), verbose=False)
    assert "zero bytes" in str(err.value) and "not an image" in str(err.value)


def test_missing_caption_uses_instance_prompt_or_template(tmp_path, make_config, noise_image):
    noise_image(tmp_path / "a.png", seed=1)
    assert check_data(make_config(tmp_path)).files[0].reason == "missing caption"
    report = check_data(make_config(tmp_path, instance_prompt="a photo of sks dog"))
    assert report.used == 1
    report = check_data(make_config(tmp_path, caption_template="a photo of {token}", token="sks"))
    assert report.used == 1


def test_check_data_command_text_json_and_exit_status(corpus, tmp_path, capsys):
    from tuner.data.check import check_data_main

    sets = ["data.resolution=64", "data.min_bucket_reso=32", "data.bucket_reso_steps=16"]
    assert check_data_main(str(corpus), sets=sets) == 0
    assert "10 used, 3 skipped, 6 refused" in capsys.readouterr().out
    assert check_data_main(str(corpus), sets=[*sets, "data.bad_file_policy='error'"], as_json=True) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["refused"] == 6
    config = tmp_path / "run.toml"
    config.write_text("[data]\nresolution = 64\nmin_bucket_reso = 32\nbucket_reso_steps = 16\nrandom_flip = 0.5\n")
    assert check_data_main(str(corpus), config_file=str(config)) == 0
    capsys.readouterr()
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError, match="data.resolutoin"):
        check_data_main(str(corpus), sets=["data.resolutoin=64"])


def test_a_file_removed_after_the_check_is_a_clear_error(tmp_path, make_config, noise_image, tiny_parts):
    for i in range(2):
        noise_image(tmp_path / f"{i}.png", seed=i, caption="x")
    data = build_training_data(make_config(tmp_path), tiny_parts("sd1"), frozenset({"pixels"}), verbose=False)
    assert (tmp_path / ".tuner-cache" / "inspect.json").is_file(), "a re-run skips hashing and decoding"
    (tmp_path / "1.png").unlink()
    with pytest.raises(DataError, match=r"1\.png: changed or removed since the data check"):
        list(data.iterate(0))


def test_check_data_command_writes_nothing_unless_a_cache_dir_is_named(tmp_path, noise_image, capsys):
    from tuner.data.check import check_data_main

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        noise_image(photos / f"{i}.png", seed=i, caption="x")
    before = sorted(photos.rglob("*"))
    assert check_data_main(str(photos), sets=["data.resolution=64"]) == 0
    assert sorted(photos.rglob("*")) == before  # no .tuner-cache/inspect.json in the user's folder
    cache = tmp_path / "cache"
    assert check_data_main(str(photos), sets=["data.resolution=64", f"data.cache_dir={str(cache)!r}"]) == 0
    assert (cache / "inspect.json").is_file() and sorted(photos.rglob("*")) == before
    capsys.readouterr()


def test_class_images_default_to_a_folder_under_the_run(tmp_path, make_config, noise_image):
    noise_image(tmp_path / "a.png", seed=1, caption="x")
    config = make_config(tmp_path, with_prior_preservation=True, class_prompt="a photo of dog", num_class_images=3)
    config.train.output_dir = str(tmp_path / "run")
    report = check_data(config)
    assert report.class_images["folder"] == str(tmp_path / "run" / "cache" / "class_images")
    assert report.class_images["to_generate"] == 3
    subsets = [{"path": str(tmp_path), "is_reg": True, "class_tokens": "a photo of dog"}]
    reg = make_config(tmp_path, with_prior_preservation=True, class_prompt="dog", subsets=subsets)
    assert check_data(reg).class_images["folder"] is None  # an is_reg subset is the class set: no folder
