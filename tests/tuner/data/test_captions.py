"""Caption transforms: template and token, prefix/suffix, dropout to empty, tag shuffle keeping the first K."""

from __future__ import annotations

import numpy as np

from tuner.config import DataConfig
from tuner.data.captions import format_caption, shuffle_tags, step_caption


def test_template_token_prefix_suffix():
    data = DataConfig(caption_template="a photo of {token}, {caption}", token="sks", caption_prefix="best",
                      caption_suffix="hd")  # fmt: skip
    assert format_caption(data, "a dog on grass") == "best a photo of sks, a dog on grass hd"
    assert format_caption(data, "dog", prefix="subset") == "best subset a photo of sks, dog hd"


def test_the_word_that_stands_for_the_token_becomes_the_token():
    data = DataConfig(token="<sks>", token_in_captions="sks")  # a set captioned for DreamBooth, read by TI
    assert format_caption(data, "a photo of a sks heart on a purple background") == (
        "a photo of a <sks> heart on a purple background"
    )
    assert format_caption(data, "sks, heart, sksx, asks") == "<sks>, heart, sksx, asks"  # whole words only
    assert format_caption(data, "a <sks> heart") == "a <sks> heart"  # already written with the token
    assert format_caption(DataConfig(token="<sks>"), "a sks heart") == "a sks heart"  # no word given: unchanged


def test_shuffle_keeps_the_first_tokens_and_all_tags():
    caption = "sks, dog, grass, sun, blue sky, smiling"
    seen = set()
    for seed in range(30):
        out = shuffle_tags(caption, 2, np.random.default_rng(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5


def test_dropout_rate_and_determinism():
    data = DataConfig(caption_dropout_rate=0.3, shuffle_tags=True, keep_tokens=1)
    outs = [step_caption(data, "sks, a, b, c", np.random.default_rng([0, 0, i])) for i in range(2000)]
    empty = sum(1 for o in outs if o == "") / len(outs)
    assert 0.25 < empty < 0.35
    assert all(o == "" or o.startswith("sks, ") for o in outs)
    again = [step_caption(data, "sks, a, b, c", np.random.default_rng([0, 0, i])) for i in range(2000)]
    assert outs == again
    static = DataConfig()
    assert step_caption(static, "unchanged, caption", None) == "unchanged, caption"
