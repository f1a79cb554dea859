"""The attention kernel gives a row the same bits in any batch: beside the rest of its prompt chunk
(rows sharing its units on AMX, their scores and probabilities computed together), beside other
sequences' decode and prompt rows, and alone, on AMX tiles and on dpbf16; with the key ranges that
make rows differ (a chunk that starts mid-group and crosses PART_KEYS, sliding windows that start
mid-group, soft caps)."""

import pytest
import torch

from parley.kernels import attention as kernel

BLOCK, KV_HEADS, GROUP, HEAD_DIM = 16, 3, 3, 64  # the default model's attention
HAS_KERNEL = kernel.available("cpu", torch.bfloat16, KV_HEADS * GROUP, KV_HEADS, HEAD_DIM, BLOCK)
HAS_AMX = HAS_KERNEL and kernel._attention.amx()
pytestmark = pytest.mark.skipif(not HAS_KERNEL, reason="no AVX512-BF16")


class Sequences:
    """Random q, k, v for sequences of the given lengths, each with its own blocks of one cache."""

    def __init__(self, lengths: list[int]):
        generator = torch.Generator().manual_seed(1)
        heads = KV_HEADS * GROUP
        self.q = [(3 * torch.randn(n, heads, HEAD_DIM, generator=generator)).to(torch.bfloat16) for n in lengths]
        self.k = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=generator).to(torch.bfloat16) for n in lengths]
        self.v = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=generator).to(torch.bfloat16) for n in lengths]
        width = max(-(-n // BLOCK) for n in lengths)
        self.tables = torch.zeros(len(lengths), width, dtype=torch.int64)
        first = 1
        for s, n in enumerate(lengths):
            blocks = -(-n // BLOCK)
            self.tables[s, :blocks] = torch.arange(first, first + blocks)
            first += blocks
        shape = (KV_HEADS, first, BLOCK, HEAD_DIM)
        self.k_cache, self.v_cache = torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)

    def attend(self, spans: list[tuple[int, int, int]], window, softcap) -> torch.Tensor:
        """spans: (sequence, first position, rows), as one batch; each row sees its sequence up to itself."""
        rows = [(s, p) for s, start, n in spans for p in range(start, start + n)]
        pick = lambda x: torch.stack([x[s][p] for s, p in rows])  # noqa: E731
        seq = torch.tensor([s for s, _ in rows], dtype=torch.int32)
        keys = torch.tensor([p + 1 for _, p in rows], dtype=torch.int32)
        slots = torch.tensor([int(self.tables[s, p // BLOCK]) * BLOCK + p % BLOCK for s, p in rows])
        return kernel.attend(pick(self.q), pick(self.k), pick(self.v), self.k_cache, self.v_cache, slots, self.tables,
                             seq, keys, HEAD_DIM**-0.5, window, softcap)


@pytest.mark.parametrize("amx", [pytest.param(True, marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX")), False])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (None, 20.0), (999, None), (1001, 30.0)])
def test_a_row_gets_the_same_bits_in_any_batch(amx, window, softcap, monkeypatch):
    monkeypatch.setattr(kernel, "_amx", amx)
    sequences = Sequences([2140, 700, 90])
    # the caches first: the long prompt but its last 151 rows, the others but their last rows
    sequences.attend([(0, 0, 1989), (1, 0, 699), (2, 0, 60)], window, softcap)
    # a chunk that starts mid-group and crosses 2,048 keys, beside a decode row and a short chunk
    batch = sequences.attend([(1, 699, 1), (0, 1989, 151), (2, 60, 30)], window, softcap)
    rows = [(1, 699)] + [(0, p) for p in range(1989, 2140)] + [(2, p) for p in range(60, 90)]
    for i, (s, p) in enumerate(rows):
        alone = sequences.attend([(s, p, 1)], window, softcap)[0]
        assert torch.equal(batch[i], alone), (s, p)
    # and within other chunks of the same prompt: a row's bits do not depend on where chunks start
    for start, n in [(1989, 7), (1996, 60), (2056, 84)]:
        chunk = sequences.attend([(0, start, n)], window, softcap)
        assert torch.equal(chunk, batch[1 + start - 1989 : 1 + start - 1989 + n])
