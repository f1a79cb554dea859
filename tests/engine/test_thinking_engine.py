"""A thinking model in the engine (types.Reasoning): the budget forces the close of its thinking,
a grammar constrains its answer only, and seeded outputs stay the same alone or batched."""

import asyncio
import dataclasses
import re

import pytest
from test_engine import collect
from tiny_model import make_tiny_model, start_tiny_engine

from parley.types import FinishReason, GenerationRequest, Grammar, SamplingParams, StoppingCriteria

OPEN = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"  # the template left it thinking
FREE = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # it may open a thinking


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = start_tiny_engine(make_tiny_model(str(tmp_path_factory.mktemp("thinker")), seed=3, thinking=True))
    yield engine
    engine.core.stop()


def request(engine, prompt, phase, budget=None, max_new_tokens=16, **kw) -> GenerationRequest:
    rules = dataclasses.replace(engine.info.reasoning, phase=phase, budget=budget)
    return GenerationRequest(prompt, add_special_tokens=False, reasoning=rules,
                             stopping=StoppingCriteria(max_new_tokens=max_new_tokens), **kw)


def ids(final) -> list[int]:
    return [t.id for t in final.tokens]


async def test_the_budget_forces_the_close_and_changes_nothing_before_it(engine):
    rules = engine.info.reasoning
    assert (engine.tokenizer.token_text(rules.start_id), engine.tokenizer.token_text(rules.end_id)) == \
        ("<think>", "</think>")
    free, _ = await collect(engine, request(engine, OPEN, "thinking"))
    budgeted, _ = await collect(engine, request(engine, OPEN, "thinking", budget=6))
    close = rules.close_ids
    assert rules.end_id not in ids(free[0]), "the random model never closes by itself"
    assert ids(budgeted[0])[: 6 - len(close)] == ids(free[0])[: 6 - len(close)]
    assert ids(budgeted[0])[6 - len(close): 6] == close
    assert budgeted[0].reasoning_tokens == 6 and free[0].reasoning_tokens == 16
    assert budgeted[0].generated_tokens == 16 and "</think>" in budgeted[0].text


async def test_a_grammar_waits_for_the_answer(engine):
    grammar = Grammar("regex", "[ab]{3,6}")
    final, _ = await collect(engine, request(engine, OPEN, "thinking", budget=5, grammar=grammar))
    thought, _, answer = final[0].text.partition("</think>")
    assert not re.fullmatch(r"[ab\s]*", thought), "the thinking is free"
    assert re.fullmatch("[ab]{3,6}", answer)
    assert final[0].finish_reason is FinishReason.EOS_TOKEN
    # without the rules, the grammar would have held from the first token
    plain, _ = await collect(engine, GenerationRequest(OPEN, add_special_tokens=False, grammar=grammar))
    assert re.fullmatch("[ab]{3,6}", plain[0].text)


async def test_a_free_first_token_may_open_a_thinking_past_the_grammar_unless_the_budget_is_zero(engine):
    start = engine.info.reasoning.start_id
    bias = SamplingParams(logit_bias={start: 100.0})  # make the model want to think
    grammar = Grammar("regex", "[ab]{3,6}")
    final, _ = await collect(engine, request(engine, FREE, "maybe", budget=4, grammar=grammar, sampling=bias))
    assert ids(final[0])[0] == start
    assert re.fullmatch("[ab]{3,6}", final[0].text.partition("</think>")[2])
    none, _ = await collect(engine, request(engine, FREE, "maybe", budget=0, grammar=grammar, sampling=bias))
    assert start not in ids(none[0]) and re.fullmatch("[ab]{3,6}", none[0].text)
    assert none[0].reasoning_tokens == 0


async def test_the_answer_cap_counts_only_the_answer(engine):
    rules = dataclasses.replace(engine.info.reasoning, phase="thinking", budget=5, max_answer_tokens=3)
    final, _ = await collect(engine, GenerationRequest(OPEN, add_special_tokens=False, reasoning=rules,
                                                       stopping=StoppingCriteria(max_new_tokens=50)))
    assert final[0].finish_reason is FinishReason.LENGTH
    assert (final[0].reasoning_tokens, final[0].generated_tokens) == (5, 8)


async def test_same_seed_same_thinking_alone_or_batched(engine):
    def sampled(seed, budget):
        return request(engine, OPEN, "thinking", budget=budget, seeds=[seed],
                       sampling=SamplingParams(do_sample=True, temperature=1.3))

    alone, _ = await collect(engine, sampled(21, 7))
    busy, *_ = await asyncio.gather(collect(engine, sampled(21, 7)),
                                    *[collect(engine, sampled(s, b)) for s, b in ((1, None), (2, 3), (3, 9))])
    assert ids(alone[0]) == ids(busy[0][0])
    assert ids(alone[0])[5:7] == engine.info.reasoning.close_ids
