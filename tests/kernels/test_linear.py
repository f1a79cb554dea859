"""The projection op of every layer and adapter: prepacked on CPU in bfloat16, and batch-invariant."""

import pytest
import torch
import torch.nn.functional as F

from parley.adapters.ops import lora_linear
from parley.kernels.linear import _onednn_bf16, linear, linear_then, prepack, quantize_int4


def _weight_and_rows(in_features=1536, out_features=576, rows=64):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) / 30).bfloat16()
    return weight, torch.randn(rows, in_features, generator=generator).bfloat16()


def test_a_row_alone_equals_the_same_row_in_a_batch_in_bfloat16():
    # One row takes oneDNN's gemv path, which sums a long inner dimension in another order than
    # gemm: F.linear rounds a few of these rows differently alone than in the batch.
    weight, x = _weight_and_rows()
    batched = F.linear(x, weight)
    assert any(not torch.equal(F.linear(x[r : r + 1], weight)[0], batched[r]) for r in range(64))
    packed = prepack(weight)
    for r in range(64):
        assert torch.equal(linear(x[r : r + 1], weight)[0], batched[r])
        assert torch.equal(linear(x[r : r + 1], packed)[0], batched[r])
        assert torch.equal(lora_linear(x[r : r + 1], packed, None, None)[0], batched[r])


@pytest.mark.skipif(not _onednn_bf16(), reason="no bfloat16 oneDNN kernels on this CPU")
def test_prepacked_bfloat16_weights_give_the_same_numbers_as_f_linear():
    weight, x = _weight_and_rows(576, 960, 40)
    bias = torch.randn(960).bfloat16()
    packed = prepack(weight)
    assert packed.is_mkldnn
    assert torch.equal(linear(x, packed, bias), F.linear(x, weight, bias))


def test_float32_weights_stay_plain():
    weight = torch.randn(8, 4)
    assert prepack(weight) is weight
    x = torch.randn(3, 4)
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_linear_then_fuses_add_and_a_mask_on_plain_and_packed_weights():
    weight, x = _weight_and_rows(576, 96, 8)
    other = torch.randn(8, 96).bfloat16()
    mask = (torch.rand(8, 96) > 0.5).bfloat16()  # what LoRA multiplies by: 0 or 1, exact either way
    for w in (weight, prepack(weight)):
        assert torch.equal(linear_then(x, w, "add", other), torch.addmm(other, x, weight.t()))
        assert torch.equal(linear_then(x, w, "mul", mask), F.linear(x, weight) * mask)
    x32, w32, other32 = x.float(), weight.float(), other.float()
    assert torch.allclose(linear_then(x32, w32, "add", other32), other32 + x32 @ w32.t(), atol=1e-5)


def _q4_1_weight(out_features=96, in_features=128, seed=0):
    """Weights as GGUF Q4_1 stores them: per block of 32, d * q + m with q in 0..15, both ends used."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), generator=generator)
    q[:, ::32], q[:, 1::32] = 0, 15
    blocks = (out_features, in_features // 32)
    d = (torch.rand(blocks, generator=generator) * 0.01 + 0.001).repeat_interleave(32, 1)
    m = (torch.randn(blocks, generator=generator) * 0.01).repeat_interleave(32, 1)
    return (d * q + m).bfloat16(), d


def test_int4_brings_q4_1_weights_back_to_their_own_grid():
    weight, step = _q4_1_weight()
    quantized = quantize_int4(weight)
    assert quantized.shape == weight.shape and quantized.packed.numel() == weight.numel() // 2
    dequantized = linear(torch.eye(weight.shape[1]).bfloat16(), quantized).t().float()
    # every weight on its own 4-bit value (off by under half a step), but for bf16 roundings
    assert ((dequantized - weight.float()).abs() / step).max() < 0.25


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_rows_are_the_same_alone_as_in_a_batch(dtype):
    weight, _ = _q4_1_weight(seed=1)
    quantized, bias = quantize_int4(weight.to(dtype)), torch.randn(weight.shape[0]).to(dtype)
    x = torch.randn(33, weight.shape[1]).to(dtype)
    batched = linear(x, quantized, bias)
    torch.testing.assert_close(batched.float(), (x.float() @ weight.float().t() + bias.float()), rtol=0.05, atol=0.05)
    for r in range(33):
        assert torch.equal(linear(x[r : r + 1], quantized, bias)[0], batched[r])
