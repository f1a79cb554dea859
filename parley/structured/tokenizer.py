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
    """
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            spec["decoder"] = byte_level[0]
    return json.dumps(spec)
