"""The residual add and RMSNorm of parley/kernels/norm.py: the kernel (bfloat16, AVX512-BF16) and
torch's ops (float32, and where the kernel does not run)."""

import pytest
import torch
import torch.nn.functional as F

from parley.kernels import norm


def _rows(dtype, rows=40, width=576, seed=0):
    generator = torch.Generator().manual_seed(seed)
    delta, hidden = (torch.randn(rows, width, generator=generator) * 3).to(dtype), torch.randn(rows, width, generator=generator).to(dtype)
    return delta, hidden, (1 + torch.randn(width, generator=generator) / 4).to(dtype)


@pytest.mark.skipif(not norm._supported, reason="the norm kernel needs AVX512-BF16")
def test_the_kernel_adds_as_torch_rounds_and_norms_within_one_rounding():
    delta, hidden, weight = _rows(torch.bfloat16)
    out, total = norm.rms_norm(delta, hidden, weight, 1e-5)
    assert torch.equal(total, hidden + delta)  # the residual stream keeps torch's bits
    t = total.double()
    exact = t / (t.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight.double()
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()  # rounded to bf16 once
    alone, _ = norm.rms_norm(delta[:1], None, weight, 1e-5)
    assert torch.equal(alone, norm.rms_norm(delta, None, weight, 1e-5)[0][:1])  # rows are their own work
    assert not torch.equal(alone, out[:1])  # the residual is added


def test_float32_and_unsupported_widths_keep_torchs_ops():
    delta, hidden, weight = _rows(torch.float32)
    out, total = norm.rms_norm(delta, hidden, weight, 1e-6)
    assert torch.equal(total, hidden + delta) and torch.equal(out, F.rms_norm(hidden + delta, (576,), weight, 1e-6))
    delta, hidden, weight = _rows(torch.bfloat16, width=40)
    out, total = norm.rms_norm(delta, hidden, weight, 1e-6)
    assert torch.equal(out, F.rms_norm(hidden + delta, (40,), weight, 1e-6))
