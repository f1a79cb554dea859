"""Each family through the whole engine (scheduler, paged cache, chunked prefill, prefix sharing)
gives transformers' greedy tokens and logprobs, alone and in a batch."""

import asyncio

import pytest
import torch
from tiny_model import make_tiny_model, start_tiny_engine

from parley.engine.block_manager import NULL_BLOCK
from parley.types import FinalEvent, GenerationRequest, StoppingCriteria

# One tiny model per family; windows of 16 tokens, which the ~45-token prompts run far past.
FAMILIES = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": 16}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", {"sliding_window": 16}),
    "gemma3": ("gemma3", {"sliding_window": 16}),
    "mixtral": ("mixtral", {}),
    "qwen3-moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {}),
}

SHARED = "The user asked a question and the assistant gave a helpful answer. Once upon a time there was "
PROMPTS = [SHARED + "a little model", SHARED + "a journey of a thousand miles", SHARED + "the weather",
           "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -7 1e9 65536 and the capital of France"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    arch, overrides = FAMILIES[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    # 16-token prefill budget: the prompts are prefilled in chunks, beside other sequences' decodes
    # 8 sequences at most: a split layout's sliding layers get a pool of 8 windows, not the whole cache
    engine = start_tiny_engine(path, max_batch_prefill_tokens=16, block_size=16, max_batch_size=8)
    yield engine, reference
    engine.core.stop()


def greedy(prompt: str) -> GenerationRequest:
    return GenerationRequest(prompt, stopping=StoppingCriteria(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))


async def generate(engine, prompt: str) -> FinalEvent:
    async for event in engine.generate(greedy(prompt)):
        if isinstance(event, FinalEvent):
            return event


def reference_greedy(reference, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from full forwards (no cache of transformers' involved), EOS
    banned as min_new_tokens bans it in the engine (its logprobs are over the tokens left)."""
    ids, logprobs = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            logits = reference(torch.tensor([ids])).logits[0, -1].float()
            logits[reference.config.eos_token_id] = -torch.inf
            step = torch.log_softmax(logits, dim=-1)
            ids.append(int(step.argmax()))
            logprobs.append(step[ids[-1]].item())
    return ids[len(prompt_ids):], logprobs


def assert_matches(final: FinalEvent, expected: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = expected
    assert [t.id for t in final.tokens] == tokens
    assert max(abs(t.logprob - r) for t, r in zip(final.tokens, logprobs)) < 1e-3


async def test_greedy_tokens_and_logprobs_match_alone_and_in_a_batch_sharing_a_prefix(family, monkeypatch):
    engine, reference = family
    blocks = engine.core.scheduler.blocks
    reused = []
    take_prefix = blocks.allocate_cached_prefix

    def counted(seq):
        take_prefix(seq)
        reused.append(seq.num_computed_tokens)

    monkeypatch.setattr(blocks, "allocate_cached_prefix", counted)
    released = []  # blocks a finishing sequence had released as its window moved on
    free = blocks.free_sequence

    def counted_free(seq):
        released.append((seq.block_table + seq.window_table).count(NULL_BLOCK))
        free(seq)

    monkeypatch.setattr(blocks, "free_sequence", counted_free)
    expected = [reference_greedy(reference, engine.tokenizer.encode(p)) for p in PROMPTS]
    assert all(len(engine.tokenizer.encode(p)) > 32 for p in PROMPTS)  # past the windows, in 3+ chunks

    for prompt, want in zip(PROMPTS, expected):  # one at a time; the later ones reuse the shared prefix
        assert_matches(await generate(engine, prompt), want)
    assert max(reused) >= 16, reused

    async def late(i, prompt):
        await asyncio.sleep(0.01 * i)  # arrive while the others prefill or decode
        return await generate(engine, prompt)

    batch = await asyncio.gather(*(late(i, p) for i, p in enumerate(PROMPTS + PROMPTS[::-1])))
    for final, want in zip(batch, expected + expected[::-1]):
        assert_matches(final, want)
    assert engine.stats().kv_blocks_used == 0
    windowed = engine.model_config.sliding_window is not None
    assert (min(released) > 0) == windowed, released  # every sequence ran past its window
