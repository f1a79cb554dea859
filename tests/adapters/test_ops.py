"""The projection op every linear layer of the model goes through."""

import torch
import torch.nn.functional as F

from parley.adapters.ops import linear, lora_linear


def test_a_row_alone_equals_the_same_row_in_a_batch_in_bfloat16():
    # One row takes oneDNN's gemv path, which sums a long inner dimension in another order than
    # gemm: F.linear rounds a few of these rows differently alone than in the batch.
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(576, 1536, generator=generator) / 30).bfloat16()
    x = torch.randn(64, 1536, generator=generator).bfloat16()
    batched = F.linear(x, weight)
    assert any(not torch.equal(F.linear(x[r : r + 1], weight)[0], batched[r]) for r in range(64))
    for r in range(64):
        assert torch.equal(linear(x[r : r + 1], weight)[0], batched[r])
        assert torch.equal(lora_linear(x[r : r + 1], weight, None, None)[0], batched[r])
