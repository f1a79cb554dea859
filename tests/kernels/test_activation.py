"""The gated MLP's activation kernel (parley/kernels/_activation.c): silu(gate) * up as torch rounds
it, to within one bf16 rounding of torch's silu, and a row's bits whatever the rows beside it."""

import pytest
import torch
import torch.nn.functional as F

from parley.kernels import activation


def _gate_up(rows: int, inter: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(rows, 2 * inter, generator=generator)
    x[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 90.0, -90.0, 1e-20, -1e-20])  # saturated and tiny gates
    return x.to(torch.bfloat16)


@pytest.mark.skipif(not activation._supported, reason="the kernel needs AVX512-BF16")
@pytest.mark.parametrize("inter", [1536, 40])  # the default model's, and one that is not a multiple of 16
def test_silu_mul_is_torchs_within_one_rounding_of_the_silu(inter):
    gate_up = _gate_up(70, inter)
    got = activation.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    silu = gate.double() * torch.sigmoid(gate.double())  # exact, then as the kernel rounds: silu, then the product
    lo, hi = silu.to(torch.bfloat16).double(), silu.to(torch.bfloat16).double()
    step = (silu.abs() * 2**-8).clamp(min=1e-38)  # silu may round to either neighbour: one bf16 step
    lo, hi = lo - step, hi + step
    products = torch.stack([(lo * up.double()), (hi * up.double())])
    low, high = products.min(0).values, products.max(0).values
    tolerance = high.abs() * 2**-8 + 1e-30  # the product's own rounding to bf16
    assert ((got.double() >= low - tolerance) & (got.double() <= high + tolerance)).all()
    assert (got == (F.silu(gate) * up)).float().mean() > 0.99  # torch's bits, bar a rounding of a few
    assert got[0, 2] == gate_up[0, 2] * gate_up[0, inter + 2] and got[0, 3].abs() < 1e-10  # silu(30) = 30, silu(-30) ~ 0
    assert not got.isnan().any()


@pytest.mark.skipif(not activation._supported, reason="the kernel needs AVX512-BF16")
def test_a_rows_activation_does_not_depend_on_the_rows_beside_it():
    gate_up = _gate_up(200, 1536)  # 200 rows: the call splits them over threads
    together = activation.silu_mul(gate_up)
    assert all(torch.equal(activation.silu_mul(gate_up[i : i + 1]), together[i : i + 1]) for i in (0, 57, 199))
    strided = torch.cat((gate_up, gate_up[:, :16]), dim=1)[:, : 2 * 1536]  # rows with a stride wider than 2I
    assert torch.equal(activation.silu_mul(strided), together)
