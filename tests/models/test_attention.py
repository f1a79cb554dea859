"""Paged attention gives a token the same bits however its sequence is split into steps, on the
kernel (parley/kernels/_attention.c, bfloat16 with AVX512-BF16) and on the torch path."""

import pytest
import torch

from parley.kernels import attention as kernel
from parley.models import attention
from parley.models.attention import AttentionMetadata, PrefillChunk, kv_cache_shape, paged_attention, table_width

BLOCK = 16
KV_HEADS, GROUP, HEAD_DIM = 3, 3, 64  # the default model's attention


class Cache:
    """Sequences of random q, k, v at every position, attended in whatever steps a test asks for."""

    def __init__(self, lengths: list[int], dtype: torch.dtype):
        generator = torch.Generator().manual_seed(0)
        heads = KV_HEADS * GROUP
        # q scaled so that the scores spread as a trained model's do: each softmax has a few large terms
        self.q = [(3 * torch.randn(n, heads, HEAD_DIM, generator=generator)).to(dtype) for n in lengths]
        self.k = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=generator).to(dtype) for n in lengths]
        self.v = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=generator).to(dtype) for n in lengths]
        self.tables, first = [], 1  # block 0 is left unused, as the runner pads tables with it
        for n in lengths:
            blocks = -(-n // BLOCK)
            self.tables.append(list(range(first, first + blocks)))
            first += blocks
        shape = kv_cache_shape(first, BLOCK, KV_HEADS, HEAD_DIM)
        self.k_cache, self.v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self.out = [torch.full_like(q, float("nan")) for q in self.q]

    def step(self, decodes: list[tuple[int, int]], prefills: list[tuple[int, int, int]], window: int | None = None,
             softcap: float | None = None) -> None:
        """decodes: (seq, position); prefills: (seq, start, length); as the runner lays them out."""
        spans = [(s, pos, 1) for s, pos in decodes] + list(prefills)
        slots = [self.tables[s][p // BLOCK] * BLOCK + p % BLOCK for s, start, n in spans for p in range(start, start + n)]
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), num_decode_tokens=len(decodes))
        if decodes:
            widest = table_width(max(len(self.tables[s]) for s, _ in decodes), BLOCK)
            meta.decode_block_tables = torch.tensor([self.tables[s] + [0] * (widest - len(self.tables[s]))
                                                     for s, _ in decodes])
            meta.decode_context_lens = torch.tensor([p + 1 for _, p in decodes])
            visible = torch.arange(widest * BLOCK).unsqueeze(0) < meta.decode_context_lens.unsqueeze(1)
            bias = torch.zeros(visible.shape, dtype=self.q[0].dtype).masked_fill_(~visible, float("-inf"))
            meta.decode_bias = bias.view(len(decodes), 1, -1)
        offset, chunks = len(decodes), []
        for s, start, n in prefills:
            blocks = -(-(start + n) // BLOCK)
            table = self.tables[s][:blocks] + [0] * (table_width(blocks, BLOCK) - blocks)
            chunks.append(PrefillChunk(offset, n, start + n, torch.tensor(table)))
            offset += n
        meta.prefill_chunks = tuple(chunks)
        cat = lambda parts: torch.cat([parts[s][start : start + n] for s, start, n in spans])  # noqa: E731
        out = paged_attention(cat(self.q), cat(self.k), cat(self.v), self.k_cache, self.v_cache, meta,
                              HEAD_DIM**-0.5, window, softcap)
        at = 0
        for s, start, n in spans:
            self.out[s][start : start + n] = out[at : at + n]
            at += n


HAS_KERNEL = kernel.available("cpu", torch.bfloat16, KV_HEADS * GROUP, KV_HEADS, HEAD_DIM, BLOCK)
HAS_AMX = HAS_KERNEL and kernel._attention.amx()
PATHS = [pytest.param((torch.bfloat16, "amx"), marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX")),
         pytest.param((torch.bfloat16, "dpbf16"), marks=pytest.mark.skipif(not HAS_KERNEL, reason="no AVX512-BF16")),
         (torch.bfloat16, "torch"), (torch.float32, "torch")]


@pytest.fixture(params=PATHS, ids=lambda p: f"{str(p[0])[6:]}-{p[1]}")
def dtype(request, monkeypatch):
    """The kernel on AMX tiles, the kernel on dpbf16 (AMD's path), or the torch path."""
    dtype, path = request.param
    monkeypatch.setattr(attention, "use_kernel", lambda q, k_cache: path != "torch")
    monkeypatch.setattr(kernel, "_amx", path == "amx")
    return dtype


@pytest.mark.parametrize(("length", "window", "softcap"), [(40, None, None), (112, None, None), (700, None, None),
                                                      (1000, None, None), (1100, None, None), (112, 37, None),
                                                      (1100, 100, 20.0), (700, None, 20.0),
                                                      (2300, None, None), (2300, 2100, 20.0)])  # in parts (> 2048 keys)
def test_a_tokens_attention_does_not_depend_on_how_its_sequence_is_split(dtype, length, window, softcap):
    lengths = [length, 300, 90, 1300]  # the sequence under test, then neighbours: the last one makes
    # the decode batch span more than 1024 keys, where oneDNN's AVX-512 kernels once summed otherwise
    whole = Cache(lengths, dtype)
    whole.step([], [(0, 0, length)], window, softcap)

    split = Cache(lengths, dtype)  # chunks of several sizes beside other prompts, then decode rows
    cuts = sorted({0, 1, length // 3, length // 3 + 7, length - 6, length})
    split.step([], [(1, 0, 300)], window, softcap)
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        if end < length - 5:
            split.step([(1, 299)] if i % 2 else [], [(0, start, end - start), (2, 0, 90)] if i == 1 else [(0, start, end - start)],
                       window, softcap)
    for pos in range(length - 6, length - 3):
        split.step([(2, 89), (0, pos), (1, 299)], [], window, softcap)
    for pos in range(length - 3, length):
        split.step([(3, 1299), (0, pos)], [], window, softcap)
    if dtype == torch.bfloat16:
        assert torch.equal(split.out[0], whole.out[0])
    else:  # float32: MKL's sgemm rounds with the number of rows (README "Determinism")
        torch.testing.assert_close(split.out[0], whole.out[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("amx", [pytest.param(True, marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX")), False])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (37, None), (None, 5.0), (100, 5.0)])
@pytest.mark.skipif(not HAS_KERNEL, reason="no AVX512-BF16")
def test_the_kernel_is_attention_within_bfloat16_rounding(amx, window, softcap, monkeypatch):
    """A sliding window (HF's rule: the last `window` positions, itself included) and Gemma 2's soft
    cap as transformers applies it (scores / cap, tanh, * cap, before the mask)."""
    monkeypatch.setattr(kernel, "_amx", amx)
    lengths = [1, 17, 300, 2200]  # the last one's rows past 2048 keys in parts
    cache = Cache(lengths, torch.bfloat16)
    cache.step([], [(s, 0, n) for s, n in enumerate(lengths)], window, softcap)
    for s, n in enumerate(lengths):
        q = cache.q[s].double().view(n, KV_HEADS, GROUP, HEAD_DIM)
        k, v = cache.k[s].double(), cache.v[s].double()  # [n, KVH, D]
        scores = torch.einsum("tkgd,skd->tkgs", q, k) * HEAD_DIM**-0.5
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
        if window is not None:
            hidden |= torch.ones(n, n, dtype=torch.bool).tril(-window)
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        expected = torch.einsum("tkgs,skd->tkgd", torch.softmax(scores, dim=-1), v).reshape(n, -1, HEAD_DIM)
        # the probabilities are rounded to bf16 (at most 2^-9 of each) and weigh values of at most
        # max|v|; then one rounding of the output to bf16
        torch.testing.assert_close(cache.out[s].double(), expected, rtol=2**-8, atol=2**-9 * v.abs().max().item())


@pytest.mark.parametrize("amx", [pytest.param(True, marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX")), False])
@pytest.mark.skipif(not HAS_KERNEL, reason="no AVX512-BF16")
def test_the_kernel_never_reads_what_lies_past_a_sequence(amx, monkeypatch):
    """Slots past a sequence's tokens hold whatever an earlier sequence left there, inf and NaN
    included: they must not reach the output."""
    monkeypatch.setattr(kernel, "_amx", amx)
    lengths = [21, 7, 50]  # none fills its last block
    clean, stale = Cache(lengths, torch.bfloat16), Cache(lengths, torch.bfloat16)
    stale.k_cache.fill_(float("nan"))
    stale.v_cache.fill_(float("inf"))
    for cache in (clean, stale):
        cache.step([], [(s, 0, n - 1) for s, n in enumerate(lengths)])
        cache.step([(s, n - 1) for s, n in enumerate(lengths)], [])
    for s in range(len(lengths)):
        assert torch.equal(stale.out[s], clean.out[s])


@pytest.mark.parametrize("amx", [pytest.param(True, marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX")), False])
@pytest.mark.skipif(not HAS_KERNEL, reason="no AVX512-BF16")
def test_the_kernel_never_reads_the_blocks_before_a_window(amx, monkeypatch):
    """The block manager releases a sliding layer's blocks wholly before the window of every token
    still to compute, and they are handed to other sequences: whatever they then hold, inf and NaN
    included, must not reach the output."""
    monkeypatch.setattr(kernel, "_amx", amx)
    window, lengths = 20, [75, 40]
    clean, stale = Cache(lengths, torch.bfloat16), Cache(lengths, torch.bfloat16)
    for cache in (clean, stale):
        cache.step([], [(0, 0, 60), (1, 0, 40)], window)
    for block in stale.tables[0][: (60 - window + 1) // BLOCK]:  # before the window of position 60 on
        stale.k_cache[:, block] = float("nan")
        stale.v_cache[:, block] = float("inf")
    for cache in (clean, stale):
        cache.step([(1, 39)], [(0, 60, 12)], window)  # four rows a unit: positions 60-63 read from 41 on
        cache.step([(0, 72), (1, 39)], [(0, 73, 2)], window)
    assert torch.equal(stale.out[0][60:], clean.out[0][60:]) and not stale.out[0][60:].isnan().any()


@pytest.mark.skipif(not HAS_KERNEL, reason="no AVX512-BF16")
def test_the_kernel_refuses_to_read_or_write_outside_the_cache():
    cache = Cache([20], torch.bfloat16)
    q, k, v = torch.zeros(1, KV_HEADS * GROUP, HEAD_DIM, dtype=torch.bfloat16), *torch.zeros(2, 1, KV_HEADS, HEAD_DIM,
                                                                                                  dtype=torch.bfloat16)
    blocks = cache.k_cache.shape[1]
    one = torch.ones(1, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32)
    for slots, table, seq, keys in [([blocks * BLOCK], [[1]], zero, one),  # a slot past the cache
                                    ([0], [[blocks]], zero, one),  # a block past the cache
                                    ([0], [[1]], zero, one * (BLOCK + 1)),  # more keys than the table holds
                                    ([0], [[1]], one, one)]:  # a table that is not there
        with pytest.raises(ValueError):
            kernel.attend(q, k, v, cache.k_cache, cache.v_cache, torch.tensor(slots), torch.tensor(table), seq, keys,
                          0.125)


@pytest.mark.parametrize("amx", [pytest.param(True, marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX")), False])
@pytest.mark.parametrize("rotary_factor", [1.0, 0.5, 0.25])  # partial rotary (Phi, StableLM): R/2 of 32, 16, 8
@pytest.mark.skipif(not HAS_KERNEL, reason="no AVX512-BF16")
def test_the_kernel_rotates_q_and_k_with_the_bits_of_torchs_rope(amx, rotary_factor, monkeypatch):
    """The kernel's RoPE, in place before it attends, is torch's apply_rope in bf16 bit for bit: the
    queries it leaves, the keys it caches, and so the output of attending pre-rotated q and k."""
    from parley.models.layers.rotary import Rope, RotaryTable

    monkeypatch.setattr(kernel, "_amx", amx)
    table = RotaryTable(HEAD_DIM, 10000.0, None, 4096, rotary_factor).to(torch.bfloat16)
    rows, generator = 40, torch.Generator().manual_seed(1)
    positions = torch.randint(0, 4096, (rows,), generator=generator)
    rope = Rope(table, positions)
    qkv = (3 * torch.randn(rows, KV_HEADS * (GROUP + 2), HEAD_DIM, generator=generator)).to(torch.bfloat16)
    heads = KV_HEADS * GROUP
    want_q, want_k = rope.apply(qkv[:, :heads]), rope.apply(qkv[:, heads : heads + KV_HEADS])

    outs = []
    for given in (rope, None):  # the kernel rotating, then q and k rotated by torch and not again
        cache = Cache([rows], torch.bfloat16)
        cache.k_cache.zero_(), cache.v_cache.zero_()
        x = qkv.clone() if given is not None else torch.cat((want_q, want_k, qkv[:, heads + KV_HEADS :]), dim=1)
        q, k, v = x.split([heads, KV_HEADS, KV_HEADS], dim=1)
        slots = torch.tensor([cache.tables[0][p // BLOCK] * BLOCK + p % BLOCK for p in range(rows)])
        table_row = torch.tensor([cache.tables[0] + [0] * (table_width(len(cache.tables[0]), BLOCK) - len(cache.tables[0]))])
        keys = torch.arange(1, rows + 1, dtype=torch.int32)
        outs.append((kernel.attend(q, k, v, cache.k_cache, cache.v_cache, slots, table_row,
                                   torch.zeros(rows, dtype=torch.int32), keys, HEAD_DIM**-0.5, rope=given),
                     cache.k_cache.clone()))
        if given is not None:
            assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])

    beyond = Rope(table, torch.full((rows,), 4096))
    with pytest.raises(ValueError):
        kernel.attend(q, k, v, cache.k_cache, cache.v_cache, slots, table_row, torch.zeros(rows, dtype=torch.int32), keys,
                      HEAD_DIM**-0.5, rope=beyond)
