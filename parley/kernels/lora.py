"""Segmented multi-LoRA on CPU: each token gets only its own adapter's delta, from _lora.c.

`pack` lays one adapter's LoRA on one fused projection of one layer out for the kernel, once per
adapter; each step groups its tokens into blocks of one adapter (`token_blocks`) and `add_deltas`
adds every token's delta to the base projection's output in place. Only on CPUs with AVX512-BF16
and in bfloat16 (`available`); elsewhere parley/adapters runs LoRA on stacked torch matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch  # before _lora: the kernel then shares torch's OpenMP runtime (see setup.py)
import torch.nn.functional as F

try:
    from parley.kernels import _lora
except ImportError:  # not built here (see setup.py)
    _lora = None


def available(device: torch.device | str, dtype: torch.dtype) -> bool:
    return _lora is not None and torch.device(device).type == "cpu" and dtype == torch.bfloat16 and _lora.supported()


@dataclass(frozen=True)
class PackedLoRA:
    """One adapter's LoRA on one fused projection of one layer, as _lora.c reads it."""

    words: torch.Tensor  # int64 descriptor (_lora.c's header says what each word is)
    tensors: tuple[torch.Tensor, ...]  # what the descriptor points into, kept alive with it

    @property
    def address(self) -> int:
        return self.words.data_ptr()


def pack(modules: list[tuple[torch.Tensor, torch.Tensor, int]]) -> PackedLoRA:
    """`modules`: (A [r, in], B [out, r] with the scale folded in, first row of its output in the
    fused projection) for each module of the projection the adapter targets; bfloat16."""
    a_rows, segments, keep, column = [], [], [], 0
    for a, b, row in modules:
        rank, out_features = a.shape[0], b.shape[0]
        padded = rank + rank % 2  # the expand reads B's columns in pairs...
        blocks = -(-out_features // 64)  # ...for 64 output rows at a time
        a_rows.append(F.pad(a, (0, 0, 0, padded - rank)))
        b = F.pad(b, (0, padded - rank, 0, blocks * 64 - out_features))
        b_blocks = b.view(blocks, 64, padded // 2, 2).transpose(1, 2).contiguous()  # [blocks, r/2, 64, 2]
        keep.append(b_blocks)
        segments += [column, padded, row, out_features, b_blocks.data_ptr()]
        column += padded
    a = torch.cat(a_rows)  # [R, in]
    rows, pairs = -(-column // 16) * 16, -(-a.shape[1] // 2)  # the shrink: 16 rows by column pairs
    a = F.pad(a, (0, 2 * pairs - a.shape[1], 0, rows - column))
    a_blocks = a.view(rows // 16, 16, pairs, 2).transpose(1, 2).contiguous()  # [R/16, in/2, 16, 2]
    words = torch.tensor([rows, modules[0][0].shape[1], a_blocks.data_ptr(), len(modules), *segments],
                         dtype=torch.int64)
    return PackedLoRA(words, (a_blocks, *keep))


@dataclass(frozen=True)
class TokenBlocks:
    """A step's tokens grouped by adapter, as _lora.c reads them."""

    blocks: torch.Tensor  # int32 [blocks, 2 + TOKENS]: (slot, count, tokens...), grouped by slot
    first: torch.Tensor  # int32 [slots + 1]: each slot's first block
    num_tokens: int  # rows of the flat batch


def token_blocks(token_slots: list[int], num_slots: int) -> TokenBlocks:
    """`token_slots`: each token's adapter as an index into the step's adapters (-1: the base
    model, left out). Blocks hold up to TOKENS tokens of one slot; unused places repeat the
    block's first token."""
    tokens_of: list[list[int]] = [[] for _ in range(num_slots)]
    for token, slot in enumerate(token_slots):
        if slot >= 0:
            tokens_of[slot].append(token)
    size, rows, first = _lora.TOKENS, [], [0]
    for slot, tokens in enumerate(tokens_of):
        for start in range(0, len(tokens), size):
            chunk = tokens[start : start + size]
            rows.append([slot, len(chunk), *chunk, *[chunk[0]] * (size - len(chunk))])
        first.append(len(rows))
    return TokenBlocks(torch.tensor(rows, dtype=torch.int32).view(-1, 2 + size),
                       torch.tensor(first, dtype=torch.int32), len(token_slots))


def add_deltas(x: torch.Tensor, y: torch.Tensor, tokens: TokenBlocks, addresses: torch.Tensor) -> torch.Tensor:
    """y [N, out] += each token's delta B A x [N, in], in place; `addresses` int64 [slots]: each
    slot's PackedLoRA.address for this projection (0: the adapter does not target it)."""
    if x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16 or x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("the LoRA kernel takes bfloat16 rows with contiguous features")
    if x.shape[0] != tokens.num_tokens or y.shape[0] != tokens.num_tokens:
        raise ValueError(f"x and y must have a row for each of the {tokens.num_tokens} tokens")
    _lora.apply(tokens.num_tokens, addresses.shape[0], tokens.blocks.data_ptr(), tokens.first.data_ptr(),
                x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), addresses.data_ptr())
    return y
