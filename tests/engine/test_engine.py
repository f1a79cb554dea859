"""The engine end to end on a tiny random model, against a plain transformers forward of the same weights."""

import asyncio

import pytest
import torch
from tiny_model import make_tiny_model, start_tiny_engine

from parley.kernels.linear import QuantWeight, can_pack
from parley.types import (FinalEvent, FinishReason, GenerationError, GenerationRequest, RequestTimeoutError,
                          SamplingParams, StoppingCriteria, TokenEvent, ValidationError)

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a little robot who",
    "1 2 3 4 5",
    "Hello",
    "In the beginning the universe was created. This has made a lot of people very angry and been widely",
    "A",
    "What is the capital of France? The capital of France is",
    "def fibonacci(n):\n    return",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), arch="llama", seed=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = start_tiny_engine(model_dir)
    yield engine
    engine.core.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def greedy(prompt, max_new_tokens=12, **kw) -> GenerationRequest:
    # min_new_tokens bans EOS, as HF's min_new_tokens does on the reference side
    return GenerationRequest(prompt, stopping=StoppingCriteria(max_new_tokens=max_new_tokens,
                                                               min_new_tokens=max_new_tokens), **kw)


async def collect(engine, request):
    finals, tokens = {}, {}
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.setdefault(event.index, []).append(event)
        else:
            finals[event.index] = event
    return finals, tokens


def reference_greedy(reference, prompt_ids, max_new_tokens):
    out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    ids = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[i].item() for s, i in zip(out.scores, ids)]
    return ids, logprobs


async def test_greedy_matches_reference_alone(engine, reference):
    for prompt in PROMPTS[:3]:
        ids = engine.tokenizer.encode(prompt)
        finals, _ = await collect(engine, greedy(prompt))
        ref_ids, ref_logprobs = reference_greedy(reference, ids, 12)
        got = finals[0]
        assert [t.id for t in got.tokens] == ref_ids
        assert max(abs(t.logprob - r) for t, r in zip(got.tokens, ref_logprobs)) < 1e-3
        assert got.finish_reason is FinishReason.LENGTH and got.generated_tokens == 12
        assert got.prompt_tokens == len(ids)


async def test_greedy_matches_reference_in_a_staggered_batch_of_16(engine, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]

    async def late(i, prompt):
        await asyncio.sleep(0.01 * i)  # arrive while the others decode
        return await collect(engine, greedy(prompt, max_new_tokens=10 + i % 5))

    results = await asyncio.gather(*(late(i, p) for i, p in enumerate(prompts)))
    for i, (prompt, (finals, _)) in enumerate(zip(prompts, results)):
        ref_ids, _ = reference_greedy(reference, engine.tokenizer.encode(prompt), 10 + i % 5)
        assert [t.id for t in finals[0].tokens] == ref_ids, prompt
    assert engine.stats().kv_blocks_used == 0


async def test_streamed_text_equals_final_text(engine):
    finals, tokens = await collect(engine, greedy(PROMPTS[1], max_new_tokens=30))
    streamed = "".join(e.text for e in tokens[0]) + finals[0].text_tail
    assert streamed == finals[0].text == engine.tokenizer.decode([t.id for t in finals[0].tokens],
                                                                 skip_special_tokens=True)


