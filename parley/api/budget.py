"""The default output length when a request names none: whatever the context leaves (TGI's rule)."""

from __future__ import annotations


def room_for_output(engine, prompt: str, *, add_special_tokens: bool, truncate: int | None = None) -> int:
    """max_total_tokens minus the prompt's tokens, at least 1 (a prompt that leaves no room is
    then refused by the engine's input-length check, with its message)."""
    n = len(engine.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    if truncate:
        n = min(n, truncate)
    return max(1, engine.config.max_total_tokens - n)
