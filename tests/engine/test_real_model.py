"""The engine on the real default model (SmolLM2-135M GGUF) against transformers' forward of the same file."""

import asyncio
import os
from itertools import repeat

import pytest
import torch

from parley.config import EngineConfig
from parley.engine.async_engine import AsyncEngine
from parley.models.loader import default_model_path
from parley.types import FinalEvent, GenerationRequest, Grammar, SamplingParams, StoppingCriteria

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time,", "1, 2, 3, 5, 8,"]
NEW_TOKENS = 16


async def generate_all(engine, prompts):
    async def one(prompt):
        request = GenerationRequest(prompt, stopping=StoppingCriteria(max_new_tokens=NEW_TOKENS,
                                                                      min_new_tokens=NEW_TOKENS))
        async for event in engine.generate(request):
            if isinstance(event, FinalEvent):
                return event

    return await asyncio.gather(*(one(p) for p in prompts))


def test_greedy_batch_equals_transformers_on_the_default_model():
    from transformers import AutoModelForCausalLM

    engine = AsyncEngine.load(EngineConfig(dtype="float32", num_threads=1, max_total_tokens=512, max_batch_total_tokens=2048))
    engine.start()
    try:
        finals = asyncio.run(generate_all(engine, PROMPTS))
    finally:
        engine.core.stop()
    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     torch_dtype=torch.float32).eval()
    for prompt, final in zip(PROMPTS, finals):
        ids = engine.tokenizer.encode(prompt)
        out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=engine.tokenizer.eos_token_ids[0])
        expected = out.sequences[0, len(ids):].tolist()
        assert [t.id for t in final.tokens] == expected, prompt
        ref_logprobs = [torch.log_softmax(s[0], -1)[i].item() for s, i in zip(out.scores, expected)]
        assert max(abs(t.logprob - r) for t, r in zip(final.tokens, ref_logprobs)) < 1e-3


