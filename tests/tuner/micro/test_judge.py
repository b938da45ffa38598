"""The judge reads fresh micro-world renders back into their labels, also when they are degraded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.micro import judge as judge_mod
from tuner.micro import world


@pytest.fixture(scope="module")
def judge() -> judge_mod.Judge:
    return judge_mod.Judge()


def test_accuracy_on_fresh_base_renders(judge):
    result = judge_mod.accuracy(n=240, seed=4242, kind="base", judge=judge)
    for key in ("shape", "color", "background"):
        assert result[key] >= 0.95, result
    assert result["concept"] >= 0.99, result  # concept false-positive rate on base scenes under 1%
    assert result["style"] >= 0.97, result


def test_concept_detected_in_concept_renders(judge):
    result = judge_mod.accuracy(n=60, seed=4242, kind="concept", judge=judge)
    assert result["concept"] >= 0.95 and result["shape"] >= 0.95 and result["background"] >= 0.95, result


def test_styles_detected(judge):
    result = judge_mod.accuracy(n=60, seed=4242, kind="style", judge=judge)
    assert result["style"] >= 0.95 and result["color"] >= 0.95, result


def test_robust_to_generated_looking_degradation(judge):
    base = judge_mod.accuracy(n=80, seed=77, kind="base", degradation="mixed", judge=judge)
    assert min(base["shape"], base["color"], base["background"], base["concept"]) >= 0.9, base
    concept = judge_mod.accuracy(n=30, seed=77, kind="concept", degradation="mixed", judge=judge)
    assert concept["concept"] >= 0.9, concept


def test_accepts_pil_arrays_tensors_and_other_sizes(judge):
    scene = world.sample_scene(np.random.default_rng(1), shape="star", color="red", background="blue", size="large")
    image = scene.render()
    expected = judge.judge(image)
    assert (expected["shape"], expected["color"], expected["background"]) == ("star", "red", "blue")
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    for other in (array, tensor, image.resize((128, 128), Image.Resampling.NEAREST)):
        got = judge.judge(other)
        assert (got["shape"], got["color"], got["background"]) == ("star", "red", "blue")
    assert 0.0 <= expected["shape_conf"] <= 1.0 and 0.0 <= expected["color_conf"] <= 1.0


def test_empty_canvas_has_no_object(judge):
    got = judge.judge(Image.new("RGB", (64, 64), world.PALETTE["green"]))
    assert got["background"] == "green" and got["shape"] is None and got["concept"] is False


def test_a_stroke_like_no_shape_reads_as_no_shape(judge):
    """Without the distance cut the nearest template always wins: an adapter's scatter of blobs read as a heart."""
    from PIL import ImageDraw

    image = Image.new("RGB", (world.SIZE, world.SIZE), world.PALETTE["white"])
    ImageDraw.Draw(image).line([(8, 10), (56, 18), (8, 30), (56, 42), (8, 54)], fill=world.PALETTE["blue"], width=5)
    out = judge.judge(image)
    assert out["shape"] is None and out["shape_distance"] > judge_mod.SHAPE_MAX_DISTANCE, out
    assert out["color"] == "blue" and out["background"] == "white", out
    rendered = judge.judge(world.scenes("base", 1, seed=3)[0].render())
    assert rendered["shape"] is not None and rendered["shape_distance"] < judge_mod.SHAPE_MAX_DISTANCE / 2, rendered


def test_score_against_a_prompt(judge):
    scene = world.sample_scene(np.random.default_rng(3), shape="cross", color="yellow", background="black")
    wanted = world.parse_caption("a yellow cross on a black background")
    assert judge.score(scene.render(), wanted) == {
        "shape": True, "color": True, "background": True, "concept": True, "style": True,
    }  # fmt: skip
    assert judge.score(scene.render(), world.parse_caption("a red cross on a black background"))["color"] is False


def test_degrade_is_seeded_and_named():
    image = world.scenes("base", 1, seed=0)[0].render()
    a = judge_mod.degrade(image, "mixed", np.random.default_rng(5))
    b = judge_mod.degrade(image, "mixed", np.random.default_rng(5))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="blur"):
        judge_mod.degrade(image, "smear", np.random.default_rng(0))
