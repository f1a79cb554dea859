"""The sampling kernel (parley/kernels/_sample.c) draws, from the same uniforms, the tokens the torch
path draws (parley/sampling/sampler.py): the same tokens kept by every filter, the same draw in id
order. Its probabilities come from another exp, so a uniform within ~1e-7 of a boundary between two
tokens could part them; these rows and seeds do not. Not compared: a top_p reached deep in a long
tail (0.9985 of a peaked row), where the torch path's float32 running sum over thousands of tokens
errs by ~1e-4 of the mass and keeps tens of tokens more or fewer; the kernel sums in float64."""

import math

import pytest
import torch

from parley.kernels import sample as sample_kernel
from parley.sampling.metadata import SamplingRow
from parley.sampling.sampler import Sampler
from parley.types import SamplingParams

pytestmark = pytest.mark.skipif(not sample_kernel._supported, reason="the sampling kernel needs AVX512-BF16")

WIDTH = 49152


def _rows() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    peaky = torch.randn(WIDTH, generator=g) * 3
    peaky[:10] += 14
    far = torch.full((WIDTH,), -17.0)  # one token, and the rest 17 below: the candidates 16 below hold too little
    far[7] = 0.0
    flat = torch.randn(WIDTH, generator=g) * 0.1
    masked = torch.randn(WIDTH, generator=g) * 4
    masked[torch.rand(WIDTH, generator=g) < 0.9] = -math.inf  # a grammar's mask
    tied = torch.randn(WIDTH, generator=g).bfloat16().float() * 4  # bf16 logits tie often
    return {"peaky": peaky, "far": far, "flat": flat, "masked": masked, "tied": tied}


PARAMS = [dict(temperature=0.7, top_p=0.95), dict(temperature=1.0), dict(temperature=1.3, top_k=40),
          dict(top_k=5, top_p=0.5), dict(min_p=0.05), dict(min_p=1e-9, temperature=0.5),
          dict(top_k=3000, top_p=0.99, min_p=1e-4), dict(top_k=50000)]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_the_kernel_draws_what_the_torch_path_draws(params, monkeypatch):
    rows = _rows()
    logits = torch.stack(list(rows.values())).repeat_interleave(40, dim=0)  # 40 draws of each row

    def draws(path: str) -> list[int]:
        monkeypatch.setattr(sample_kernel, "available", lambda device: path == "kernel")
        sampling = [SamplingRow(SamplingParams(do_sample=True, **params), torch.Generator().manual_seed(i), [], [])
                    for i in range(len(logits))]
        return Sampler(WIDTH, "cpu")(logits, sampling).token_ids

    kernel, torch_path = draws("kernel"), draws("torch")
    assert kernel == torch_path
    assert len(set(kernel)) > 1 or params.get("top_k") == 5  # the draws do vary


def test_far_tokens_are_drawn_where_the_mass_needs_them(monkeypatch):
    """top_p above the top token's 0.998: the candidates widen to the tokens 17 below it."""
    logits = _rows()["far"].expand(3000, -1).contiguous()
    monkeypatch.setattr(sample_kernel, "available", lambda device: True)
    rows = [SamplingRow(SamplingParams(do_sample=True, top_p=0.99999), torch.Generator().manual_seed(i), [], [])
            for i in range(len(logits))]
    tokens = Sampler(WIDTH, "cpu")(logits, rows).token_ids
    assert tokens.count(7) > 2900 and len(set(tokens)) > 2
