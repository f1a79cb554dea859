"""Attention over a paged KV cache, for a flat batch mixing decode tokens and prefill chunks.

The cache of one layer is a pair of tensors [num_kv_heads, num_blocks, block_size, head_dim]
(`kv_cache_shape`). A sequence owns a list of blocks (its block table); token t of the sequence
lives in block table[t // block_size] at offset t % block_size.

Heads outermost, so that gathering a batch's blocks gives [KVH, B, L, D], which the matmuls take
as they are, batched over (KVH, B). With blocks outermost the gather gives [B, L, KVH, D], which
each matmul first copies into head-major order: two extra copies of the whole context per layer
and step (a batch-32 decode step was 74 ms that way, 48-51 ms this way).

In bfloat16 on CPUs with AVX512-BF16 (the AMD and Intel machines this project runs on) one call
of parley/kernels/_attention.c a layer writes the new keys and values and does the whole batch,
reading the blocks in place (laid out its own way), on AMX tiles where the CPU has them and on
dpbf16 elsewhere. Measured on a Xeon with AMX against the torch path: a decode step's attention at
32 rows of ~200 tokens 22.0 -> 8.9 ms, at one row 6.8 -> 1.4 ms (bench/profile_step.py); prefill
of 166 / 666 / 1,330 / 2,662 tokens 1783 / 1764 / 1404 / 665 -> 2261 / 2725 / 2696 / 2409 tok/s
(bench/prefill.py; dpbf16 alone: 2143 / 2028 / 1616 / 1052). Long prompts on AMX since the kernel
keeps each KV head's keys and values in L2 from one unit to the next and takes its softmax where
the data already is (see _attention.c's top comment), same bits: prefill of 166 / 2,662 / 4,000 /
8,000 tokens 2811-3162 / 2329-2600 / 1819-2116 / 1190-1211 -> 2825-2924 / 2633-2831 / 2103-2318 /
1411-1474 tok/s (bench/prefill.py with the input limit raised to 8,100 tokens, runs alternated, on
a 2-core "Intel(R) Xeon(R) Processor" shared with other work; at 166 tokens attention is a small
part and the spread is noise). Elsewhere, and in float32, the torch
path below runs.

The torch path is plain matmul attention: on CPU it beats scaled_dot_product_attention with a GQA mask for the
tiny per-step shapes of decoding, and grouped-query heads are handled by a reshape, not a repeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from parley.kernels import attention as kernel
from parley.kernels.linear import rows_per_call
from parley.models.layers.rotary import Rope

KEY_MULTIPLE = 32  # keys per sequence in a step's attention come in multiples of this (see _weighted_values)
KEYS_PER_CALL = 512  # at most this many keys per matmul of probabilities and values


@dataclass
class PrefillChunk:
    start: int  # offset of the chunk's first token in the flat batch
    length: int  # tokens in the chunk
    context_len: int  # tokens of the sequence visible once this chunk is written (prefix + chunk)
    block_table: torch.Tensor  # [table_width(ceil(context_len / block_size))] int64, padded with any block


@dataclass
class AttentionMetadata:
    """Where each token of the flat batch writes its K/V and which keys it sees.

    Token order in the batch: the `num_decode_tokens` decode tokens first (one per sequence),
    then every prefill chunk, contiguous. Built once per step by the runner, shared by all layers.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block * block_size + offset
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks] int64, padded
    # [num_decode, 1, max_blocks * block_size]: 0 or -inf; built by the torch path's first layer
    # (`_decode_bias`), as the kernel does not read it
    decode_bias: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None  # [num_decode] int: keys each decode token sees
    prefill_chunks: tuple[PrefillChunk, ...] = ()
    # a block table above -> the cache rows holding its blocks (see `_gather`), computed by the
    # first layer that needs them and reused by the others (tensors hash by identity)
    gather_rows: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict, repr=False)
    # every row's table and visible keys as the kernel reads them (`kernel_rows`), built once a step
    kernel_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # sliding window -> decode_bias with the keys before each decode token's window hidden too
    window_bias: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    # the sliding layers' own tables and slots, where they hold their own (smaller) pool of blocks
    # beside layers that see everything (parley/engine/block_manager.py's KVLayout)
    window_meta: AttentionMetadata | None = None


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (num_kv_heads, num_blocks, block_size, head_dim)


