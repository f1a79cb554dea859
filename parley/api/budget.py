"""The default output length when a request names none: whatever the context leaves (TGI's rule)."""

from __future__ import annotations

from parley.types import EngineInfo


def room_for_output(info: EngineInfo, prompt_tokens: int, truncate: int | None = None) -> int:
    """max_total_tokens minus the prompt's tokens (the last `truncate` of them), at least 1 (a
    prompt that leaves no room is then refused by the engine's input-length check, with its message)."""
    if truncate:
        prompt_tokens = min(prompt_tokens, truncate)
    return max(1, info.max_total_tokens - prompt_tokens)
