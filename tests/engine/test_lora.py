"""LoRA adapters in the engine: outputs equal peft's merged model, mixed batches, load/unload under traffic."""

import asyncio

import pytest
import torch
from tiny_lora import make_lora_adapter, merged_model
from tiny_model import make_tiny_model, start_tiny_engine

from parley.adapters.lora import AdapterError
from parley.config import EngineConfig
from parley.engine.async_engine import AsyncEngine
from parley.types import FinalEvent, GenerationRequest, NotFoundError, StoppingCriteria

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a little robot who",
    "What is the capital of France? The capital of France is",
    "def fibonacci(n):\n    return",
]
ADAPTERS = {  # name -> make_lora_adapter options
    "all": dict(r=4, alpha=8, seed=1),
    "attn_rs": dict(r=8, alpha=4, targets=("q_proj", "v_proj", "o_proj"), use_rslora=True, seed=2),
    "mlp": dict(r=2, alpha=6, targets=("gate_proj", "up_proj", "down_proj"), rank_pattern={"down_proj": 6},
                alpha_pattern={"gate_proj": 3}, seed=3),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), arch="llama", seed=0)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora_adapter(model_dir, root / name, **options) for name, options in ADAPTERS.items()}


@pytest.fixture(scope="module")
def engine(model_dir, adapter_dirs):
    engine = start_tiny_engine(model_dir, lora_adapters=tuple(adapter_dirs.items()))
    yield engine
    engine.core.stop()


def greedy(prompt, adapter=None, max_new_tokens=12) -> GenerationRequest:
    return GenerationRequest(prompt, adapter_id=adapter, stopping=StoppingCriteria(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens))


async def tokens(engine, request) -> list[int]:
    async for event in engine.generate(request):
        if isinstance(event, FinalEvent):
            assert event.generated_tokens == request.stopping.max_new_tokens
            return [t.id for t in event.tokens]


def reference_tokens(model, prompt_ids, max_new_tokens=12) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("name", list(ADAPTERS))
async def test_greedy_output_equals_peft_merged_model(engine, model_dir, adapter_dirs, name):
    reference = merged_model(model_dir, adapter_dirs[name])
    base = await tokens(engine, greedy(PROMPTS[0]))
    for prompt in PROMPTS[:2]:
        got = await tokens(engine, greedy(prompt, name))
        assert got == reference_tokens(reference, engine.tokenizer.encode(prompt)), prompt
    assert await tokens(engine, greedy(PROMPTS[0], name)) != base  # the adapter matters


async def test_an_adapter_on_qwen2_with_its_qkv_biases_equals_peft_merged_model(tmp_path):
    model_dir = make_tiny_model(str(tmp_path / "qwen2"), arch="qwen2", seed=4)
    adapter = make_lora_adapter(model_dir, tmp_path / "adapter", r=4, alpha=8, seed=5)
    engine = start_tiny_engine(model_dir, lora_adapters=(("a", adapter),))
    try:
        reference = merged_model(model_dir, adapter)
        for prompt in PROMPTS[:2]:
            got = await tokens(engine, greedy(prompt, "a"))
            assert got == reference_tokens(reference, engine.tokenizer.encode(prompt)), prompt
    finally:
        engine.core.stop()


async def check_mixed_batch_equals_alone(engine) -> None:
    cases = [(p, a) for p in PROMPTS for a in (None, "all", "attn_rs", "mlp")]
    alone = [await tokens(engine, greedy(p, a, max_new_tokens=16)) for p, a in cases]

    async def late(i, prompt, adapter):
        await asyncio.sleep(0.005 * i)  # arrive while the others decode: prefills mix with decodes
        return await tokens(engine, greedy(prompt, adapter, max_new_tokens=16))

    mixed = await asyncio.gather(*(late(i, p, a) for i, (p, a) in enumerate(cases)))
    assert mixed == alone
    assert len({tuple(t) for t, (p, _) in zip(alone, cases) if p == PROMPTS[0]}) == 4
    assert engine.stats().kv_blocks_used == 0


async def test_a_batch_mixing_base_and_adapters_gives_each_request_its_own_output(engine):
    await check_mixed_batch_equals_alone(engine)


@pytest.mark.parametrize(("segmented", "quantize"), [(True, None), (False, None), (True, "int4")],
                         ids=["kernel", "stacked", "kernel-on-int4"])
async def test_the_same_in_bfloat16(model_dir, adapter_dirs, segmented, quantize):
    """bf16 runs LoRA in the CPU kernel (parley/kernels/_lora.c) where the CPU has AVX512-BF16, else
    on adapter stacks prepacked for oneDNN, with the token mask and B's add fused; either adds its
    deltas to int4 base projections as well."""
    engine = start_tiny_engine(model_dir, dtype="bfloat16", lora_adapters=tuple(adapter_dirs.items()),
                               quantize=quantize)
    try:
        batcher = engine.core.runner.lora
        if segmented and not batcher.segmented:
            pytest.skip("no LoRA kernel on this CPU")
        if not segmented and not engine.core.runner.model.layers[0].qkv_weight.is_mkldnn:
            pytest.skip("no bfloat16 oneDNN kernels on this CPU")
        batcher.segmented = segmented  # before any step uses an adapter
        await check_mixed_batch_equals_alone(engine)
    finally:
        engine.core.stop()


async def test_adapters_never_share_prefix_cache_blocks(engine, model_dir, adapter_dirs):
    prompt = " ".join(PROMPTS) * 2  # several full KV blocks
    await tokens(engine, greedy(prompt))  # the base model's blocks are now cached
    reference = merged_model(model_dir, adapter_dirs["all"])
    assert await tokens(engine, greedy(prompt, "all")) == reference_tokens(reference, engine.tokenizer.encode(prompt))


