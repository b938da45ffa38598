"""CLIP and T5 tokenizers built from the project's own word list, so tiny and micro models need no download.

CLIP: every word becomes one token through a chain of BPE merges; any other word still tokenizes, letter by
letter, because every character is in the vocabulary in both its inner and word-final (`</w>`) form.
T5: a sentencepiece-style Unigram model (`tokenizer.json`, no `spiece.model`) with one `▁word` piece per word
and every ASCII character as a piece, so nothing maps to `<unk>`.
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
    """A T5 tokenizer over `words` plus single characters, built in code: no sentencepiece file to download.

    Like T5's: pad 0, eos (`</s>`, appended) 1, unk 2, `▁`-prefixed Unigram pieces, no lowercasing (upper-case
    letters are pieces of their own). Each word is one piece; any other word still tokenizes, by characters.
    The pipeline is exactly the one transformers' `T5Tokenizer` builds around a Unigram vocabulary, so the saved
    `tokenizer.json` reloads (stock pipelines included) to the same ids under transformers 4 and 5.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in dict.fromkeys(w.lower() for w in words):
        scores.setdefault("▁" + word, -1.0)
    for char in string.ascii_lowercase + string.digits + string.punctuation + string.ascii_uppercase:
        scores.setdefault(char, -5.0)
        scores.setdefault("▁" + char, -4.0)
    backend = Tokenizer(Unigram(list(scores.items()), unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