ANSWER = Grammar("json", '{"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}')
CHATS = ["Write a poem about the sea.", "Explain what a prime number is.", "Describe a cat.",
         "Tell me a story about a dragon."]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_output_does_not_depend_on_the_batch_or_on_drafts(dtype):
    """A request gets the same tokens alone, in a busy mixed batch (prompt chunks beside decode rows),
    as a sibling of `n`, with a prediction, right or wrong halfway, greedy, sampled or penalized,
    under a grammar, and with --speculate's drafts; in bfloat16 its logprobs are bit-identical too. (float32
    logprobs can differ in their last bits: MKL's batched sgemm in the attention rounds with the
    number of sequences, see README "Determinism".) Found broken before:
    one-row steps rounded the 1536-wide down projection differently from batched steps, and on an
    AMX Xeon oneDNN's tile kernels did for every number of rows."""
    engine = AsyncEngine.load(EngineConfig(dtype=dtype, num_threads=2))
    engine.start()

    async def answers(prompt, n=1, seeds=None, draft=None, grammar=None, **sampling):
        request = GenerationRequest(engine.chat_template.render([{"role": "user", "content": prompt}]),
                                    add_special_tokens=False, n=n, seeds=seeds, draft_text=draft, grammar=grammar,
                                    sampling=SamplingParams(do_sample=seeds is not None, **sampling),
                                    stopping=StoppingCriteria(max_new_tokens=64))
        finals = [e async for e in engine.generate(request) if isinstance(e, FinalEvent)]
        return [(f.text, [(t.id, t.logprob) if dtype == "bfloat16" else t.id for t in f.tokens])
                for f in sorted(finals, key=lambda f: f.index)]

    async def scenario():
        alone = [(await answers(p))[0] for p in CHATS]
        seeded = (await answers(CHATS[0], seeds=[5]))[0]
        batched = await asyncio.gather(*(answers(p) for p in CHATS), answers(CHATS[0], seeds=[5]),
                                       *(answers(p, seeds=[11]) for p in CHATS))
        assert [b[0] for b in batched[: len(CHATS)]] == alone
        assert batched[len(CHATS)] == [seeded]
        assert await answers(CHATS[0], n=3, seeds=[7, 5, 5]) == [(await answers(CHATS[0], seeds=[7]))[0],
                                                                 seeded, seeded]
        for prompt, (text, tokens), seeds in [*zip(CHATS, alone, repeat(None)), (CHATS[0], seeded, [5])]:
            assert await answers(prompt, seeds=seeds, draft=text) == [(text, tokens)]
            wrong_halfway = text[: len(text) // 2] + " banana" + text[len(text) // 2 :]
            assert await answers(prompt, seeds=seeds, draft=wrong_halfway) == [(text, tokens)]
        # penalties and the watermark see each draft position's own history
        penalized = dict(frequency_penalty=0.8, repetition_penalty=1.3, watermark=True)
        text, tokens = (await answers(CHATS[1], seeds=[9], **penalized))[0]
        kept = engine.stats().draft_accepted_tokens
        assert await answers(CHATS[1], seeds=[9], draft=text, **penalized) == [(text, tokens)]
        assert engine.stats().draft_accepted_tokens > kept
        # a grammar masks each draft position as it stands after the drafts before it
        for seeds in (None, [3]):
            text, tokens = (await answers(CHATS[2], seeds=seeds, grammar=ANSWER))[0]
            assert await answers(CHATS[2], seeds=seeds, grammar=ANSWER, draft=text) == [(text, tokens)]
            wrong_halfway = text[: len(text) // 2] + '", "x": 1}'
            assert await answers(CHATS[2], seeds=seeds, grammar=ANSWER, draft=wrong_halfway) == [(text, tokens)]
        engine.core.speculate, drafted = 4, engine.stats().draft_tokens  # as `--speculate 4` (read per request)
        assert [(await answers(p))[0] for p in CHATS] == alone
        assert (await answers(CHATS[0], seeds=[5]))[0] == seeded
        assert engine.stats().draft_tokens > drafted

    try:
        asyncio.run(scenario())
    finally:
        engine.core.stop()


class EveryStepTheOtherCount:
    """In place of engine/threads.py's ThreadTuner, which may change the count at any decode step:
    1 and 2 threads by turns, prompt chunks included."""

    def __init__(self):
        self.steps = 0

    def threads_for(self, shape) -> int:
        self.steps += 1
        return 1 + self.steps % 2

    def observe(self, shape, seconds) -> None:
        pass


def test_output_does_not_depend_on_the_thread_count_of_each_step():
    """A mixed batch (a prompt of two chunks beside chats, greedy and sampled) gets the same tokens
    and logprobs, bit for bit, on two threads, on one, and switching at every step: what lets the
    default bfloat16 engine take fewer threads while other processes hold cores."""
    long_prompt = "Summarize: " + " ".join(f"item {i} is {i * 7 % 13}." for i in range(120))  # ~730 tokens

    def run(tuner, threads: int):
        engine = AsyncEngine.load(EngineConfig(dtype="bfloat16", num_threads=threads))
        assert (engine.core.threads is not None) == (threads > 1)  # the default model's engine adapts them
        engine.core.threads = tuner
        engine.start()
        assert engine.core.call(torch.get_num_threads).result(timeout=60) == engine.stats().compute_threads == threads

        async def one(prompt, seed):
            request = GenerationRequest(prompt, seeds=None if seed is None else [seed],
                                        sampling=SamplingParams(do_sample=seed is not None, temperature=0.9),
                                        stopping=StoppingCriteria(max_new_tokens=24, min_new_tokens=24))
            final = [e async for e in engine.generate(request) if isinstance(e, FinalEvent)][0]
            return final.text, [(t.id, t.logprob) for t in final.tokens]

        async def batch():
            return await asyncio.gather(one(long_prompt, None), one(long_prompt, 3),
                                        *(one(p, seed) for p in CHATS for seed in (None, 5)))
        try:
            return asyncio.run(batch())
        finally:
            engine.core.stop()

    two = run(None, 2)
    assert run(None, 1) == two
    assert run(EveryStepTheOtherCount(), 2) == two
