"""The decoder layers in one kernel call a step (parley/kernels/stack.py) give the bits of the same
kernels called layer by layer from Python, on every step of an engine's mixed batches."""

import asyncio

import pytest
import torch
from tiny_model import make_tiny_model, start_tiny_engine

from parley.kernels import stack as stack_kernel
from parley.kernels.linear import QuantWeight, can_pack
from parley.models.layers import decoder
from parley.types import GenerationRequest, SamplingParams, StoppingCriteria, TokenEvent

pytestmark = pytest.mark.skipif(
    not (stack_kernel.available() and can_pack(torch.empty(16, 32, dtype=torch.bfloat16))),
    reason="the layer-stack kernel runs on CPUs with AVX512-BF16")

PROMPTS = ["The quick brown fox", "Once upon a time there was a little robot who " * 6, "1 2 3 4 5", "Hello",
           "What is the capital of France? The capital of France is Paris. " * 5]
# head_dim 32: the attention kernel's smallest; group 2
SHAPES = {"hidden_size": 128, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("qwen2", {}),  # biases on q, k and v
    ("mistral", {"sliding_window": 24}),  # every layer sliding
])
def test_one_call_a_step_gives_the_bits_of_the_layer_by_layer_path(tmp_path, monkeypatch, arch, overrides):
    model_dir = make_tiny_model(str(tmp_path), arch=arch, **SHAPES, **overrides)
    engine = start_tiny_engine(model_dir, dtype="bfloat16", quantize="int4", num_threads=2, max_batch_prefill_tokens=40)
    model = engine.core.runner.model
    assert all(isinstance(w, QuantWeight) for layer in model.layers for w in layer.projection_weights())
    forward, steps = type(model).forward, []

    def both_paths(self, *args):
        one_call = forward(self, *args)
        monkeypatch.setattr(decoder, "STACK_CALL", False)
        try:
            layer_by_layer = forward(self, *args)  # writes the same keys and values again
        finally:
            monkeypatch.setattr(decoder, "STACK_CALL", True)
        steps.append((self._stack[1] is not None, torch.equal(one_call, layer_by_layer), args[0].shape[0]))
        return one_call

    monkeypatch.setattr(type(model), "forward", both_paths)

    async def generate(prompt: str, seed: int) -> list[int]:
        request = GenerationRequest(prompt, SamplingParams(do_sample=True, temperature=0.8),
                                    StoppingCriteria(max_new_tokens=12, min_new_tokens=12), seeds=seed)
        return [e.token.id async for e in engine.generate(request) if isinstance(e, TokenEvent)]

    async def main():
        return await asyncio.gather(*(generate(p, i) for i, p in enumerate(PROMPTS)))

    try:
        outputs = asyncio.run(main())
    finally:
        engine.core.stop()
    assert all(len(tokens) == 12 for tokens in outputs)
    assert steps and all(ran for ran, _, _ in steps)  # every step took the one call
    assert all(equal for _, equal, _ in steps), [s for s in steps if not s[1]]
    assert max(rows for _, _, rows in steps) > len(PROMPTS)  # prefill chunks beside decode rows

