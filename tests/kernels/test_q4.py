"""4-bit projections (parley/kernels/_q4.c): the weights GGUF's Q4 blocks hold, in bf16, and a row's
bits whatever rows are beside it, on AMX tiles and on dpbf16 (AMD's path)."""

import pytest
import torch

from parley.kernels import linear as module
from parley.kernels.linear import Q4Rows, Q4Weight, can_run_q4, dequantize_q4, linear, pack_q4, projection_kernel, quantize_q4

pytestmark = pytest.mark.skipif(not can_run_q4(torch.empty(16, 32, dtype=torch.bfloat16)),
                                reason="the 4-bit kernel needs AVX512-BF16")
PATHS = ["amx", "dpbf16"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "amx" and not module._q4.amx():
        pytest.skip("no AMX on this CPU")
    monkeypatch.setattr(module, "_q4_amx", request.param == "amx")
    return request.param


def _rows(out_features: int, in_features: int, seed: int = 0) -> Q4Rows:
    generator = torch.Generator().manual_seed(seed)
    groups = (out_features, in_features // 32)
    return Q4Rows(torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8),
                  (torch.rand(groups, generator=generator) * 0.01 + 0.001).half(),
                  (torch.randn(groups, generator=generator) * 0.05).half())


def test_the_kernel_multiplies_by_the_weights_gguf_dequantizes_to():
    rows = _rows(48, 96)
    weight = pack_q4(rows)
    assert isinstance(weight, Q4Weight) and weight.shape == (48, 96) and weight.data.numel() == 48 * 128 // 32 * 20  # 20 bytes a 32 weights; an odd last group padded
    assert torch.equal(dequantize_q4(weight), rows.dequantize().bfloat16())
    assert projection_kernel(weight).startswith("the 4-bit kernel")  # as the start-up log says
    # each 32 inputs: q low nibbles then high, as in a Q4 block; d q + m rounded once in float32
    assert rows.dequantize()[5, 40].item() == (rows.d[5, 1].float() * rows.q[5, 40].float() + rows.m[5, 1].float()).item()


@pytest.mark.parametrize("out_features, in_features", [(960, 576), (3072, 576), (576, 1536), (48, 64), (80, 96)])
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(path, out_features, in_features):
    # the default model's fused qkv, gate_up, down; a panel of 16 outputs after one of 32; an odd
    # number of groups of inputs, and of blocks of outputs (up to 16 rows run four blocks at once)
    weight, bias = pack_q4(_rows(out_features, in_features)), torch.randn(out_features).bfloat16()
    x = torch.randn(300, 2 * in_features, generator=torch.Generator().manual_seed(1)).bfloat16()[:, :in_features]
    whole = linear(x, weight, bias)  # rows strided, as views of a wider tensor are
    for rows in (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100, 300):
        for start in {0, 300 - rows, (300 - rows) // 2}:
            assert torch.equal(linear(x[start : start + rows], weight, bias), whole[start : start + rows]), (rows, start)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(linear(x[:40], weight, bias), whole[:40])
        assert torch.equal(linear(x[:5], weight, bias), whole[:5])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 5, 20, 40])
@pytest.mark.parametrize("in_features", [1536, 96])
def test_outputs_are_the_sums_of_products_rounded_to_bfloat16(path, rows, in_features):
    weights, x = _rows(80, in_features, seed=2), torch.randn(rows, in_features).bfloat16()
    bias = torch.randn(80).bfloat16()
    exact = x.double() @ weights.dequantize().bfloat16().double().t() + bias.double()
    y = linear(x, pack_q4(weights), bias).double()
    # float32 sums over exact products: well inside one bf16 rounding of the output (2^-8)
    assert ((y - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    assert not torch.equal(linear(x, pack_q4(weights)).double(), y)  # the bias is added


def test_quantize_brings_q4_weights_back_to_their_own_grid():
    rows = _rows(32, 128, seed=3)
    rows.q[:, ::32], rows.q[:, 1::32] = 0, 15  # every block spans its whole range, as Q4_1's do
    again = quantize_q4(rows.dequantize())
    assert torch.equal(again.q, rows.q)
    assert (again.dequantize() - rows.dequantize()).abs().max() <= rows.d.float().max() * 2**-10


def test_an_input_of_another_width_or_type_is_refused():
    weight = pack_q4(_rows(32, 64))
    for x in (torch.randn(2, 32).bfloat16(), torch.randn(2, 64)):
        with pytest.raises(ValueError, match="4-bit linear"):
            linear(x, weight)
    assert linear(torch.randn(0, 64).bfloat16(), weight).shape == (0, 32)
