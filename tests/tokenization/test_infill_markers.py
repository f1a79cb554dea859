"""Which models fill in the middle, and how their prompts are arranged (tokenization/infill.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tokenizers import AddedToken

from parley.tokenization.infill import SPELLINGS, find_infill
from tiny_model import _train_tokenizer


def vocabulary(*added: str) -> SimpleNamespace:
    """A tokenizer (as find_infill reads one) whose vocabulary adds `added` as special tokens."""
    backend = _train_tokenizer(300)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return SimpleNamespace(backend=backend)


@pytest.mark.parametrize("markers", SPELLINGS)
def test_each_family_spelling_is_found_with_its_ids(markers):
    tokenizer = vocabulary(*markers)
    infill = find_infill(tokenizer)
    ids = [tokenizer.backend.token_to_id(m) for m in markers]
    assert (infill.prefix, infill.suffix, infill.middle) == markers
    assert [infill.prefix_id, infill.suffix_id, infill.middle_id] == ids
    # the markers end a middle too (a model that writes one starts something else), as does <|endoftext|>
    assert set(infill.end_ids) == {*ids, tokenizer.backend.token_to_id("<|endoftext|>")}


def test_the_tokens_that_end_a_middle_are_those_the_vocabulary_has():
    tokenizer = vocabulary(*SPELLINGS[0], "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>")
    ends = {tokenizer.backend.token_to_id(t) for t in ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>")}
    assert ends <= set(find_infill(tokenizer).end_ids)


def test_a_model_without_all_three_markers_does_not_fill_in_the_middle():
    assert find_infill(vocabulary()) is None  # SmolLM2's vocabulary has none
    assert find_infill(vocabulary("<|fim_prefix|>", "<|fim_suffix|>")) is None
    assert find_infill(vocabulary("<fim_prefix>", "<|fim_suffix|>", "<fim_middle>")) is None  # two spellings mixed


def test_the_prompt_goes_prefix_suffix_middle_as_text_and_as_ids():
    tokenizer = vocabulary(*SPELLINGS[1])
    infill = find_infill(tokenizer)
    assert infill.text("def f(", "return x") == "<fim_prefix>def f(<fim_suffix>return x<fim_middle>"
    assert infill.ids([7, 8], [9]) == [infill.prefix_id, 7, 8, infill.suffix_id, 9, infill.middle_id]
    # the tokenizer reads the text's markers as their tokens: both forms are one prompt
    text_ids = tokenizer.backend.encode(infill.text("def f(", "return x"), add_special_tokens=False).ids
    parts = [tokenizer.backend.encode(t, add_special_tokens=False).ids for t in ("def f(", "return x")]
    assert text_ids == infill.ids(*parts)
