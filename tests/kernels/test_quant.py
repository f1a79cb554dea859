"""4- and 8-bit matrices (parley/kernels/_quant.c): the weights GGUF's Q4_0/Q4_1/Q8_0 blocks hold, and
a row's bits whatever rows are beside it, on AMX tiles and on the path without them (AMD's: times
8-bit activations on VNNI)."""

import pytest
import torch

from parley.kernels import linear as module
from parley.kernels.linear import (Q4Rows, Q8Rows, QuantRows, QuantWeight, can_pack, dequantize_packed, linear, pack,
                                   projection_kernel, quantize_q4, unpack)

pytestmark = pytest.mark.skipif(not can_pack(torch.empty(16, 32, dtype=torch.bfloat16)),
                                reason="the quantized kernel needs AVX512-BF16")
PATHS = ["amx", "avx512"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "amx" and not module._quant.amx():
        pytest.skip("no AMX on this CPU")
    monkeypatch.setattr(module, "_quant_amx", request.param == "amx")
    return request.param


def _rows(out_features: int, in_features: int, seed: int = 0, bits: int = 4) -> QuantRows:
    generator = torch.Generator().manual_seed(seed)
    groups = (out_features, in_features // 32)
    d = (torch.rand(groups, generator=generator) * 0.01 + 0.001).half()
    if bits == 8:
        return Q8Rows(torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8), d)
    return Q4Rows(torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8), d,
                  (torch.randn(groups, generator=generator) * 0.05).half())


@pytest.mark.parametrize("bits", [4, 8])
def test_the_kernel_multiplies_by_the_weights_gguf_dequantizes_to(path, bits):
    rows = _rows(48, 96, bits=bits)
    weight = pack(rows)  # laid out for this process's path
    # per 32 weights 20 bytes (Q4_1's) or 34 (Q8_0's); an odd last group padded
    assert isinstance(weight, QuantWeight) and weight.shape == (48, 96) and weight.bits == bits
    assert weight.amx == (path == "amx")
    assert weight.data.numel() == 48 * 128 // 32 * (20 if bits == 4 else 34)
    assert torch.equal(dequantize_packed(weight), rows.dequantize().bfloat16())
    assert projection_kernel(weight).startswith(f"the {bits}-bit kernel")  # as the start-up log says
    # each 32 inputs: d q (+ m) rounded once in float32
    m = rows.m[5, 1].float() if bits == 4 else 0
    assert rows.dequantize()[5, 40].item() == (rows.d[5, 1].float() * rows.q[5, 40].float() + m).item()


@pytest.mark.parametrize("out_features, in_features, bits", [(960, 576, 4), (3072, 576, 4), (576, 1536, 4), (48, 64, 4),
                                                             (80, 96, 4), (80, 96, 8), (1024, 576, 8)])
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(path, out_features, in_features, bits):
    # the default model's fused qkv, gate_up, down; a panel of 16 outputs after one of 32; an odd
    # number of groups of inputs, and of blocks of outputs (up to 16 rows run four blocks at once)
    weight, bias = pack(_rows(out_features, in_features, bits=bits)), torch.randn(out_features).bfloat16()
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


def _eight_bit(x: torch.Tensor) -> torch.Tensor:
    """x as the VNNI path multiplies it: each 32 inputs of a row on 255 even steps, d * round(x / d) for
    d = max |x| / 127 (x times 127 / max |x|, rounded to nearest even, in float32)."""
    groups = x.float().view(x.shape[0], -1, 32)
    most = groups.abs().amax(-1, keepdim=True)
    scale = torch.where(most > 0, torch.full_like(most, 127.0).div(most), torch.zeros_like(most))
    return (torch.round(groups * scale).double() * (most / 127).double()).view(x.shape)


