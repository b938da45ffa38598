"""Sources: sidecars (recursive or not), metadata.jsonl/csv, `datasets`, kohya subsets and TOML files."""

from __future__ import annotations

import json

import pytest

from tuner.config import SubsetConfig
from tuner.data import build_training_data, check_data
from tuner.data.sources import list_sources
from tuner.errors import ConfigError, DataError


def captions_of(report) -> dict[str, str]:
    return {f.name: f.status for f in report.files}


def test_sidecars_recursive_and_caption_extension(tmp_path, make_config, noise_image):
    noise_image(tmp_path / "a.png", seed=1, caption="top")
    (tmp_path / "sub").mkdir()
    noise_image(tmp_path / "sub" / "b.png", seed=2)
    (tmp_path / "sub" / "b.caption").write_text("\ufeffnested caption\nsecond line ignored\n", encoding="utf-8")
    flat = list_sources(make_config(tmp_path, caption_extension=".caption"))
    assert [i.name for i in flat.items] == ["a.png"]
    deep = list_sources(make_config(tmp_path, caption_extension=".caption", recursive=True))
    assert {i.name: i.caption for i in deep.items} == {"a.png": None, "sub/b.png": "nested caption"}


def test_metadata_jsonl_and_csv(tmp_path, make_config, noise_image):
    for i in range(3):
        noise_image(tmp_path / f"{i}.png", seed=i, caption="sidecar loses")
    rows = [{"file_name": "0.png", "text": "from jsonl ☕"}, {"file_name": "1.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    items = {i.name: i.caption for i in list_sources(make_config(tmp_path)).items}
    assert items == {"0.png": "from jsonl ☕", "1.png": "second", "2.png": "sidecar loses"}
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text('file_name,text\n0.png,"from csv, with comma"\n9.png,gone\n')
    report = check_data(make_config(tmp_path))
    assert {f.name: (f.status, f.reason) for f in report.files}["9.png"] == ("refused", "missing file")
    items = {i.name: i.caption for i in list_sources(make_config(tmp_path)).items}
    assert items["0.png"] == "from csv, with comma"


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../x.png"])
def test_metadata_row_outside_the_folder_is_an_error(tmp_path, make_config, noise_image, name):
    noise_image(tmp_path / "a.png", seed=1)
    rows = [{"file_name": "a.png", "text": "fine"}, {"file_name": name, "text": "evil"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as err:
        check_data(make_config(tmp_path))
    message = str(err.value)
    assert "metadata.jsonl row 2" in message and name in message and "outside" in message


def test_bad_metadata_json_names_the_row(tmp_path, make_config):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match="metadata.jsonl row 2: not valid JSON"):
        check_data(make_config(tmp_path))


def test_kohya_subsets_repeats_class_tokens_prefix_and_reg(tmp_path, make_config, noise_image, tiny_parts):
    inst, reg = tmp_path / "sks", tmp_path / "reg"
    inst.mkdir(), reg.mkdir()
    noise_image(inst / "1.png", seed=1)
    noise_image(inst / "2.png", seed=2, caption="own caption")
    for i in range(3):
        noise_image(reg / f"{i}.png", seed=10 + i)
    subsets = [
        SubsetConfig(path=str(inst), num_repeats=3, class_tokens="sks dog", caption_prefix="photo:"),
        SubsetConfig(path=str(reg), class_tokens="dog", is_reg=True),
    ]
    with pytest.raises(ConfigError, match="with_prior_preservation"):
        check_data(make_config(subsets=subsets))
    config = make_config(subsets=subsets, with_prior_preservation=True, enable_bucket=False)
    data = build_training_data(config, tiny_parts("sd1"), frozenset({"latents"}), verbose=False)
    assert data.num_examples == 6 and len(data.class_entries) == 3
    assert {e.caption for e in data.entries} == {"photo: sks dog", "photo: own caption"}
    batch = next(data.iterate(0))
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["captions"][2:] == ["dog", "dog"]


def test_kohya_toml_file(tmp_path, make_config, noise_image):
    (tmp_path / "img").mkdir()
    noise_image(tmp_path / "img" / "a.png", seed=1)
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        '[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 512\n'
        '[[datasets.subsets]]\nimage_dir = "img"\nclass_tokens = "sks cat"\nnum_repeats = 4\n'
    )  # fmt: skip
    (item,) = list_sources(make_config(toml)).items
    assert (item.fallback, item.repeats) == ("sks cat", 4)
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\ncolor_aug = true\n')
    with pytest.raises(DataError, match="color_aug"):
        list_sources(make_config(toml))


def test_datasets_imagefolder_saved_dataset_and_offline_hub_id(tmp_path, make_config, noise_image, monkeypatch):
    import datasets

    folder = tmp_path / "hf"
    folder.mkdir()
    for i in range(3):
        noise_image(folder / f"{i}.png", seed=i)
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = check_data(make_config(folder, source_format="imagefolder"))
    assert report.used == 3 and report.sources[0]["kind"] == "datasets"

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    items = list_sources(make_config(saved)).items
    assert sorted(i.caption for i in items) == ["caption 0", "caption 1", "caption 2"]

    in_memory = datasets.Dataset.from_dict({"image": [str(folder / "0.png")], "text": ["in memory"]})
    in_memory = in_memory.cast_column("image", datasets.Image())
    report = check_data(make_config(None), dataset=in_memory)
    assert report.used == 1 and report.captions["count"] == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="someone/no-such-dataset"):
        check_data(make_config("someone/no-such-dataset"))


def test_metadata_may_name_files_in_sub_folders(tmp_path, make_config, noise_image):
    (tmp_path / "sub").mkdir()
    noise_image(tmp_path / "sub" / "deep.png", seed=1)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "sub/deep.png", "text": "from a sub-folder"}\n')
    (item,) = list_sources(make_config(tmp_path)).items
    assert (item.name, item.caption, item.problem) == ("sub/deep.png", "from a sub-folder", None)


def test_kohya_legacy_folder_names_and_class_dir_inside_data(tmp_path, make_config, noise_image):
    (tmp_path / "10_sks dog").mkdir()
    (tmp_path / "notes").mkdir()
    noise_image(tmp_path / "10_sks dog" / "a.png", seed=1)
    (item,) = list_sources(make_config(tmp_path)).items
    assert (item.fallback, item.repeats) == ("sks dog", 10)

    data = tmp_path / "data"
    (data / "class").mkdir(parents=True)
    noise_image(data / "inst.png", seed=2, caption="sks")
    noise_image(data / "class" / "c.png", seed=3)
    config = make_config(data, recursive=True, with_prior_preservation=True, class_data_dir=str(data / "class"),
                         class_prompt="a dog")  # fmt: skip
    report = check_data(config)
    assert {(f.name, f.is_class) for f in report.files} == {("inst.png", False), ("class/c.png", True)}
