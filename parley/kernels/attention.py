"""Paged attention over the KV cache's blocks in place, from _attention.c: one call per layer for a
flat batch of decode tokens and prompt-chunk tokens, each row seeing its own sequence's first
`keys` tokens (a sliding layer's: the last `window` of them), scores soft-capped where the model caps them. bfloat16 on CPUs with AVX512-BF16 (`available`); parley/models/attention.py keeps
its torch path elsewhere.
"""

from __future__ import annotations

import torch  # before _attention: the kernel then shares torch's OpenMP runtime (see setup.py)

from parley.kernels.linear import isa_allows_amx

try:
    from parley.kernels import _attention
except ImportError:  # not built here (see setup.py)
    _attention = None


def available(device: torch.device | str, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
              head_dim: int, block_size: int) -> bool:
    return (_attention is not None and torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and head_dim % 32 == 0 and head_dim <= 256 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= 32 and block_size % 16 == 0 and _attention.supported())


def use_amx() -> bool:
    """Whether the kernel runs on AMX tiles: where the CPU has them, unless oneDNN is kept off them
    (ONEDNN_MAX_CPU_ISA below AMX, the way to run AMD's path on an Intel machine): then the
    dpbf16 path runs, as on AMD."""
    global _amx
    if _amx is None:
        _amx = bool(_attention is not None and _attention.amx() and isa_allows_amx())
    return _amx


_amx: bool | None = None
_checked: tuple = ()  # the last step's row tensors check_step() checked (see there)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slots: torch.Tensor, tables: torch.Tensor, seq: torch.Tensor, keys: torch.Tensor,
           scale: float, window: int | None = None, softcap: float | None = None, rope=None) -> torch.Tensor:
    """Write each row's k, v [N, KVH, D] into its slot (int64 [N]) of the caches, then attend: q
    [N, H, D] (rows may be strided, heads contiguous, as k and v); caches of [KVH, num_blocks,
    block_size, D] elements, in the kernel's own layout within each block (only this function reads
    or writes them); tables int64 [S, W] block ids; seq, keys int32 [N]: each row's table and how
    many of its sequence's first tokens it sees (itself included); window: a sliding layer's, each
    row then sees only the last `window` of those; softcap: scores -> softcap * tanh(scores /
    softcap) (Gemma 2); rope: anything with cos and sin tables [positions, R/2] bf16 and positions
    int64 [N] (parley/models/layers/rotary.py's Rope): q and k are rotated first, in place. Returns
    [N, H, D]."""
    rows, heads, head_dim = q.shape
    kv_heads, num_blocks, block_size = k_cache.shape[:3]
    if not (q.stride(2) == k.stride(2) == v.stride(2) == 1 and q.stride(1) == k.stride(1) == v.stride(1) == head_dim
            and k.shape == v.shape == (rows, kv_heads, head_dim) and q.dtype == k.dtype == v.dtype == k_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("attend: unexpected layout")
    check_step(rows, slots, tables, seq, keys, rope, q.dtype)
    cos, sin, positions = (rope.cos, rope.sin, rope.positions) if rope is not None else (None, None, None)
    out = torch.empty(rows, heads, head_dim, dtype=q.dtype)
    _attention.attend(torch.get_num_threads(), rows, heads, kv_heads, head_dim, q.data_ptr(), q.stride(0),
                      out.data_ptr(), heads * head_dim, k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
                      block_size, tables.data_ptr(), tables.shape[0], tables.stride(0), seq.data_ptr(), keys.data_ptr(), scale,
                      k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), use_amx(),
                      window or 0, float(softcap or 0.0), 0 if cos is None else cos.data_ptr(),
                      0 if sin is None else sin.data_ptr(), 0 if cos is None else cos.shape[0],
                      0 if cos is None else cos.shape[1], 0 if positions is None else positions.data_ptr())
    return out


def check_step(rows: int, slots: torch.Tensor, tables: torch.Tensor, seq: torch.Tensor, keys: torch.Tensor, rope,
               dtype: torch.dtype) -> None:
    """ValueError unless a step's row tensors (see attend) are as the kernel reads them; the same
    objects serve every layer of a step, so they are checked once."""
    global _checked
    step = (slots, tables, seq, keys, rope)
    if len(_checked) == 5 and all(a is b for a, b in zip(step, _checked)):
        return
    if not (tables.dtype == slots.dtype == torch.int64 and tables.stride(1) == 1 and slots.is_contiguous()
            and seq.dtype == keys.dtype == torch.int32 and seq.is_contiguous() and keys.is_contiguous()
            and seq.shape[0] == keys.shape[0] == slots.shape[0] == rows
            and (rope is None or (rope.cos.dtype == rope.sin.dtype == dtype and rope.cos.is_contiguous()
                                  and rope.sin.is_contiguous() and rope.cos.shape == rope.sin.shape
                                  and rope.positions.dtype == torch.int64 and rope.positions.is_contiguous()
                                  and rope.positions.shape == (rows,)))):
        raise ValueError("attend: unexpected layout")
    _checked = step
