"""Weighted, chunked prompts -> the embeddings a family's stock pipeline takes (`prompt_embeds=...`).

Each family's encoders are called the way its stock `encode_prompt` calls them (same layers, same padding),
so a prompt without weights gives the stock embeddings bit for bit; the weighting and chunking come from
`tuner.prompt_weights`. CLIP windows are chunked and concatenated (SD1/SD2/SDXL, SD3's CLIP part); T5 reads
one window of the prompt with the same per-token weights; pooled embeddings come from the first CLIP chunk,
unweighted, as in A1111. FLUX.1 samples without a negative prompt (its guidance is embedded), so it gets none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tuner.errors import TunerError
from tuner.prompt_weights import Chunks, apply_weights, chunk, is_plain, parse


@dataclass
class _Encoded:
    hidden: torch.Tensor  # (1, tokens, width)
    pooled: torch.Tensor | None  # (1, width) from the first chunk


def needs_weighting(pipe: Any, prompt: str | None) -> bool:
    """True when the stock pipeline would read `prompt` differently: weight syntax, BREAK, or longer than one
    CLIP window (the stock pipeline truncates it)."""
    if not prompt:
        return False
    if not is_plain(prompt):
        return True
    tokenizer = pipe.tokenizer
    return len(_text_ids(pipe, tokenizer, prompt)) > tokenizer.model_max_length - 2


def prompt_embeds(pipe: Any, prompt: str, negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Keyword arguments for the family's pipeline call (`prompt_embeds`, `negative_prompt_embeds`, pooled
    ones where the family has them) for one prompt and its negative."""
    from tuner.families import family_of_pipeline
    from tuner.families.transformers import FluxFamily, SD3Family
    from tuner.families.unet import UNetFamily

    family = family_of_pipeline(pipe)
    if isinstance(family, FluxFamily):
        return _flux(pipe, prompt)
    if isinstance(family, SD3Family):
        return _with_negative(pipe, prompt, negative_prompt, _sd3)
    if isinstance(family, UNetFamily):
        return _with_negative(pipe, prompt, negative_prompt, _sdxl if len(family.encoders) == 2 else _sd1)
    raise TunerError(
        f"prompt {prompt!r}: weights, BREAK and prompts longer than the text window are read for SD1/SD2/SDXL, "
        f"SD3 and FLUX.1; this model ({type(pipe).__name__}) takes plain prompts only"
    )


def _with_negative(pipe: Any, prompt: str, negative: str | None, encode) -> dict[str, torch.Tensor]:
    """Both sides with the same number of CLIP chunks (the shorter padded with empty chunks, as A1111 does)."""
    clip = _clip_pairs(pipe)
    pos = [_clip_chunks(pipe, tok, prompt) for tok, _ in clip]
    neg = [_clip_chunks(pipe, tok, negative or "") for tok, _ in clip]
    count = max(c.ids.shape[0] for c in pos + neg)
    pos = [_pad_chunks(pipe, tok, c, count) for (tok, _), c in zip(clip, pos)]
    neg = [_pad_chunks(pipe, tok, c, count) for (tok, _), c in zip(clip, neg)]
    embeds, pooled = encode(pipe, prompt, pos)
    negative_embeds, negative_pooled = encode(pipe, negative or "", neg)
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False) and not negative:
        # SDXL's stock pipeline uses zeros for a missing negative prompt.
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    out = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if pooled is not None:
        out |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return out


def _sd1(pipe: Any, prompt: str, chunks: list[Chunks]) -> tuple[torch.Tensor, None]:
    """SD1/SD2: the encoder's last hidden state (after its final norm), as `encode_prompt` with no clip skip."""
    return encode_clip(pipe.text_encoder, chunks[0], penultimate=False).hidden, None