def paged_attention(
    q: torch.Tensor,  # [N, H, D]
    k: torch.Tensor,  # [N, KVH, D]
    v: torch.Tensor,  # [N, KVH, D]
    k_cache: torch.Tensor,  # [KVH, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,  # a sliding layer's: each token sees its last `window` positions, itself included
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2)
    rope: Rope | None = None,  # q and k are rotated first (on the kernel path in place, in their tensor)
) -> torch.Tensor:  # [N, H, D]
    if window is not None and meta.window_meta is not None:
        meta = meta.window_meta
    if use_kernel(q, k_cache):
        return kernel.attend(q, k, v, k_cache, v_cache, meta.slot_mapping, *kernel_rows(meta), scale, window, softcap,
                             rope)
    if rope is not None:
        q, k = rope.apply(q), rope.apply(k)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv_heads
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    out = torch.empty_like(q)

    nd = meta.num_decode_tokens
    if nd:
        # [KVH, B * blocks, block_size, D] -> [KVH, B, L, D]
        keys = _gather(k_cache, meta.decode_block_tables, meta).view(num_kv_heads, nd, -1, head_dim)
        values = _gather(v_cache, meta.decode_block_tables, meta).view(num_kv_heads, nd, -1, head_dim)
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim).transpose(0, 1)  # [KVH, B, G, D]
        scores = torch.matmul(qd, keys.transpose(-1, -2)).mul_(scale)  # [KVH, B, G, L]
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        scores.add_(_decode_bias(meta, k_cache) if window is None else _decode_window_bias(meta, k_cache, window))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[:nd] = _weighted_values(probs, values).transpose(0, 1).reshape(nd, -1, head_dim)  # [B, H, D]

    for chunk in meta.prefill_chunks:
        ctx, t = chunk.context_len, chunk.length
        # [KVH, blocks, block_size, D] -> [KVH, L, D]: the context and the rest of its last blocks
        keys = _gather(k_cache, chunk.block_table, meta).flatten(1, 2)
        values = _gather(v_cache, chunk.block_table, meta).flatten(1, 2)
        width = keys.shape[1]
        qp = q[chunk.start : chunk.start + t].view(t, num_kv_heads, group, head_dim)
        qp = qp.permute(1, 2, 0, 3).reshape(num_kv_heads, group * t, head_dim)  # [KVH, G*T, D]
        scores = torch.matmul(qp, keys.transpose(-1, -2)).mul_(scale)  # [KVH, G*T, L]
        scores = scores.view(num_kv_heads, group, t, width)
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        scores.add_(causal_bias(t, ctx, scores.dtype, scores.device, width, window))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = probs.view(num_kv_heads, group * t, width)
        chunk_out = _weighted_values(probs, values).view(num_kv_heads, group, t, head_dim)
        out[chunk.start : chunk.start + t] = chunk_out.permute(2, 0, 1, 3).reshape(t, -1, head_dim)
    return out


_KERNEL_OK: dict[tuple, bool] = {}