async def test_stop_sequence_is_excluded_and_never_streamed(engine):
    finals, _ = await collect(engine, greedy(PROMPTS[1], max_new_tokens=30))
    full = finals[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    request = greedy(PROMPTS[1], max_new_tokens=30)
    request.stopping.stop_sequences = [stop]
    finals, tokens = await collect(engine, request)
    assert finals[0].finish_reason is FinishReason.STOP_SEQUENCE
    assert finals[0].text == full[: full.index(stop)]
    assert stop not in "".join(e.text for e in tokens[0])


async def test_decoder_input_details_match_reference(engine, reference):
    ids = engine.tokenizer.encode(PROMPTS[4])
    finals, _ = await collect(engine, greedy(PROMPTS[4], max_new_tokens=2, decoder_input_details=True))
    prefill = finals[0].prefill
    assert [t.id for t in prefill] == ids and prefill[0].logprob is None
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert max(abs(t.logprob - e) for t, e in zip(prefill[1:], expected.tolist())) < 1e-3


def sampled(prompt, seed, n=1, **params):
    return GenerationRequest(prompt, sampling=SamplingParams(do_sample=True, temperature=1.5, **params),
                             stopping=StoppingCriteria(max_new_tokens=16, min_new_tokens=16), n=n,
                             seeds=seed)


async def test_same_seed_same_tokens_alone_or_in_a_busy_batch(engine):
    alone, _ = await collect(engine, sampled(PROMPTS[0], 1234))
    noise = [collect(engine, sampled(p, i, top_k=5)) for i, p in enumerate(PROMPTS)]
    busy, *_ = await asyncio.gather(collect(engine, sampled(PROMPTS[0], 1234)), *noise)
    assert [t.id for t in alone[0].tokens] == [t.id for t in busy[0][0].tokens]
    assert alone[0].seed == 1234
    other, _ = await collect(engine, sampled(PROMPTS[0], 4321))
    assert [t.id for t in other[0].tokens] != [t.id for t in alone[0].tokens]


async def test_n_sequences_differ_and_report_their_seeds(engine):
    finals, _ = await collect(engine, sampled(PROMPTS[2], 7, n=3))
    assert sorted(finals) == [0, 1, 2]
    texts = {tuple(t.id for t in f.tokens) for f in finals.values()}
    assert len(texts) == 3
    assert [finals[i].seed for i in range(3)] == [7, 8, 9]
    alone, _ = await collect(engine, sampled(PROMPTS[2], 8))
    assert [t.id for t in alone[0].tokens] == [t.id for t in finals[1].tokens]


async def test_seed_list_gives_one_seed_per_sequence(engine):
    request = sampled(PROMPTS[2], None, n=2)
    request.seeds = [11, 99]
    finals, _ = await collect(engine, request)
    assert [finals[0].seed, finals[1].seed] == [11, 99]


async def test_cancelling_the_consumer_frees_every_block(engine):
    request = greedy(PROMPTS[1], max_new_tokens=200)
    request.stopping.min_new_tokens = 200
    stream = engine.generate(request)
    seen = 0
    async for event in stream:
        seen += 1
        if seen == 3:
            assert engine.stats().kv_blocks_used > 0
            break
    await stream.aclose()
    for _ in range(100):
        if engine.stats().kv_blocks_used == 0 and engine.stats().running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0


async def test_preemption_under_a_tiny_block_budget_keeps_outputs_exact(model_dir, engine):
    small = start_tiny_engine(model_dir, max_total_tokens=128, max_batch_total_tokens=128, block_size=16)
    try:
        requests = [greedy(p, max_new_tokens=40) for p in PROMPTS[:4]]
        results = await asyncio.gather(*(collect(small, r) for r in requests))
        expected = await asyncio.gather(*(collect(engine, greedy(p, max_new_tokens=40)) for p in PROMPTS[:4]))
        for (got, _), (want, _) in zip(results, expected):
            assert [t.id for t in got[0].tokens] == [t.id for t in want[0].tokens]
        assert small.stats().kv_blocks_used == 0
    finally:
        small.core.stop()


async def test_drafts_beside_preemptions_keep_outputs_exact(model_dir, engine):
    """Predictions verified while a tiny block budget preempts sequences (their drafts dropped,
    their generators rewound after each verification): greedy, seeded and n=2 requests get the tokens
    the plain engine gives them."""
    small = start_tiny_engine(model_dir, max_total_tokens=128, max_batch_total_tokens=128, block_size=16)
    preempted = []
    preempt = small.core.scheduler._preempt
    small.core.scheduler._preempt = lambda seq, out: (preempted.append(seq), preempt(seq, out))

    def request(i, prediction=None):
        seeded = dict(seeds=[i, i + 1], n=2, sampling=SamplingParams(do_sample=True, temperature=0.9)) if i % 2 else {}
        r = greedy(PROMPTS[i], max_new_tokens=40, draft_text=prediction, **seeded)
        r.stopping.min_new_tokens = 0
        return r

    try:
        expected = await asyncio.gather(*(collect(engine, request(i)) for i in range(4)))
        predictions = [finals[0].text for finals, _ in expected]
        results = await asyncio.gather(*(collect(small, request(i, predictions[i])) for i in range(4)))
        assert preempted and small.stats().draft_accepted_tokens > 0
        for (got, _), (want, _) in zip(results, expected):
            assert {i: [t.id for t in f.tokens] for i, f in got.items()} == {i: [t.id for t in f.tokens] for i, f in want.items()}
        assert small.stats().kv_blocks_used == 0
    finally:
        small.core.stop()


async def test_prompt_logprobs_of_a_prompt_preempted_midway_are_counted_once(model_dir, engine):
    """A prompt preempted between two of its chunks is computed again from its start: its tokens'
    logprobs and alternatives come once each, the same as where nothing was preempted."""
    small = start_tiny_engine(model_dir, max_total_tokens=128, max_batch_total_tokens=128, block_size=16,
                              max_batch_prefill_tokens=16)
    midway = []  # prompts preempted after some of their chunks ran
    preempt = small.core.scheduler._preempt
    small.core.scheduler._preempt = lambda seq, out: (
        midway.append(seq) if 0 < seq.num_computed_tokens < seq.num_prompt_tokens else None, preempt(seq, out))

    def request(prompt):
        r = greedy(prompt, max_new_tokens=40, sampling=SamplingParams(top_n_tokens=2))
        r.decoder_input_details = r.prompt_top_tokens = True
        return r

    prompts = [PROMPTS[4], PROMPTS[1], PROMPTS[6], PROMPTS[4] + " so"]
    try:
        results = await asyncio.gather(*(collect(small, request(p)) for p in prompts))
        expected = await asyncio.gather(*(collect(engine, request(p)) for p in prompts))
    finally:
        small.core.stop()
    assert midway, "no prompt was preempted between its chunks: the test needs another budget"
    for (got, _), (want, _) in zip(results, expected):  # other chunk sizes: the same to float32's rounding
        got, want = got[0], want[0]
        assert [t.id for t in got.prefill] == [t.id for t in want.prefill]
        assert [t.logprob for t in got.prefill[1:]] == pytest.approx([t.logprob for t in want.prefill[1:]], abs=1e-5)
        assert len(got.prefill_top) == len(got.prefill) and all(len(top) == 2 for top in got.prefill_top[1:])
        assert [[t.id for t in top] for top in got.prefill_top] == [[t.id for t in top] for top in want.prefill_top]
        assert [t.logprob for top in got.prefill_top for t in top] == \
            pytest.approx([t.logprob for top in want.prefill_top for t in top], abs=1e-5)


async def test_prompt_logprobs_come_from_the_prefix_cache_where_kept(engine, model_dir):
    """decoder_input_details (OpenAI's echo with logprobs, lm-eval's loglikelihood) over a prefix an
    earlier such request computed: its blocks come from the cache with the logprobs and alternatives
    kept with them, one block short of them, and the details are what a cold engine computes. The
    alternatives are kept for one top_n: a request asking another recomputes the prompt."""
    context = " ".join(PROMPTS[:5])  # ~80 tokens: several blocks of 16

    def request(ending, top_n=2):
        r = greedy(context + ending, max_new_tokens=2, sampling=SamplingParams(top_n_tokens=top_n))
        r.decoder_input_details = r.prompt_top_tokens = True
        return r

    def details(final):
        return ([t.id for t in final.prefill], [t.logprob for t in final.prefill[1:]],
                [[t.id for t in top] for top in final.prefill_top], [t.logprob for top in final.prefill_top for t in top])

    expected = []
    for ending in (" B", " C"):  # each on an engine of its own, whose cache holds nothing of it
        cold = start_tiny_engine(model_dir)
        try:
            expected.append((await collect(cold, request(ending)))[0][0])
        finally:
            cold.core.stop()
        assert expected[-1].cached_tokens == 0
    first = (await collect(engine, request(" A")))[0][0]
    assert first.cached_tokens == 0
    for ending, want in zip((" B", " C"), expected):
        got = (await collect(engine, request(ending)))[0][0]
        assert got.cached_tokens >= 32  # blocks whose kept logprobs reach one block further
        got, want = details(got), details(want)
        assert got[0] == want[0] and got[2] == want[2]  # the tokens and their alternatives
        assert got[1] == pytest.approx(want[1], abs=1e-5) and got[3] == pytest.approx(want[3], abs=1e-5)
    other_top_n = (await collect(engine, request(" D", top_n=3)))[0][0]
    assert other_top_n.cached_tokens == 0
    assert (await collect(engine, request(" E", top_n=0)))[0][0].cached_tokens >= 32


async def test_a_users_burst_does_not_hold_back_another_users_request(model_dir):
    """One sequence at a time: user a's four requests, then user b's, all waiting at once. b's is
    admitted at the next turn (after a's first), not after all of a's; without users, arrival order."""
    one_at_a_time = start_tiny_engine(model_dir, max_batch_size=1)
    try:
        async def finished(name, user):
            await collect(one_at_a_time, greedy(PROMPTS[1], max_new_tokens=30, user=user))
            return name

        async def run(users):  # the names in the order their requests ended (tasks start as created)
            tasks = [asyncio.ensure_future(finished(name, user)) for name, user in users]
            return [await task for task in asyncio.as_completed(tasks)]

        names = [(f"a{i}", "a") for i in range(4)] + [("b0", "b")]
        assert (await run(names))[:2] == ["a0", "b0"]
        assert await run([(name, None) for name, _ in names]) == ["a0", "a1", "a2", "a3", "b0"]
    finally:
        one_at_a_time.core.stop()


async def test_limits_are_validation_errors_naming_the_field(engine):
    cases = [
        (GenerationRequest("x" * 2000), "prompt"),
        (GenerationRequest("hi", stopping=StoppingCriteria(max_new_tokens=1000)), "max_new_tokens"),
        (GenerationRequest("hi", stopping=StoppingCriteria(stop_sequences=list("abcde"))), "stop_sequences"),
        (GenerationRequest("hi", sampling=SamplingParams(do_sample=True, temperature=0)), "temperature"),
        (GenerationRequest("hi", sampling=SamplingParams(top_p=1.5)), "top_p"),
        (GenerationRequest("hi", sampling=SamplingParams(top_n_tokens=50)), "top_n_tokens"),
        (GenerationRequest(""), "prompt"),
    ]
    for request, field in cases:
        with pytest.raises(ValidationError) as info:
            await collect(engine, request)
        assert info.value.field == field


async def test_timeout_ends_the_request_and_frees_it(engine):
    request = greedy(PROMPTS[1], max_new_tokens=200, timeout_s=0.05)
    with pytest.raises(RequestTimeoutError):
        await collect(engine, request)
    await asyncio.sleep(0.05)
    assert engine.stats().kv_blocks_used == 0


async def test_grammar_constrains_every_sequence(engine):
    import json
    import re

    from parley.types import Grammar

    regex = GenerationRequest("Code:", grammar=Grammar("regex", "[0-9]{3}-(yes|no)"),
                              stopping=StoppingCriteria(max_new_tokens=20))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    as_json = GenerationRequest("JSON:", grammar=Grammar("json", json.dumps(schema)), n=3, seeds=5,
                                sampling=SamplingParams(do_sample=True, temperature=2.0),
                                stopping=StoppingCriteria(max_new_tokens=40))
    (regex_final, _), (json_final, _) = await asyncio.gather(collect(engine, regex), collect(engine, as_json))
    assert re.fullmatch("[0-9]{3}-(yes|no)", regex_final[0].text)
    assert regex_final[0].finish_reason is FinishReason.EOS_TOKEN
    for final in json_final.values():
        value = json.loads(final.text)
        assert isinstance(value["ok"], bool) and value["n"] in (1, 2, 3) and set(value) == {"ok", "n"}


async def test_grammar_masks_follow_the_drafts_and_change_no_token(engine, model_dir):
    """Predictions (right, wrong halfway, not JSON at all) and --speculate's drafts under a JSON
    schema and a regex: each draft position is masked as the grammar stands after the drafts before
    it, so greedy and seeded answers are the plain engine's, and right drafts are kept. The schema's
    numbers meet the digit bound (a random model writes digits for as long as it may)."""
    import json

    from parley.types import Grammar

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "x": {"type": "number"},
                                               "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["ok", "x", "tags"], "additionalProperties": False}
    grammars = [Grammar("json", json.dumps(schema)), Grammar("regex", "[0-9]{3}-(yes|no)( [a-z]+){2,6}")]
    speculating = start_tiny_engine(model_dir, speculate=4)

    def request(grammar, seeded, prediction=None):
        sampled = dict(seeds=[4], sampling=SamplingParams(do_sample=True, temperature=1.5)) if seeded else {}
        return GenerationRequest("JSON:", grammar=grammar, draft_text=prediction,
                                 stopping=StoppingCriteria(max_new_tokens=60), **sampled)

    try:
        kept = engine.stats().draft_accepted_tokens
        for grammar in grammars:
            for seeded in (False, True):
                plain, _ = await collect(engine, request(grammar, seeded))
                text, expected = plain[0].text, [t.id for t in plain[0].tokens]
                for prediction in (text, text[: len(text) // 2] + "9]}, 7", "not JSON at all"):
                    finals, _ = await collect(engine, request(grammar, seeded, prediction))
                    assert [t.id for t in finals[0].tokens] == expected, (grammar.kind, seeded, prediction)
                finals, _ = await collect(speculating, request(grammar, seeded))
                assert [t.id for t in finals[0].tokens] == expected, (grammar.kind, seeded)
        assert engine.stats().draft_accepted_tokens > kept
    finally:
        speculating.core.stop()


async def test_an_unsupported_schema_is_a_validation_error(engine):
    import json

    from parley.types import Grammar

    request = GenerationRequest("x", grammar=Grammar("json", json.dumps({"type": "array", "uniqueItems": True})))
    with pytest.raises(ValidationError, match="uniqueItems") as info:
        await collect(engine, request)
    assert info.value.field == "grammar"


async def test_grammar_compiles_and_long_prompts_tokenize_off_the_event_loop(engine, monkeypatch):
    """A large schema compiles for up to a second: on the event loop it would stall every stream."""
    import threading

    from parley.engine import async_engine
    from parley.types import Grammar

    monkeypatch.setattr(async_engine, "LONG_PROMPT_CHARS", 100)  # the tiny model takes 255 tokens at most
    seen = []
    compile_grammar, encode = engine.grammar_compiler.validate, engine.tokenizer.encode
    monkeypatch.setattr(engine.grammar_compiler, "validate",
                        lambda g: seen.append(("grammar", threading.current_thread())) or compile_grammar(g))
    monkeypatch.setattr(engine.tokenizer, "encode",
                        lambda text, **kw: seen.append((len(text), threading.current_thread())) or encode(text, **kw))
    await collect(engine, GenerationRequest("Code:", grammar=Grammar("regex", "[0-9]{3}"),
                                            stopping=StoppingCriteria(max_new_tokens=4)))
    await collect(engine, greedy("a " * 60, max_new_tokens=1))  # 120 characters
    await collect(engine, greedy(PROMPTS[0], max_new_tokens=1))  # short: no thread hop
    loop = threading.current_thread()
    assert [(what, thread is loop) for what, thread in seen] == [
        (len("Code:"), False), ("grammar", False), (120, False), (len(PROMPTS[0]), True)]


async def test_a_correct_prediction_gives_the_same_output_in_fewer_steps(engine):
    plain, _ = await collect(engine, greedy(PROMPTS[0], max_new_tokens=40))  # its text re-tokenizes to the same ids
    expected = [t.id for t in plain[0].tokens]
    text = plain[0].text

    async def steps_for(prediction):
        await asyncio.sleep(0.05)  # let other tests' work drain so the step count is this request's
        before = engine.core.num_steps
        request = greedy(PROMPTS[0], max_new_tokens=40, draft_text=prediction)
        request.stopping.min_new_tokens = 0
        finals, tokens = await collect(engine, request)
        assert [t.id for t in finals[0].tokens][: len(expected)] == expected[: finals[0].generated_tokens]
        assert "".join(e.text for e in tokens[0]) + finals[0].text_tail == finals[0].text
        return engine.core.num_steps - before

    exact = await steps_for(text)
    wrong = await steps_for("something else entirely " * 5)
    half = await steps_for(text[: len(text) // 2] + " unrelated words")
    assert exact < wrong / 3
    assert exact <= half <= wrong


async def test_speculate_drafts_from_the_sequences_own_tokens_and_changes_no_token(engine, model_dir):
    """--speculate: prompt lookup. Greedy and seeded sampled requests get the tokens the engine without
    it gives; greedy runs (which fall into the loops a random model's do) take fewer steps."""
    speculating = start_tiny_engine(model_dir, speculate=4)
    predicted_drafts = engine.stats().draft_tokens  # other tests' predictions
    try:
        steps = {}
        for prompt in PROMPTS:
            for seeded in ({}, dict(seeds=[3], sampling=SamplingParams(do_sample=True, temperature=0.8))):
                answers = []
                for e in (engine, speculating):
                    await asyncio.sleep(0.05)  # let other tests' work drain so the step count is this request's
                    before = e.core.num_steps
                    request = GenerationRequest(prompt, stopping=StoppingCriteria(max_new_tokens=40), **seeded)
                    finals, _ = await collect(e, request)
                    answers.append([t.id for t in finals[0].tokens])
                    steps[e, bool(seeded)] = steps.get((e, bool(seeded)), 0) + e.core.num_steps - before
                assert answers[0] == answers[1], (prompt, seeded)
        stats = speculating.stats()
        assert 0 < stats.draft_accepted_tokens < stats.draft_tokens
        assert steps[speculating, False] < 0.8 * steps[engine, False]
        assert engine.stats().draft_tokens == predicted_drafts  # none without --speculate

        # each draft position has its own row: EOS is banned before min_new_tokens and allowed from there
        eos, favourite = speculating.tokenizer.eos_token_ids[0], 42
        request = GenerationRequest("1 2 3", sampling=SamplingParams(logit_bias={favourite: 60.0, eos: 80.0}),
                                    stopping=StoppingCriteria(max_new_tokens=30, min_new_tokens=10))
        finals, _ = await collect(speculating, request)
        assert [t.id for t in finals[0].tokens] == [favourite] * 10 + [eos]
        assert speculating.stats().draft_accepted_tokens > stats.draft_accepted_tokens
    finally:
        speculating.core.stop()


def test_speculate_takes_at_most_eight_draft_tokens(model_dir):
    with pytest.raises(ValueError, match="speculate must be 0 to 8, not 9"):
        start_tiny_engine(model_dir, speculate=9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
async def test_int4_weights_give_each_request_the_same_tokens_alone_and_batched(model_dir, dtype):
    engine = start_tiny_engine(model_dir, dtype=dtype, quantize="int4")
    try:
        layer = engine.core.runner.model.layers[0]
        weights = [getattr(layer, name) for name in layer.PROJECTIONS]
        if can_pack(torch.empty(16, 32, dtype=getattr(torch, dtype))):
            assert all(isinstance(w, QuantWeight) for w in weights)
        else:  # the 4-bit values, in the model's dtype
            assert not any(isinstance(w, QuantWeight) for w in weights)
        alone = [(await collect(engine, greedy(p)))[0][0].tokens for p in PROMPTS]
        batched = await asyncio.gather(*(collect(engine, greedy(p)) for p in PROMPTS))
        assert [[t.id for t in a] for a in alone] == [[t.id for t in b[0][0].tokens] for b in batched]
        assert len({tuple(t.id for t in a) for a in alone}) > 1
    finally:
        engine.core.stop()


def test_an_unknown_quantization_is_refused(model_dir):
    with pytest.raises(ValueError, match="quantize"):
        start_tiny_engine(model_dir, quantize="int3")


async def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(model_dir, engine):
    """A forward that raises once (injected) ends the requests of that step with a clear error;
    the others finish, new ones are served exactly, and no KV block stays taken."""
    faulty = start_tiny_engine(model_dir)
    model = faulty.core.runner.model
    calls = {"n": 0}

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return type(model).forward(model, *args, **kwargs)

    model.forward = fails_once
    try:
        outcomes = await asyncio.gather(*(collect(faulty, greedy(p)) for p in PROMPTS[:3]), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert failed and all(isinstance(o, GenerationError) and "injected fault" in str(o) for o in failed)
        after = await asyncio.gather(*(collect(faulty, greedy(p)) for p in PROMPTS[:3]))
        expected = await asyncio.gather(*(collect(engine, greedy(p)) for p in PROMPTS[:3]))
        assert [[t.id for t in f[0].tokens] for f, _ in after] == [[t.id for t in f[0].tokens] for f, _ in expected]
        assert faulty.stats().kv_blocks_used == 0 and faulty.stats().running == 0
    finally:
        faulty.core.stop()


async def test_a_fault_that_stops_the_engine_loop_fails_every_request_and_hangs_none(model_dir):
    """A fault outside a step's guards (injected in the scheduler's update) ends the loop: requests in
    flight and new ones get an error at once, and `failure` says why (/health answers 503 with it)."""
    broken = start_tiny_engine(model_dir)

    def update(*args):
        raise RuntimeError("injected loop fault")

    broken.core.scheduler.update = update
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*(collect(broken, greedy(p)) for p in PROMPTS[:3]),
                                                         return_exceptions=True), timeout=60)
        assert all(isinstance(o, GenerationError) and "injected loop fault" in str(o) for o in outcomes), outcomes
        assert "injected loop fault" in broken.failure
        with pytest.raises(GenerationError, match="engine stopped"):
            await asyncio.wait_for(collect(broken, greedy(PROMPTS[0])), timeout=60)
    finally:
        broken.core.stop()
