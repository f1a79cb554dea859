"""The engine on the real default model (SmolLM2-135M GGUF) against transformers' forward of the same file."""

import asyncio
import os

import pytest
import torch

from parley.config import EngineConfig
from parley.engine.async_engine import AsyncEngine
from parley.models.loader import default_model_path
from parley.types import FinalEvent, GenerationRequest, StoppingCriteria

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
