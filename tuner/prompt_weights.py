"""A1111 prompt syntax: `(word:1.2)`, `(word)`, `[word]`, `\\(` escapes and `BREAK` -> weighted token chunks.

Users write prompts in the syntax of the tools they use every day, so grids read them the same way. compel was
considered and not used: its syntax is its own (`word++`, `(word)1.2`), it has no `BREAK`, and it does not
cover SD3's three encoders; the part that differs per tool is small (this parser and the chunking below),
while the encoders stay the family's own (`tuner.prompt_embeds`).

The rules follow A1111: `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w, brackets nest and multiply,
an unmatched closer is plain text, an unclosed opener weights the rest of the prompt. Token ids go into
chunks of the encoder's window minus BOS/EOS (75 for CLIP); a chunk that fills up breaks after the last comma
of its final 20 tokens, and `BREAK` starts a new chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ROUND = 1.1
"""`(x)`: x weighted by 1.1."""
SQUARE = 1 / 1.1
"""`[x]`: x weighted by 1/1.1."""
COMMA_LOOKBACK = 20
"""A full chunk breaks after a comma found within its last this many tokens (A1111's default)."""
BREAK = "BREAK"
MEAN_FLOOR = 0.01
"""A chunk's mean is restored after weighting only where it is at least this fraction of its mean magnitude."""

_TOKENS = re.compile(
    r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:",
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text and its weight; `text == BREAK` with `weight == 0` marks a chunk break."""

    text: str
    weight: float

    @property
    def is_break(self) -> bool:
        return self.weight == 0 and self.text == BREAK


def parse(prompt: str) -> list[Fragment]:
    """The prompt as fragments with weights (neighbours of equal weight merged)."""
    pieces: list[list] = []  # [text, weight]; mutable so that closing brackets can reweight a range
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKENS.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append([BREAK, None])
                if part:
                    pieces.append([part, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)

    fragments: list[Fragment] = []
    for text, weight in pieces:
        if weight is None:
            fragments.append(Fragment(BREAK, 0.0))
        elif fragments and not fragments[-1].is_break and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("", 1.0)]


def plain_text(prompt: str) -> str:
    """The prompt without its weight syntax (for encoders that take text only)."""
    return " ".join(f.text.strip() for f in parse(prompt) if not f.is_break and f.text.strip())


def is_plain(prompt: str) -> bool:
    """True when the stock pipeline would read the prompt the same way (no syntax, no BREAK)."""
    fragments = parse(prompt)
    return len(fragments) == 1 and fragments[0].weight == 1.0 and fragments[0].text == prompt


@dataclass
class Chunks:
    """Token ids and weights, (chunks, window) each; every chunk is BOS + text + EOS + padding."""

    ids: torch.Tensor
    weights: torch.Tensor


def chunk(
    fragments: Sequence[Fragment],
    encode_text: Callable[[str], list[int]],
    *,
    bos: int | None,
    eos: int,
    pad: int,
    window: int = 77,
    comma: int | None = None,
    max_chunks: int | None = None,
) -> Chunks:
    """Fragments -> chunks of `window` ids for one tokenizer. `encode_text` gives a text's ids without BOS/EOS;
    `max_chunks=1` truncates to one window, as encoders without chunking (T5, which has no BOS) need."""
    head = [] if bos is None else [bos]
    room = window - len(head) - 1
    ids: list[list[int]] = [[]]
    weights: list[list[float]] = [[]]
    for fragment in fragments:
        if fragment.is_break:
            ids.append([])
            weights.append([])
            continue
        for token in encode_text(fragment.text):
            if len(ids[-1]) == room:
                _next_chunk(ids, weights, comma)
            ids[-1].append(token)
            weights[-1].append(fragment.weight)
    if len(ids) > 1 and not ids[-1]:  # a prompt ending in BREAK adds no empty chunk, as in A1111
        ids, weights = ids[:-1], weights[:-1]
    if max_chunks is not None:
        ids, weights = ids[:max_chunks], weights[:max_chunks]
    rows = [[*head, *c, eos] + [pad] * (room - len(c)) for c in ids]
    row_weights = [[1.0] * len(head) + [*w, 1.0] + [1.0] * (room - len(w)) for w in weights]
    return Chunks(torch.tensor(rows, dtype=torch.long), torch.tensor(row_weights, dtype=torch.float32))


def _next_chunk(ids: list[list[int]], weights: list[list[float]], comma: int | None) -> None:
    """Start a new chunk; a comma among the last `COMMA_LOOKBACK` tokens keeps the words after it together."""
    last = ids[-1]
    cut = len(last)
    if comma is not None and comma in last[-COMMA_LOOKBACK:]:
        cut = len(last) - last[::-1].index(comma)
    ids.append(last[cut:])
    weights.append(weights[-1][cut:])
    del last[cut:]
    del weights[-2][cut:]


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's embedding by its weight, then restore each chunk's mean (as A1111 does), so
    emphasis shifts attention between tokens instead of scaling the whole conditioning. Where a chunk's mean is
    near zero relative to its values (the plain LayerNorm output of an untrained encoder) the ratio would blow
    up, so there the weights apply as they are. Weight 1 everywhere returns `hidden` unchanged, bit for bit."""
    if bool((weights == 1).all()):
        return hidden
    weights = weights.to(hidden.device, hidden.dtype)
    scaled = hidden * weights.unsqueeze(-1)
    dims = (-2, -1)
    original, new = hidden.float().mean(dim=dims, keepdim=True), scaled.float().mean(dim=dims, keepdim=True)
    floor = MEAN_FLOOR * hidden.float().abs().mean(dim=dims, keepdim=True)
    stable = (original.abs() > floor) & (new.abs() > floor) & (original * new > 0)
    ratio = torch.where(stable, original / torch.where(stable, new, torch.ones_like(new)), torch.ones_like(new))
    return (scaled.float() * ratio).to(hidden.dtype)
