"""A1111 prompt syntax: parsed weights per token, chunking, and embeddings that match the stock pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from tuner.prompt_embeds import encode_clip, needs_weighting, prompt_embeds
from tuner.prompt_weights import BREAK, Fragment, apply_weights, chunk, parse, plain_text

W = 1.1
PROMPT = "a photo of sks dog"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a (red dress:1.2) on", [("a ", 1.0), ("red dress", 1.2), (" on", 1.0)]),
        ("(word)", [("word", W)]),
        ("[word]", [("word", 1 / W)]),
        ("((word))", [("word", W * W)]),
        ("[(word:1.5)]", [("word", 1.5 / W)]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        ("\\(not weighted\\) \\[x\\]", [("(not weighted) [x]", 1.0)]),
        ("stray ) and ] stay", [("stray ) and ] stay", 1.0)]),
        ("a:b (x:y)", [("a:b ", 1.0), ("x:y", W)]),
        ("(unclosed rest", [("unclosed rest", W)]),
        ("one BREAK two", [("one", 1.0), (BREAK, 0.0), ("two", 1.0)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_a1111_syntax(prompt, expected):
    got = [(f.text, f.weight) for f in parse(prompt)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_plain_text_drops_the_syntax_only():
    assert plain_text("a (red:1.3) [dog] \\(x\\) BREAK cat") == "a red dog (x) cat"


@pytest.fixture(scope="module")
def sd1(tiny_models):
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd1"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _chunks(pipe, prompt: str):
    tok = pipe.tokenizer
    comma = tok(",", add_special_tokens=False).input_ids[0]
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    return chunk(parse(prompt), ids, bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id, comma=comma)


def test_per_token_weights_and_chunks(sd1):
    tok = sd1.tokenizer
    words = len(tok("a photo of", add_special_tokens=False).input_ids)
    dog = len(tok("sks dog", add_special_tokens=False).input_ids)
    chunks = _chunks(sd1, "a photo of (sks dog:1.5)")
    assert chunks.ids.shape == chunks.weights.shape == (1, 77)
    expected = [1.0] * (1 + words) + [1.5] * dog + [1.0] * (77 - 1 - words - dog)
    assert chunks.weights[0].tolist() == pytest.approx(expected)
    assert torch.equal(chunks.ids, tok(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids)

    broken = _chunks(sd1, "a photo BREAK of dog")
    assert broken.ids.shape == (2, 77) and _chunks(sd1, "a photo BREAK").ids.shape == (1, 77)
    assert broken.ids[1, 1:3].tolist() == tok("of dog", add_special_tokens=False).input_ids

    long = _chunks(sd1, " ".join(["dog"] * 100))  # one token each: 75 fit a window
    assert long.ids.shape == (2, 77) and (long.ids[1, 1:26] == long.ids[0, 1]).all()
    commas = _chunks(sd1, " ".join(["dog"] * 70) + " , " + " ".join(["cat"] * 10))
    comma = tok(",", add_special_tokens=False).input_ids[0]
    assert commas.ids[0, 71].item() == comma and commas.ids[0, 72].item() == tok.eos_token_id  # broke after it
    assert commas.ids[1, 1:11].tolist() == tok(" ".join(["cat"] * 10), add_special_tokens=False).input_ids


def test_weight_one_everywhere_is_the_stock_embedding_exactly(sd1, tiny_models):
    stock, stock_negative = sd1.encode_prompt(PROMPT, "cpu", 1, True, "blurry")
    ours = prompt_embeds(sd1, "(a photo:1.0) of (sks:1) dog", "(blurry:1)")
    assert torch.equal(ours["prompt_embeds"], stock) and torch.equal(ours["negative_prompt_embeds"], stock_negative)
    assert needs_weighting(sd1, PROMPT) is False and needs_weighting(sd1, "a (photo) of sks dog") is True
    # The encoder path itself: all-ones weights give the stock tensor bit for bit.
    chunks = _chunks(sd1, PROMPT)
    assert torch.equal(encode_clip(sd1.text_encoder, chunks, penultimate=False).hidden, stock)
    assert torch.equal(apply_weights(stock, torch.ones(1, 77)), stock)
    # A1111's mean restoration where the mean is meaningful; plain scaling where it is ~0 (untrained LayerNorm).
    shifted = stock + 0.5
    heavier = torch.ones(1, 77)
    heavier[0, 3] = 1.5
    restored = apply_weights(shifted, heavier)
    assert restored.mean().item() == pytest.approx(shifted.mean().item(), rel=1e-5)
    assert restored[0, 3].abs().sum() > shifted[0, 3].abs().sum()
    assert abs(stock.mean().item()) < 1e-6 and torch.allclose(apply_weights(stock, heavier)[0, 3], 1.5 * stock[0, 3])

    long = " ".join(["dog"] * 100)
    embeds = prompt_embeds(sd1, long)
    truncated, _ = sd1.encode_prompt(long, "cpu", 1, False)
    assert embeds["prompt_embeds"].shape == (1, 154, stock.shape[-1])
    assert torch.equal(embeds["prompt_embeds"][:, :77], truncated)  # the first window is what stock reads


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_weight_one_matches_the_stock_encoders_of_other_families(tiny_models, family):
    from tuner.families import call_kwargs

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    ours = prompt_embeds(pipe, "(a photo:1) of sks dog", "blurry")
    if family == "sdxl":
        stock = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
        keys = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    elif family == "sd3":
        length = call_kwargs(pipe)["max_sequence_length"]
        stock = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu", negative_prompt="blurry",
                                   max_sequence_length=length)  # fmt: skip
        keys = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    else:
        stock = pipe.encode_prompt(PROMPT, PROMPT, device="cpu", **call_kwargs(pipe))
        keys = ["prompt_embeds", "pooled_prompt_embeds"]
    for key, tensor in zip(keys, stock):
        assert torch.equal(ours[key], tensor), key
    weighted = prompt_embeds(pipe, "a photo of (sks dog:1.4)")
    assert not torch.equal(weighted["prompt_embeds"], ours["prompt_embeds"])
    assert all(torch.isfinite(t).all() for t in weighted.values())


def test_a_weighted_word_moves_the_image_more_than_a_weighted_padding_position(sd1):
    """Same weight, same chunk: on the word it changes the pipeline's output (its latents) more than on a padding
    slot (which the UNet attends to as well)."""
    chunks = _chunks(sd1, PROMPT)
    word = len(sd1.tokenizer(PROMPT, add_special_tokens=False).input_ids)  # the last word, after BOS
    outputs = {}
    for name, position in (("plain", None), ("word", word), ("padding", 60)):
        weights = chunks.weights.clone()
        if position is not None:
            weights[0, position] = 3.0
        embeds = encode_clip(sd1.text_encoder, type(chunks)(chunks.ids, weights), penultimate=False).hidden
        result = sd1(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                     generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
        outputs[name] = result.images
        assert torch.isfinite(result.images).all()
    word_change = (outputs["word"] - outputs["plain"]).abs().mean()
    padding_change = (outputs["padding"] - outputs["plain"]).abs().mean()
    assert word_change > 1.5 * padding_change > 0


def test_weights_reach_the_pipeline_through_render(sd1):
    from tuner.validation import render

    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, width=32, height=32)
    plain, weighted, typed_one = (
        render(sd1, [p], [0], negative_prompt="blurry", **kwargs)[0][0]
        for p in (PROMPT, "a photo of (sks dog:1.6)", "(a photo of sks dog:1.0)")
    )
    diff = lambda a, b: torch.tensor(list(a.getdata())).sub(torch.tensor(list(b.getdata()))).abs().sum()  # noqa: E731
    assert diff(plain, typed_one) == 0 and diff(plain, weighted) > 0
    assert len(set(weighted.getdata())) > 1  # a real image, not the black of a NaN


def test_fragment_break_marker():
    assert Fragment(BREAK, 0.0).is_break and not Fragment(BREAK, 1.0).is_break