def use_kernel(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether parley/kernels/_attention.c serves this model: bfloat16 on a CPU with AVX512-BF16.
    It reads the blocks in place, row by row (a row's bits depend on nothing else by construction),
    and costs one call a layer: at 32 decode rows the torch path below was a third of the step.
    The kernel lays each block out its own way: a cache is only ever used by one of the two paths
    (the choice depends only on the model, its dtype and device, and the block size)."""
    return kernel_serves(q.device, q.dtype, q.shape[1], k_cache.shape[0], q.shape[2], k_cache.shape[2])


def kernel_serves(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                  block_size: int) -> bool:
    """use_kernel, from the model's shapes."""
    key = (device, dtype, heads, kv_heads, head_dim, block_size)
    if key not in _KERNEL_OK:
        _KERNEL_OK[key] = kernel.available(*key)
    return _KERNEL_OK[key]


def kernel_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tables int64 [decodes + chunks, W], seq int32 [N]: each row's table, keys int32 [N]: how many
    of its sequence's first tokens each row sees), built by the first layer and kept in `meta`."""
    if meta.kernel_rows is None:
        nd, tables, seq, keys = meta.num_decode_tokens, [], [], []
        if nd:
            tables += list(meta.decode_block_tables)
            seq.append(torch.arange(nd, dtype=torch.int32))
            keys.append(meta.decode_context_lens.to(torch.int32))
        for i, chunk in enumerate(meta.prefill_chunks):
            tables.append(chunk.block_table)
            seq.append(torch.full((chunk.length,), nd + i, dtype=torch.int32))
            keys.append(torch.arange(chunk.context_len - chunk.length + 1, chunk.context_len + 1, dtype=torch.int32))
        meta.kernel_rows = (torch.nn.utils.rnn.pad_sequence(tables, batch_first=True), torch.cat(seq), torch.cat(keys))
    return meta.kernel_rows


def _weighted_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs [..., M, L] @ values [..., L, D], with L a multiple of KEY_MULTIPLE: a row gets the same
    bits whatever the rows and the masked keys (zero probabilities) beside it. oneDNN's matmuls sum
    the keys in an order that depends on their number: on AMX when it is not a multiple of 32 (in the
    engine on a Xeon, a greedy request alone and beside a longer one parted at its 12th token), on
    AVX-512 once it passes ~1024 (plain matmuls of 900-1000 keys with a masked tail). So every call sees at most KEYS_PER_CALL keys, from positions aligned to that
    number, and at most rows_per_call() rows (see parley/kernels/linear.py); the parts of a longer
    context are added in float32, in order. Up to KEYS_PER_CALL keys this is the plain matmul."""
    parts = []
    for start in range(0, probs.shape[-1], KEYS_PER_CALL):
        p, v = probs[..., start : start + KEYS_PER_CALL], values[..., start : start + KEYS_PER_CALL, :]
        rows = p.split(rows_per_call(), dim=-2)
        parts.append(torch.cat([torch.matmul(r, v) for r in rows], dim=-2) if len(rows) > 1 else torch.matmul(p, v))
    if len(parts) == 1:
        return parts[0]
    total = parts[0].float()
    for part in parts[1:]:
        total += part
    return total.to(probs.dtype)


def table_width(blocks: int, block_size: int) -> int:
    """`blocks` rounded up so that a table of that many blocks holds a multiple of KEY_MULTIPLE keys."""
    step = KEY_MULTIPLE // math.gcd(KEY_MULTIPLE, block_size)
    return -(-blocks // step) * step


def _gather(cache: torch.Tensor, block_table: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """cache [KVH, num_blocks, block_size, D] -> [KVH, len(table), block_size, D], the table's blocks
    in order. As index_select of whole rows of the cache seen as [KVH * num_blocks, block_size * D]:
    a plain copy of each block, which index_select along dim 1 makes 1.3-1.4x slower (a decode
    step's attention at 32 sequences of 208 / 1024 tokens: 666 -> 479 / 6391 -> 4490 us a layer;
    advanced indexing is slower still)."""
    num_kv_heads, num_blocks = cache.shape[:2]
    rows = meta.gather_rows.get(block_table)
    if rows is None:
        heads = torch.arange(num_kv_heads, device=cache.device).unsqueeze(1) * num_blocks
        rows = meta.gather_rows[block_table] = (heads + block_table.flatten()).flatten()
    gathered = cache.view(num_kv_heads * num_blocks, -1).index_select(0, rows)
    return gathered.view(num_kv_heads, -1, *cache.shape[2:])


def causal_bias(num_queries: int, context_len: int, dtype, device, width: int | None = None,
                window: int | None = None) -> torch.Tensor:
    """[T, width] additive mask (width: ctx unless given): query i (at position ctx - T + i) sees
    keys at positions <= its own, and with a window only those > its own - window (HF's rule)."""
    width = context_len if width is None else width
    q_pos = torch.arange(context_len - num_queries, context_len, device=device).unsqueeze(1)
    k_pos = torch.arange(width, device=device).unsqueeze(0)
    bias = torch.zeros(num_queries, width, dtype=dtype, device=device)
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= k_pos <= q_pos - window
    return bias.masked_fill_(hidden, float("-inf"))


def _decode_bias(meta: AttentionMetadata, k_cache: torch.Tensor) -> torch.Tensor:
    """meta.decode_bias: each decode token's keys past its context hidden (decode_context_lens says
    how many it sees), over its padded table's width; built once a step."""
    if meta.decode_bias is None:
        key_pos = torch.arange(meta.decode_block_tables.shape[1] * k_cache.shape[2], device=k_cache.device)
        hidden = key_pos.unsqueeze(0) >= meta.decode_context_lens.unsqueeze(1)  # [B, L]
        bias = torch.zeros(hidden.shape, dtype=k_cache.dtype, device=k_cache.device).masked_fill_(hidden, float("-inf"))
        meta.decode_bias = bias.unsqueeze(1)
    return meta.decode_bias


def _decode_window_bias(meta: AttentionMetadata, k_cache: torch.Tensor, window: int) -> torch.Tensor:
    """_decode_bias with, for each decode token, the keys before its window hidden too; built once a
    step and window."""
    bias = meta.window_bias.get(window)
    if bias is None:
        full = _decode_bias(meta, k_cache)
        k_pos = torch.arange(full.shape[-1], device=full.device)
        first = (meta.decode_context_lens - window).unsqueeze(1)  # [B, 1]: the first key each token sees
        bias = meta.window_bias[window] = full.masked_fill((k_pos < first).unsqueeze(1), float("-inf"))
    return bias
