"""The micro world is deterministic, its captions stay inside WORDS, and the render CLI writes a usable folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tuner.micro import render, world


def _pixels(item) -> np.ndarray:
    return np.asarray(item.render())


@pytest.mark.parametrize("kind", world.KINDS)
def test_same_seed_same_pixels_and_prefix_stable(kind):
    first = world.scenes(kind, 6, seed=3)
    again = world.scenes(kind, 3, seed=3)
    assert first[:3] == again  # item i depends only on (seed, kind, i)
    for a, b in zip(first[:3], again, strict=True):
        assert np.array_equal(_pixels(a), _pixels(b))
    other = world.scenes(kind, 3, seed=4)
    assert any(not np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(again, other, strict=True))


@pytest.mark.parametrize("kind", world.KINDS)
def test_every_caption_word_is_in_words(kind):
    vocab = set(world.WORDS)
    assert len(vocab) == len(world.WORDS), "WORDS must not repeat a word"
    later_styles = {w for t in world.STYLE_TRIGGERS.values() for w in t.split()} - vocab  # a trigger the base
    assert later_styles == {"painting"}  # never read (see WORDS)
    for item in world.scenes(kind, 400, seed=11):
        words = world.caption_words(item.caption())
        assert set(words) - {world.TOKEN} <= vocab | later_styles, item.caption()
        assert item.caption() == item.caption().lower()
        assert world.TOKEN not in world.caption_words(item.caption(token="sks"))
    for background in world.COLORS:
        assert set(world.caption_words(world.CONCEPT.class_caption(background))) <= vocab


def test_base_captions_match_labels():
    for scene in world.scenes("base", 300, seed=5):
        labels, parsed = scene.labels(), world.parse_caption(scene.caption())
        assert parsed["shape"] == labels["shape"] and parsed["background"] == labels["background"]
        assert parsed["texture"] == labels["texture"]
        assert parsed["color"] in (None, labels["color"])
        assert parsed["concept"] is False and parsed["style"] is None
        assert labels["color"] != labels["background"]
        assert labels["concept"] is False and labels["style"] is None


def test_concept_is_new_to_base_training():
    base = world.scenes("base", 500, seed=0)
    assert world.CONCEPT.class_word in world.SHAPES and world.CONCEPT.class_word in world.WORDS
    assert all(not s.concept and s.texture in world.TEXTURES and s.style is None for s in base)
    concept = world.scenes("concept", 8, seed=0)
    assert all(s.concept and s.shape == world.CONCEPT.class_word for s in concept)
    assert len({(s.background, s.size, s.rotation) for s in concept}) == len(concept)  # varied poses
    caption = concept[0].caption()
    assert caption == f"a photo of a {{token}} heart on a {concept[0].background} background"
    assert concept[0].caption(token="sks") == caption.replace("{token}", "sks")
    parsed = world.parse_caption(caption.replace("{token}", "sks"))
    assert parsed["concept"] and parsed["shape"] == "heart" and parsed["color"] is None


def test_style_captions_name_their_style():
    for scene in world.scenes("style", 100, seed=2):
        assert scene.style in world.STYLES
        assert scene.caption().endswith(" " + world.STYLE_TRIGGERS[scene.style])
        assert world.parse_caption(scene.caption())["style"] == scene.style


def test_renders_are_64px_rgb_with_background_border():
    for scene in world.scenes("base", 60, seed=9):
        image = scene.render()
        assert image.size == (world.SIZE, world.SIZE) and image.mode == "RGB"
        a = np.asarray(image).astype(int)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert (np.abs(border - world.PALETTE[scene.background]).max(axis=1) <= 1).all()
        x0, y0, x1, y1 = scene.bbox()
        assert 0 <= x0 < x1 <= world.SIZE and 0 <= y0 < y1 <= world.SIZE
        inside = np.abs(a[y0:y1, x0:x1] - world.PALETTE[scene.background]).sum(-1) > 30
        assert inside.mean() > 0.2  # the object is where the label says


@pytest.mark.parametrize("kind", ["pattern", "domain"])
def test_patterns_and_domain_are_high_frequency(kind):
    def detail(image) -> float:
        a = np.asarray(image, float)
        return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())

    textures = [detail(p.render()) for p in world.scenes(kind, 24, seed=1)]
    base = [detail(s.render()) for s in world.scenes("base", 24, seed=1)]
    # per image the ranges overlap (a low-contrast noise field vs a large striped shape), as a set they do not
    assert np.median(textures) > 3 * np.median(base) and np.mean(textures) > 3 * np.mean(base)


def test_the_decoder_domain_is_a_pattern_the_vae_corpus_lacks():
    assert {p.pattern for p in world.scenes("pattern", 40, seed=1)} == set(world.PATTERNS)
    assert {p.pattern for p in world.scenes("domain", 40, seed=1)} == {world.DOMAIN_PATTERN}
    assert world.DOMAIN_PATTERN not in world.PATTERNS
    assert {p.kind for p in world.scenes("domain", 3, seed=1)} == {"domain"}


def test_render_cli_writes_images_captions_and_labels(tmp_path):
    out = tmp_path / "concept"
    assert render.main([str(out), "--kind", "concept", "--count", "3", "--seed", "1", "--token", "zwx"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.png", "00000.txt", "00001.png", "00001.txt", "00002.png", "00002.txt", "labels.jsonl",
    ]  # fmt: skip
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["file_name"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    for row in rows:
        caption = (out / row["file_name"].replace(".png", ".txt")).read_text(encoding="utf-8")
        assert caption == row["text"] and "\n" not in caption and " zwx heart " in caption
        assert row["concept"] is True and row["shape"] == "heart" and len(row["bbox"]) == 4

    again = render.render_set(tmp_path / "again", "concept", 3, 1, token="zwx")
    assert [p.read_bytes() for p in again] == [(out / p.name).read_bytes() for p in again]


def test_render_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        render.main([str(tmp_path), "--kind", "nope", "--count", "2"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert all(kind in message for kind in world.KINDS) and "Traceback" not in message
    with pytest.raises(SystemExit) as err:
        render.main([str(tmp_path), "--count", "2", "--token", "two words"])
    assert err.value.code == 2
    with pytest.raises(ValueError, match="expected one of"):
        render.render_set(tmp_path, "nope", 1, 0)


def test_the_reachable_subject_is_one_object_of_base_words_on_its_own_backgrounds():
    photos = world.scenes("subject", 8, seed=1)
    inst = world.INSTANCE
    assert {(s.shape, s.color, s.texture, s.size) for s in photos} == {
        (inst.class_word, *inst.colors, "solid", "large")
    }
    assert {s.background for s in photos} <= set(inst.photo_backgrounds) and len({s.rotation for s in photos}) == 8
    assert all(s.kind == "subject" and not s.concept for s in photos)
    assert photos[0].caption("sks") == f"a photo of a sks heart on a {photos[0].background} background"
    assert photos[0].labels()["kind"] == "subject" and photos[0].labels()["color"] == "black"