@pytest.mark.parametrize("rows", [1, 5, 20, 40])
@pytest.mark.parametrize("in_features", [1536, 96])
@pytest.mark.parametrize("bits", [4, 8])
def test_outputs_are_the_sums_of_products_rounded_to_bfloat16(path, rows, in_features, bits):
    weights, x = _rows(80, in_features, seed=2, bits=bits), torch.randn(rows, in_features).bfloat16()
    bias = torch.randn(80).bfloat16()
    if path == "avx512":  # GGUF's weights as they are, times x in 8 bits
        exact = _eight_bit(x) @ weights.dequantize().double().t() + bias.double()
    else:
        exact = x.double() @ weights.dequantize().bfloat16().double().t() + bias.double()
    y = linear(x, pack(weights), bias).double()
    # float32 sums over exact products: well inside one bf16 rounding of the output (2^-8)
    assert ((y - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    assert not torch.equal(linear(x, pack(weights)).double(), y)  # the bias is added


@pytest.mark.parametrize("bits", [4, 8])
def test_without_amx_weights_multiply_activations_rounded_to_8_bits_per_32_inputs(monkeypatch, bits):
    monkeypatch.setattr(module, "_quant_amx", False)  # AMX tiles keep bf16 activations
    q = torch.zeros(16, 64, dtype=torch.uint8 if bits == 4 else torch.int8)
    q[0, 1] = q[1, 33] = q[2, 34] = 1  # output 0 reads input 1, output 1 input 33, output 2 input 34
    q[3, 33] = -1 if bits == 8 else 0  # 8 bits: a negative weight
    d = torch.ones(16, 2).half()
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 1.0, 0.003  # 0.003 * 127 = 0.38 steps of its group: 0
    x[0, 32], x[0, 33], x[0, 34] = -2.0, 0.5, 0.0078125  # 31.75 steps: 32 (0.5039...); 0.496 steps: 0
    weights = Q4Rows(q, d, torch.zeros_like(d)) if bits == 4 else Q8Rows(q, d)
    y = linear(x.bfloat16(), pack(weights))
    step = torch.tensor(32 * 2 / 127).bfloat16().item()
    assert y[0, :4].tolist() == [0.0, step, 0.0, -step if bits == 8 else 0.0]


@pytest.mark.parametrize("bits", [4, 8])
def test_each_layout_holds_the_rows_it_was_packed_from(bits):
    rows = _rows(80, 96, seed=4, bits=bits)  # an odd number of groups: the last pairs with an empty one
    amx, vnni = pack(rows, amx=True), pack(rows, amx=False)
    assert amx.data.shape == vnni.data.shape and not torch.equal(amx.data, vnni.data)
    for weight in (amx, vnni):
        again = unpack(weight)
        assert all(torch.equal(getattr(again, f), getattr(rows, f)) for f in rows.__dataclass_fields__)
    # VNNI: output 1's inputs 4..7 of the first group are bytes 4..7 of the 16 outputs' inputs 4..7 (8 bits: q + 128)
    first = vnni.data[0, 0, (128 if bits == 4 else 64) + 64 + 4 : (128 if bits == 4 else 64) + 64 + 8]
    expected = rows.q[1, 4:8].view(torch.uint8)
    assert torch.equal(first & 15 if bits == 4 else first ^ 128, expected)


def test_quantize_brings_q4_weights_back_to_their_own_grid():
    rows = _rows(32, 128, seed=3)
    rows.q[:, ::32], rows.q[:, 1::32] = 0, 15  # every block spans its whole range, as Q4_1's do
    again = quantize_q4(rows.dequantize())
    assert torch.equal(again.q, rows.q)
    assert (again.dequantize() - rows.dequantize()).abs().max() <= rows.d.float().max() * 2**-10


def test_an_input_of_another_width_or_type_is_refused():
    weight = pack(_rows(32, 64))
    for x in (torch.randn(2, 32).bfloat16(), torch.randn(2, 64)):
        with pytest.raises(ValueError, match="quantized linear"):
            linear(x, weight)
    assert linear(torch.randn(0, 64).bfloat16(), weight).shape == (0, 32)
