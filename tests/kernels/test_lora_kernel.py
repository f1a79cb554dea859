"""The multi-LoRA CPU kernel: each token gets exactly its own adapter's delta, the same alone as in any batch."""

import pytest
import torch

from parley.kernels import lora

pytestmark = pytest.mark.skipif(not lora.available("cpu", torch.bfloat16), reason="no LoRA kernel on this CPU")


def make_adapter(generator, in_features, outs, rank):
    """(A, B, first output row) per module of a fused projection, bf16, B scaled as a real one."""
    modules, row = [], 0
    for out in outs:
        a = (torch.randn(rank, in_features, generator=generator) / in_features**0.5).bfloat16()
        b = (torch.randn(out, rank, generator=generator) / rank**0.5).bfloat16()
        modules.append((a, b, row))
        row += out
    return modules


def reference(x, y, slots, adapters):
    """Per token: fp32 sums of the bf16 values, A x rounded to bf16 as PEFT's lora_A output is,
    and the delta added to y with one rounding."""
    out = y.clone()
    for t, slot in enumerate(slots):
        for a, b, row in adapters[slot] if slot >= 0 else []:
            h = (x[t].float() @ a.float().t()).bfloat16()
            rows = slice(row, row + b.shape[0])
            out[t, rows] = (y[t, rows].float() + h.float() @ b.float().t()).bfloat16()
    return out


# (in_features, module outputs, ranks of the adapters, tokens): odd sizes everywhere the kernel pads,
# and enough tokens of one adapter (100) to split them over several units.
CASES = [(576, (576, 192, 192), (16, 7, 1), 37), (99, (70, 33), (2, 5, 3), 9), (1536, (576,), (16, 16, 16), 300)]


@pytest.mark.parametrize(("in_features", "outs", "ranks", "num_tokens"), CASES)
def test_each_token_gets_its_own_adapters_delta(in_features, outs, ranks, num_tokens):
    generator = torch.Generator().manual_seed(num_tokens)
    adapters = [make_adapter(generator, in_features, outs, r) for r in ranks]
    packed = [lora.pack(modules) for modules in adapters]
    addresses = torch.tensor([p.address for p in packed], dtype=torch.int64)
    x = torch.randn(num_tokens, in_features, generator=generator).bfloat16()
    y = torch.randn(num_tokens, sum(outs), generator=generator).bfloat16()
    slots = [t % (len(ranks) + 1) - 1 for t in range(num_tokens)]  # -1: the base model

    got = lora.add_deltas(x, y.clone(), lora.token_blocks(slots, len(ranks)), addresses)

    expected = reference(x, y, slots, adapters)
    base = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base], y[base])
    # fp32 sums in another order may round a last bf16 bit differently, rarely
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=0.02)
    assert (got != expected).float().mean() < 0.01
    for t in range(0, num_tokens, 7):  # a token alone: the very same bits
        alone = lora.add_deltas(x[t : t + 1], y[t : t + 1].clone(), lora.token_blocks([slots[t]], len(ranks)), addresses)
        assert torch.equal(alone[0], got[t])


def test_an_adapter_that_does_not_target_the_projection_leaves_its_tokens_alone():
    generator = torch.Generator().manual_seed(0)
    packed = lora.pack(make_adapter(generator, 64, (32,), 4))
    addresses = torch.tensor([0, packed.address], dtype=torch.int64)
    x, y = torch.randn(6, 64).bfloat16(), torch.randn(6, 32).bfloat16()
    got = lora.add_deltas(x, y.clone(), lora.token_blocks([0, 1, 0, 1, -1, 0], 2), addresses)
    assert torch.equal(got[[0, 2, 4, 5]], y[[0, 2, 4, 5]])
    assert not torch.equal(got[[1, 3]], y[[1, 3]])


def test_rows_it_cannot_read_are_refused():
    packed = lora.pack(make_adapter(torch.Generator().manual_seed(0), 64, (32,), 4))
    addresses = torch.tensor([packed.address], dtype=torch.int64)
    tokens = lora.token_blocks([0, 0], 1)
    with pytest.raises(ValueError):
        lora.add_deltas(torch.randn(2, 64), torch.randn(2, 32), tokens, addresses)  # float32
    with pytest.raises(ValueError):
        lora.add_deltas(torch.randn(64, 2).bfloat16().t(), torch.randn(2, 32).bfloat16(), tokens, addresses)
    with pytest.raises(ValueError):
        lora.add_deltas(torch.randn(3, 64).bfloat16(), torch.randn(3, 32).bfloat16(), tokens, addresses)