def _sdxl(pipe: Any, prompt: str, chunks: list[Chunks]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: both encoders' penultimate states side by side; pooled = the second encoder's projection."""
    first = encode_clip(pipe.text_encoder, chunks[0], penultimate=True)
    second = encode_clip(pipe.text_encoder_2, chunks[1], penultimate=True)
    return torch.cat([first.hidden, second.hidden], dim=-1), second.pooled


def _sd3(pipe: Any, prompt: str, chunks: list[Chunks]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3: CLIP-L and CLIP-G penultimate states, zero-padded to T5's width, then T5's sequence; pooled =
    both CLIP projections."""
    first = encode_clip(pipe.text_encoder, chunks[0], penultimate=True)
    second = encode_clip(pipe.text_encoder_2, chunks[1], penultimate=True)
    clip = torch.cat([first.hidden, second.hidden], dim=-1)
    t5 = _t5(pipe, prompt, getattr(pipe, "text_encoder_3", None), getattr(pipe, "tokenizer_3", None))
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([first.pooled, second.pooled], dim=-1)


def _flux(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    """FLUX.1: T5's weighted sequence; pooled = CLIP-L's pooled output of the first chunk."""
    chunks = _clip_chunks(pipe, pipe.tokenizer, prompt)
    out = pipe.text_encoder(chunks.ids[:1].to(pipe.text_encoder.device), output_hidden_states=False)
    pooled = out.pooler_output.to(pipe.text_encoder.dtype)
    embeds = _t5(pipe, prompt, pipe.text_encoder_2, pipe.tokenizer_2)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def encode_clip(encoder: Any, chunks: Chunks, penultimate: bool) -> _Encoded:
    """One CLIP encoder over weighted chunks: (1, chunks x window, width) and the first chunk's pooled output."""
    out = encoder(chunks.ids.to(encoder.device), output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out[0]
    hidden = apply_weights(hidden, chunks.weights).to(encoder.dtype)
    pooled = out[0][:1] if penultimate else None  # projection models: `text_embeds`
    return _Encoded(hidden.reshape(1, -1, hidden.shape[-1]), pooled)


def _t5(pipe: Any, prompt: str, encoder: Any, tokenizer: Any) -> torch.Tensor:
    """One T5 window (the family's sampling length), weighted per token; zeros where T5 was left out."""
    from tuner.families import call_kwargs

    length = call_kwargs(pipe).get("max_sequence_length", 256)
    if encoder is None:
        width = pipe.transformer.config.joint_attention_dim
        return torch.zeros(1, length, width, dtype=pipe.text_encoder.dtype, device=pipe.text_encoder.device)
    chunks = chunk(
        parse(prompt),
        lambda text: _text_ids(pipe, tokenizer, text),
        bos=None,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        window=length,
        max_chunks=1,
    )
    hidden = encoder(chunks.ids.to(encoder.device))[0]
    return apply_weights(hidden, chunks.weights).to(encoder.dtype)


def _clip_pairs(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    second = getattr(pipe, "text_encoder_2", None)
    if second is not None and "CLIP" in type(second).__name__:  # FLUX.1's second encoder is T5
        pairs.append((pipe.tokenizer_2, second))
    return pairs


def _clip_chunks(pipe: Any, tokenizer: Any, prompt: str) -> Chunks:
    comma = tokenizer(",", add_special_tokens=False).input_ids
    return chunk(
        parse(prompt),
        lambda text: _text_ids(pipe, tokenizer, text),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        window=tokenizer.model_max_length,
        comma=comma[0] if len(comma) == 1 and comma[0] != tokenizer.unk_token_id else None,
    )


def _pad_chunks(pipe: Any, tokenizer: Any, chunks: Chunks, count: int) -> Chunks:
    missing = count - chunks.ids.shape[0]
    if missing == 0:
        return chunks
    empty = _clip_chunks(pipe, tokenizer, "")
    return Chunks(
        torch.cat([chunks.ids, empty.ids.repeat(missing, 1)]),
        torch.cat([chunks.weights, empty.weights.repeat(missing, 1)]),
    )


def _text_ids(pipe: Any, tokenizer: Any, text: str) -> list[int]:
    """A text's token ids without special tokens; textual-inversion tokens expand as the pipeline expands them."""
    if hasattr(pipe, "maybe_convert_prompt"):
        text = pipe.maybe_convert_prompt(text, tokenizer)
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
