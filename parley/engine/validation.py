"""Checks a request against the server's limits and turns it into a PreparedRequest.

Every rule names the field it is about by its name in `GenerationRequest` (`prompt`, `max_new_tokens`,
`stop_sequences`, `seeds`...), in the error's `field` and between backticks in its message, so that
the API layer can answer 422 in each dialect's own words (api/dialects.py, `engine_errors_named`).
Each limit on a request is checked here and nowhere else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from parley.engine.request import PreparedRequest
from parley.types import GenerationRequest, ValidationError


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_n: int
    vocab_size: int


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValidationError(message, field)


def tokenize_prompt(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    _check(text != "", "prompt", "Input validation error: `prompt` cannot be empty")
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def prepare(request: GenerationRequest, tokenizer, limits: Limits, grammar_compiler=None) -> PreparedRequest:
    sampling, stopping = request.sampling, request.stopping

    if isinstance(request.prompt, str):
        prompt_ids = tokenize_prompt(tokenizer, request.prompt, request.add_special_tokens)
    else:
        prompt_ids = list(request.prompt)
        _check(all(0 <= i < limits.vocab_size for i in prompt_ids), "prompt",
               f"Input validation error: `prompt` token ids must be in [0, {limits.vocab_size})")
    _check(len(prompt_ids) > 0, "prompt", "Input validation error: `prompt` must have at least one token")
    if request.truncate is not None:
        _check(request.truncate > 0, "truncate", "Input validation error: `truncate` must be strictly positive")
        prompt_ids = prompt_ids[-request.truncate :]
    _check(len(prompt_ids) <= limits.max_input_tokens, "prompt",
           f"Input validation error: `prompt` must have less than {limits.max_input_tokens} tokens. "
           f"Given: {len(prompt_ids)}")

    max_new = stopping.max_new_tokens
    _check(max_new > 0, "max_new_tokens", "Input validation error: `max_new_tokens` must be strictly positive")
    _check(len(prompt_ids) + max_new <= limits.max_total_tokens, "max_new_tokens",
           f"Input validation error: `prompt` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
           f"Given: {len(prompt_ids)} `prompt` tokens and {max_new} `max_new_tokens`")
    _check(0 <= stopping.min_new_tokens <= max_new, "min_new_tokens",
           f"Input validation error: `min_new_tokens` must be between 0 and `max_new_tokens` ({max_new})")
    _check(len(stopping.stop_sequences) <= limits.max_stop_sequences, "stop_sequences",
           f"Input validation error: `stop_sequences` supports up to {limits.max_stop_sequences} stop sequences. "
           f"Given: {len(stopping.stop_sequences)}")
    _check(all(s != "" for s in stopping.stop_sequences), "stop_sequences",
           "Input validation error: `stop_sequences` sequences cannot be empty")
    _check(all(0 <= i < limits.vocab_size for i in stopping.extra_eos_token_ids), "extra_eos_token_ids",
           f"Input validation error: `extra_eos_token_ids` ids must be in [0, {limits.vocab_size})")

    if sampling.do_sample:
        _check(sampling.temperature > 0, "temperature", "Input validation error: `temperature` must be strictly positive")
    _check(0 < sampling.top_p <= 1, "top_p", "Input validation error: `top_p` must be > 0.0 and <= 1.0")
    _check(0 < sampling.typical_p <= 1, "typical_p", "Input validation error: `typical_p` must be > 0.0 and <= 1.0")
    _check(sampling.top_k >= 0, "top_k", "Input validation error: `top_k` must be strictly positive")
    _check(0 <= sampling.min_p <= 1, "min_p", "Input validation error: `min_p` must be between 0.0 and 1.0")
    _check(sampling.repetition_penalty > 0, "repetition_penalty",
           "Input validation error: `repetition_penalty` must be strictly positive")
    _check(-2 <= sampling.frequency_penalty <= 2, "frequency_penalty",
           "Input validation error: `frequency_penalty` must be between -2.0 and 2.0")
    _check(-2 <= sampling.presence_penalty <= 2, "presence_penalty",
           "Input validation error: `presence_penalty` must be between -2.0 and 2.0")
    _check(all(0 <= i < limits.vocab_size for i in sampling.logit_bias), "logit_bias",
           f"Input validation error: `logit_bias` keys must be token ids in [0, {limits.vocab_size})")
    _check(0 <= sampling.top_n_tokens <= limits.max_top_n_tokens, "top_n_tokens",
           f"Input validation error: `top_n_tokens` must be <= {limits.max_top_n_tokens}. Given: {sampling.top_n_tokens}")

    n = request.n
    _check(1 <= n <= limits.max_n, "n", f"Input validation error: `n` must be between 1 and {limits.max_n}. Given: {n}")
    seeds = _seeds(request, n)

    matchers = []
    if request.grammar is not None:
        _check(grammar_compiler is not None, "grammar", "Input validation error: `grammar`: grammars are not supported by this engine")
        try:
            grammar_compiler.validate(request.grammar)
            matchers = [grammar_compiler.matcher(request.grammar, max_new) for _ in range(n)]
        except ValueError as exc:
            raise ValidationError(f"Input validation error: `grammar`: {exc}", "grammar") from exc
    draft_ids = tokenizer.encode(request.draft_text, add_special_tokens=False) if request.draft_text else []
    return PreparedRequest(request, prompt_ids, seeds, matchers, draft_ids)


def _seeds(request: GenerationRequest, n: int) -> list[int | None]:
    """One seed per sequence (None: greedy). A list of seeds, even one a greedy request ignores,
    gives one per sequence: a list of any other length is a mistake, not a wish."""
    seeds = request.seeds
    if isinstance(seeds, list):
        _check(len(seeds) == n, "seeds", "Input validation error: a `seeds` list needs one seed per sequence "
               f"(`n` = {n}). Given: {len(seeds)} seeds")
    if not request.sampling.do_sample:
        return [None] * n
    if seeds is None:
        return [random.getrandbits(63) for _ in range(n)]
    _check(all(0 <= s < 2**64 for s in ([seeds] if isinstance(seeds, int) else seeds)), "seeds",
           "Input validation error: `seeds` must be a non-negative 64-bit integer")
    if isinstance(seeds, int):
        return [(seeds + i) % 2**64 for i in range(n)]  # sequence 0 keeps the given seed exactly
    return list(seeds)