async def test_a_reloaded_adapter_never_reuses_the_blocks_of_its_former_self(engine, adapter_dirs):
    prompt = " ".join(PROMPTS) * 2
    mlp = await tokens(engine, greedy(prompt, "mlp"))
    await engine.load_adapter("x", adapter_dirs["all"])
    assert await tokens(engine, greedy(prompt, "x")) != mlp  # its blocks are now cached
    await engine.unload_adapter("x")
    await engine.load_adapter("x", adapter_dirs["mlp"])  # the same name, other weights
    assert await tokens(engine, greedy(prompt, "x")) == mlp
    await engine.unload_adapter("x")


async def test_base_model_name_or_empty_selects_the_base_model(engine):
    base = await tokens(engine, greedy(PROMPTS[1]))
    assert await tokens(engine, greedy(PROMPTS[1], "")) == base
    assert await tokens(engine, greedy(PROMPTS[1], engine.model_id)) == base


async def test_unknown_adapter_is_not_found_naming_it(engine):
    with pytest.raises(NotFoundError, match="adapter 'nope' is not loaded"):
        await tokens(engine, greedy(PROMPTS[0], "nope"))


async def test_requests_are_counted_per_adapter(engine):
    before = engine.stats().adapter_requests.get("mlp", 0)
    await asyncio.gather(*(tokens(engine, greedy(p, "mlp", max_new_tokens=2)) for p in PROMPTS[:3]))
    assert engine.stats().adapter_requests["mlp"] == before + 3


async def test_load_errors_are_typed(engine, adapter_dirs, tmp_path):
    with pytest.raises(AdapterError, match="already loaded"):
        await engine.load_adapter("all", adapter_dirs["all"])
    with pytest.raises(AdapterError, match="base model's name"):
        await engine.load_adapter(engine.model_id, adapter_dirs["all"])
    with pytest.raises(AdapterError, match="is not a folder"):
        await engine.load_adapter("new", str(tmp_path / "missing"))
    with pytest.raises(NotFoundError, match="'nope'"):
        await engine.unload_adapter("nope")
    assert not engine.has_adapter("new")


async def test_startup_adapter_beyond_the_maximum_rank_fails_the_load(model_dir, adapter_dirs):
    with pytest.raises(AdapterError, match="rank 8 .* exceeds the maximum LoRA rank 4"):
        AsyncEngine.load(EngineConfig(model_id=model_dir, dtype="float32", num_threads=1, max_total_tokens=256,
                                      max_batch_total_tokens=1024, max_lora_rank=4,
                                      lora_adapters=(("attn_rs", adapter_dirs["attn_rs"]),)))


async def test_load_and_unload_under_traffic_lose_no_request(model_dir, adapter_dirs):
    engine = start_tiny_engine(model_dir, lora_adapters=(("all", adapter_dirs["all"]),))
    try:
        cases = [(p, a) for p in PROMPTS for a in (None, "all")] * 2
        expected = {(p, a): await tokens(engine, greedy(p, a, max_new_tokens=150)) for p, a in set(cases)}
        traffic = [asyncio.create_task(tokens(engine, greedy(p, a, max_new_tokens=150))) for p, a in cases]
        for _ in range(200):  # until the traffic runs
            if engine.core.adapters.loaded["all"].users:
                break
            await asyncio.sleep(0.005)

        await engine.load_adapter("mlp", adapter_dirs["mlp"])
        assert await engine.unload_adapter("all") > 0  # requests still use it: they finish with it
        with pytest.raises(NotFoundError, match="'all'"):
            await tokens(engine, greedy(PROMPTS[0], "all"))
        mlp = await tokens(engine, greedy(PROMPTS[0], "mlp"))
        await engine.unload_adapter("mlp")

        results = await asyncio.wait_for(asyncio.gather(*traffic), timeout=300)
        assert results == [expected[c] for c in cases]
        await asyncio.sleep(0.05)
        assert engine.core.adapters._by_id == {}  # the unloaded weights are gone once unused

        await engine.load_adapter("all", adapter_dirs["mlp"])  # the name again, other weights
        assert await tokens(engine, greedy(PROMPTS[0], "all")) == mlp
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.core.stop()


@pytest.mark.slow
async def test_an_adapter_on_smollm2_equals_peft_merged_model(tmp_path):
    import pathlib

    from transformers import AutoModelForCausalLM

    from parley.models.loader import default_model_path

    gguf = pathlib.Path(default_model_path())
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    adapter = make_lora_adapter(base, tmp_path / "smol", r=8, alpha=16, std=0.02)
    engine = start_tiny_engine(None, max_total_tokens=512, lora_adapters=(("smol", adapter),))
    try:
        prompt = "The capital of France is"
        got = await tokens(engine, greedy(prompt, "smol"))
        assert got != await tokens(engine, greedy(prompt))
        reference = merged_model(base, adapter)
        assert got == reference_tokens(reference, engine.tokenizer.encode(prompt))
    finally:
        engine.core.stop()


async def test_stats_name_the_adapters_of_running_requests_for_a_gateway(engine):
    """What parley_lora_requests_info reports (vllm:lora_requests_info's labels)."""
    request = greedy(PROMPTS[0], "mlp", max_new_tokens=200)
    seen = []
    async for _ in engine.generate(request):
        if not seen:
            seen.append(engine.stats())
    during, after = seen[0], engine.stats()
    assert during.running_adapters == ("mlp",) and during.requests_running == 1 and during.requests_waiting == 0
    assert during.adapters_loaded == len(ADAPTERS) and during.max_adapters_per_batch == engine.config.max_batch_size
    assert after.running_adapters == () and after.requests_running == 0
