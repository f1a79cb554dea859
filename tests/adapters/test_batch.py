"""One step's LoRA batch: every token gets exactly its own adapter's delta, whatever else is in the batch."""

import pytest
import torch

from parley.adapters.batch import LoRABatcher
from parley.adapters.lora import LoRAWeights, ModuleWeights, module_shapes
from parley.adapters.ops import lora_linear
from parley.adapters.registry import LoRARegistry
from parley.config import ModelConfig
from parley.kernels import lora as lora_kernel

MODEL = ModelConfig("LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=4)
SHAPES = module_shapes(MODEL)  # module -> (in, out)


def random_adapter(name: str, ranks: dict[str, int], seed: int = 0, dtype=torch.float32) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {m: ModuleWeights(torch.randn(MODEL.num_layers, r, SHAPES[m][0], generator=g).to(dtype),
                                torch.randn(MODEL.num_layers, SHAPES[m][1], r, generator=g).to(dtype))
               for m, r in ranks.items()}
    return LoRAWeights(name, name, max(ranks.values()), modules)


def delta(weights: LoRAWeights, module: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    if module not in weights.modules:
        return torch.zeros(SHAPES[module][1])
    m = weights.modules[module]
    return x.float() @ m.a[layer].float().t() @ m.b[layer].float().t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mixed_batch_gives_each_token_its_own_adapter(dtype):
    registry = LoRARegistry(base_name="base")
    a = registry.add(random_adapter("a", {"q_proj": 2, "v_proj": 3, "down_proj": 2}, seed=1, dtype=dtype))
    b = registry.add(random_adapter("b", {"k_proj": 5, "v_proj": 1, "o_proj": 4}, seed=2, dtype=dtype))
    token_loras = [0, a.lora_id, b.lora_id, a.lora_id, 0, b.lora_id]
    batcher = LoRABatcher(registry, MODEL, "cpu", dtype)
    assert batcher.segmented == (dtype == torch.bfloat16 and lora_kernel.available("cpu", dtype))
    batch = batcher.batch(token_loras)
    qkv_out = SHAPES["q_proj"][1] + 2 * SHAPES["k_proj"][1]
    x = torch.randn(len(token_loras), MODEL.hidden_size).to(dtype)
    weight = torch.randn(qkv_out, MODEL.hidden_size).to(dtype)
    for layer in range(MODEL.num_layers):
        lora = batch.layers[layer]
        got = lora_linear(x, weight, None, lora.qkv)
        for row, lora_id in enumerate(token_loras):
            expected = x[row].float() @ weight.float().t()
            if lora_id:
                w = registry.weights(lora_id)
                expected += torch.cat([delta(w, m, layer, x[row]) for m in ("q_proj", "k_proj", "v_proj")])
            tolerance = {} if dtype == torch.float32 else dict(rtol=0.02, atol=0.1)  # bf16 roundings on the way
            torch.testing.assert_close(got[row].float(), expected, **tolerance)
        assert lora.gate_up is None and lora.o is not None and lora.down is not None


def test_a_step_without_adapter_tokens_has_no_lora_batch():
    registry = LoRARegistry(base_name="base")
    registry.add(random_adapter("a", {"o_proj": 2}))
    assert LoRABatcher(registry, MODEL, "cpu").batch([0, 0, 0]) is None


def test_stacks_are_reused_for_the_same_adapter_set_and_freed_after_a_drop():
    registry = LoRARegistry(base_name="base")
    a, b = registry.add(random_adapter("a", {"o_proj": 2})), registry.add(random_adapter("b", {"o_proj": 3}))
    batcher = LoRABatcher(registry, MODEL, "cpu")
    first = batcher.batch([a.lora_id, b.lora_id])
    again = batcher.batch([b.lora_id, 0, a.lora_id])  # same set, other order and tokens
    assert again.layers[0].o.a is first.layers[0].o.a
    assert again.layers[0].o.mask.shape == (3, 5)
    registry.remove("b")
    assert batcher.batch([a.lora_id])
    assert list(batcher._sets) == [(a.lora_id,)]


def test_a_step_of_one_adapter_needs_no_mask():
    registry = LoRARegistry(base_name="base")
    a = registry.add(random_adapter("a", {"o_proj": 3}, seed=3))
    lora = LoRABatcher(registry, MODEL, "cpu").batch([a.lora_id] * 4).layers[1].o
    assert lora.mask is None
    x, weight = torch.randn(4, MODEL.hidden_size), torch.randn(MODEL.hidden_size, MODEL.hidden_size)
    weights = registry.weights(a.lora_id)
    expected = torch.stack([x[i] @ weight.t() + delta(weights, "o_proj", 1, x[i]) for i in range(4)])
    torch.testing.assert_close(lora_linear(x, weight, None, lora), expected)
