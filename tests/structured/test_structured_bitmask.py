import time

import pytest
import torch

from parley.structured import (
    GrammarCompiler,
    allocate_bitmask,
    bitmask_to_bool,
    fill_bitmasks,
)
from parley.types import Grammar

DIGITS = Grammar("regex", "[0-9]{2}")


def allowed_ids(matcher, vocab_size):
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return set(bitmask_to_bool(bitmask, vocab_size)[0].nonzero().flatten().tolist())


def test_bitmask_to_bool_reads_bit_t_of_word_t_div_32():
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5
    bitmask[0, 2] = -(1 << 31)  # bit 31 of word 2: token 95
    bitmask[1, 1] = 1
    allowed = bitmask_to_bool(bitmask, 90)
    assert allowed.shape == (2, 90)
    assert allowed[0].nonzero().flatten().tolist() == [5]  # token 95 is past vocab_size
    assert allowed[1].nonzero().flatten().tolist() == [32]


def test_allocate_bitmask_allows_everything():
    bitmask = allocate_bitmask(3, 100)
    assert bitmask.shape == (3, 4) and bitmask.dtype == torch.int32
    assert bitmask_to_bool(bitmask, 100).all()


def test_fill_bitmasks_matches_single_rows_and_leaves_unconstrained_rows_allowed(compiler, backend_tokenizer):
    vocab_size = compiler.vocab_size
    json_matcher = compiler.matcher(Grammar("json_object"))
    digits = compiler.matcher(DIGITS)
    assert digits.accept(backend_tokenizer.token_to_id("7"))
    bitmask = allocate_bitmask(3, vocab_size)
    fill_bitmasks([json_matcher, None, digits], bitmask)
    allowed = bitmask_to_bool(bitmask, vocab_size)
    assert set(allowed[0].nonzero().flatten().tolist()) == allowed_ids(json_matcher, vocab_size)
    assert allowed[1].all()
    digit_ids = {backend_tokenizer.token_to_id(str(d)) for d in range(10)}
    assert set(allowed[2].nonzero().flatten().tolist()) == digit_ids


def test_terminated_matcher_allows_only_eos(compiler, backend_tokenizer, eos_ids):
    matcher = compiler.matcher(DIGITS)
    for digit in "42":
        assert not matcher.is_terminated()
        assert matcher.accept(backend_tokenizer.token_to_id(digit))
    assert matcher.is_terminated()
    assert allowed_ids(matcher, compiler.vocab_size) == set(eos_ids)
    assert matcher.accept(eos_ids[0])


def test_disallowed_token_is_refused_and_reported(compiler, backend_tokenizer):
    matcher = compiler.matcher(DIGITS)
    assert not matcher.accept(backend_tokenizer.token_to_id("x"))
    assert matcher.error
    assert matcher.is_terminated()


def test_rollback_restores_the_earlier_mask(compiler, backend_tokenizer):
    matcher = compiler.matcher(Grammar("json", '{"type": "array", "items": {"type": "integer"}}'))
    tokens = backend_tokenizer.encode("[1, 2", add_special_tokens=False).ids
    assert matcher.accept(tokens[0])
    before = allowed_ids(matcher, compiler.vocab_size)
    for token in tokens[1:]:
        assert matcher.accept(token)
    matcher.rollback(len(tokens) - 1)
    assert allowed_ids(matcher, compiler.vocab_size) == before
    with pytest.raises(ValueError):
        matcher.rollback(5)


def test_logits_wider_than_the_tokenizer_are_never_allowed(backend_tokenizer, eos_ids):
    padded = backend_tokenizer.get_vocab_size() + 64
    compiler = GrammarCompiler(backend_tokenizer, eos_ids, padded)
    allowed = allowed_ids(compiler.matcher(Grammar("regex", "(?s:.+)")), padded)
    assert max(allowed) < backend_tokenizer.get_vocab_size()


def test_report_batch_timings(compiler, backend_tokenizer):
    """Prints (does not assert) one decode step's grammar work for a batch of 32 sequences."""
    vocab_size, batch, steps = compiler.vocab_size, 32, 20
    grammar = Grammar(
        "json",
        '{"type": "object", "properties": {"name": {"type": "string"}, '
        '"tags": {"type": "array", "items": {"type": "string"}}}}',
    )
    text = (
        '{"name": "Ada Lovelace", "tags": ["math", "poetry", "engines", "notes", "letters", "Babbage"]}'
    )
    tokens = backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert len(tokens) > 10 + steps
    matchers = [compiler.matcher(grammar) for _ in range(batch)]
    positions = [row % 10 for row in range(batch)]  # rows at different places in the text
    for matcher, position in zip(matchers, positions):
        for token in tokens[:position]:
            assert matcher.accept(token)
    bitmask = allocate_bitmask(batch, vocab_size)
    timings = {"fill_bitmasks": [], "bitmask_to_bool": []}
    for step in range(steps):
        started = time.perf_counter()
        fill_bitmasks(matchers, bitmask)
        timings["fill_bitmasks"].append(time.perf_counter() - started)
        started = time.perf_counter()
        bitmask_to_bool(bitmask, vocab_size)
        timings["bitmask_to_bool"].append(time.perf_counter() - started)
        for row, matcher in enumerate(matchers):
            assert matcher.accept(tokens[positions[row] + step])
    medians = {name: sorted(values)[steps // 2] * 1e3 for name, values in timings.items()}
    print(
        f"\n[timing] batch of {batch}, median of {steps} steps: "
        + ", ".join(f"{name} {ms:.3f} ms" for name, ms in medians.items())
    )
