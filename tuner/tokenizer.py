"""A CLIP tokenizer built from the project's own word list, so tiny and micro models need no download.

Every word becomes one token through a chain of BPE merges; any other word still tokenizes, letter by
letter, because every character is in the vocabulary in both its inner and word-final (`</w>`) form.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words the tiny models' prompts and tests use; the micro world adds its own vocabulary.
BASIC_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "photo",
    "picture",
    "painting",
    "style",
    "drawing",
    "image",
    "render",
    "sks",
    "dog",
    "cat",
    "toy",
    "person",
    "man",
    "woman",
    "beach",
    "park",
    "city",
    "forest",
    "snow",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "pink",
    "gray",
    "brown",
    "circle",
    "square",
    "triangle",
    "star",
    "background",
    "small",
    "large",
    "big",
    "bright",
    "dark",
    "sunny",
    "wearing",
    "hat",
]


def build_vocab(words: list[str] | tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges in the `vocab.json` / `merges.txt` shapes CLIP uses."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens: list[str] = []
    for c in chars:
        tokens += [c, c + "</w>"]
    ranks: dict[tuple[str, str], int] = {}
    seen = set(tokens)
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2 or not all(c in chars for c in word):
            continue
        # Tokenize with the merges so far, then chain what is left: later merges never change earlier words.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks[(left, right)] = len(ranks)
            left = left + right
            if left not in seen:
                tokens.append(left)
                seen.add(left)
    merges = [f"{a} {b}" for (a, b) in ranks]
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair with the lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best = min((p for p in pairs if p[0] is not None), default=None)
        if best is None:
            break
        i = best[1]
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_tokenizer(words: list[str] | tuple[str, ...] = BASIC_WORDS, max_length: int = 77) -> CLIPTokenizer:
    vocab, merges = build_vocab(words)
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=max_length)


def build_t5_tokenizer(words: list[str] | tuple[str, ...] = BASIC_WORDS, model_max_length: int = 32):
    """A T5 tokenizer (pad 0, eos 1, unk 2, `</s>` appended, sentencepiece-style `▁word` pieces) over `words`
    plus single characters, built in code: no sentencepiece file to download. Each word is one piece; any other
    word still tokenizes, by characters. It saves as `tokenizer.json`, which stock pipelines reload."""
    from transformers import T5TokenizerFast

    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in dict.fromkeys(w.lower() for w in words):
        scores.setdefault("▁" + word, -1.0)
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        scores.setdefault(char, -5.0)
        scores.setdefault("▁" + char, -4.0)
    return T5TokenizerFast(vocab=list(scores.items()), extra_ids=0, model_max_length=model_max_length)
