"""The llguidance view of a model's vocabulary."""

from __future__ import annotations

import json

import llguidance
import tokenizers


def build_llg_tokenizer(
    backend: tokenizers.Tokenizer, eos_token_ids: list[int], vocab_size: int
) -> llguidance.LLTokenizer:
    """Wrap `backend` for llguidance; ids past the tokenizer's own vocabulary (padding up to the
    logits width `vocab_size`) become special tokens that no grammar allows."""
    return llguidance.LLTokenizer(
        byte_level_decoder_json(backend), n_vocab=vocab_size, eos_token=list(eos_token_ids)
    )


def byte_level_decoder_json(backend: tokenizers.Tokenizer) -> str:
    """The tokenizer as JSON, its decoder reduced to plain ByteLevel when it contains one.

    llguidance reads token bytes the ByteLevel way only when the decoder *is* ByteLevel; a Sequence
    holding ByteFallback (what transformers builds from GGUF files) makes it read them the
    SentencePiece way, so "Ġ" would stand for itself instead of a space and no JSON could be
    generated. ByteFallback and the "▁" replacement never fire on a byte-level vocabulary.

    Added tokens that are not special (Qwen's `<tool_call>`, `<think>`) become ordinary vocabulary
    entries: llguidance takes every added token for a special one, and then its mask allows such a
    token where a grammar writes its text while consuming it fails ("doesn't satisfy the grammar").
    """
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            spec["decoder"] = byte_level[0]
    _plain_added_tokens_into_vocab(spec, byte_level=(spec.get("decoder") or {}).get("type") == "ByteLevel")
    return json.dumps(spec)


def _plain_added_tokens_into_vocab(spec: dict, byte_level: bool) -> None:
    vocab = (spec.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict):
        return
    known = set(vocab.values())
    spell = _byte_level_spelling if byte_level else (lambda text: text.replace(" ", "\u2581"))
    plain = [t for t in spec.get("added_tokens", []) if not t.get("special") and t["id"] not in known]
    for token in plain:
        vocab[spell(token["content"])] = token["id"]
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t not in plain]


def _byte_level_spelling(text: str) -> str:
    """`text` as a byte-level BPE vocabulary spells it (GPT-2's printable stand-in for each byte)."""
    return "".join(_BYTE_TO_CHAR[b] for b in text.encode())


def _byte_to_char() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_TO_CHAR = _byte_to_char()
