"""A Qwen2/Qwen3-style tokenizer built from the project's own word list, so tiny Z-Image pipelines need no download.

Qwen's tokenizer is byte-level BPE (GPT-2's 256-symbol byte alphabet, `Ġ` for a leading space, `Ċ` for a
newline) with `<|endoftext|>` as pad and the chat markers `<|im_start|>` / `<|im_end|>`. Z-Image's pipeline
wraps every prompt in the chat template before tokenizing (`apply_chat_template`), so the template travels with
the tokenizer. Every byte is in the vocabulary, so any text tokenizes; each listed word (bare and with its
leading space) is one token through a chain of merges.
"""

from __future__ import annotations

from tuner.tokenizer import BASIC_WORDS, _apply_merges

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Qwen3's chat layout for user turns and the generation prompt; `enable_thinking=False` adds the empty think
# block Qwen3 writes in that case (Z-Image's pipeline passes `enable_thinking=True`: no block).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def byte_level_vocab(words: list[str] | tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges): the byte alphabet, then one chain of merges per word and per space-prefixed word."""
    from tokenizers import pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in [*words, "user", "assistant"]):
        if not word.isascii() or not word.isalnum():
            continue
        for form in (word, "Ġ" + word):
            # Tokenize with the merges so far, then chain what is left: later merges never change earlier words.
            pieces = _apply_merges(list(form), ranks)
            left = pieces[0]
            for right in pieces[1:]:
                ranks[(left, right)] = len(ranks)
                left += right
                vocab.setdefault(left, len(vocab))
    return vocab, list(ranks)


def build_qwen_tokenizer(words: list[str] | tuple[str, ...] = BASIC_WORDS, model_max_length: int = 32):
    """A `Qwen2Tokenizer` (the class Z-Image and Qwen3 ship) over `words`, with its chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_vocab(words)
    vocab[PAD] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
