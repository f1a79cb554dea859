"""Paged attention over the KV cache's blocks in place, from _attention.c: one call per layer for a
flat batch of decode tokens and prompt-chunk tokens, each row seeing its own sequence's first
`keys` tokens. bfloat16 on CPUs with AVX512-BF16 (`available`); parley/models/attention.py keeps
its torch path elsewhere.
"""

from __future__ import annotations

import torch  # before _attention: the kernel then shares torch's OpenMP runtime (see setup.py)

try:
    from parley.kernels import _attention
except ImportError:  # not built here (see setup.py)
    _attention = None


def available(device: torch.device | str, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
              head_dim: int) -> bool:
    return (_attention is not None and torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and head_dim % 32 == 0 and head_dim <= 256 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= 32 and _attention.supported())


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
           seq: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [N, H, D] (rows may be strided, heads contiguous); caches [KVH, num_blocks, block_size, D];
    tables int64 [S, W] block ids; seq, keys int32 [N]: each row's table and how many of its first
    tokens it sees (all of them already in the cache). Returns [N, H, D]."""
    rows, heads, head_dim = q.shape
    kv_heads, num_blocks, block_size = k_cache.shape[:3]
    if not (q.stride(2) == 1 and q.stride(1) == head_dim and k_cache.is_contiguous() and v_cache.is_contiguous()
            and tables.dtype == torch.int64 and tables.stride(1) == 1
            and seq.dtype == keys.dtype == torch.int32 and seq.is_contiguous() and keys.is_contiguous()
            and seq.shape[0] == keys.shape[0] == rows):
        raise ValueError("attend: unexpected layout")
    out = torch.empty(rows, heads, head_dim, dtype=q.dtype)
    _attention.attend(torch.get_num_threads(), rows, heads, kv_heads, head_dim, q.data_ptr(), q.stride(0),
                      out.data_ptr(), heads * head_dim, k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
                      block_size, tables.data_ptr(), tables.stride(0), seq.data_ptr(), keys.data_ptr(), scale)
    return out
