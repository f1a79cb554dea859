"""The attention kernel alone at a given context: one decode row per layer, SmolLM2-135M's attention
(9 heads, 3 KV heads of 64, 30 layers), the K/V rotated over 6 copies of every layer's cache
(~780 MB at 4,000 tokens, more than the L3) so that they come from DRAM as in the engine;
`--batch N`: N such rows, each of its own sequence, as a decode step of N requests (each sequence's
blocks one after the other; the engine's, handed out as sequences grow, lie interleaved: 5-10%
slower at 8-32 rows, BENCHMARKS.md, thirteenth session).

    PYTHONPATH=. python bench/attention_context.py --context 4000 --threads 1            # AMX where the CPU has it
    PYTHONPATH=. python bench/attention_context.py --context 4000 --threads 1 --no-amx   # the dpbf16 path (AMD's)

Prints wall and CPU time per layer call; on a busy machine compare the CPU time of alternated runs,
and prefer one thread: two-thread regions wait for whichever thread the OS has descheduled (on the
2-core machine of these notes, busy, torch's own 2-thread sum of 3 MB took 1.9-3.3 ms against
0.3-0.4 ms on one thread).
"""

from __future__ import annotations

import argparse
import time

import torch

from parley.engine.malloc import keep_freed_memory
from parley.kernels import attention as kernel

BLOCK, KV_HEADS, HEADS, HEAD_DIM, LAYERS, COPIES = 16, 3, 9, 64, 30, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-amx", action="store_true", help="the dpbf16 path, as on AMD")
    parser.add_argument("--batch", type=int, default=1, help="decode rows, each its own sequence")
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    keep_freed_memory()  # as the engine: the kernel's scratch stays in the heap
    torch.set_num_threads(args.threads)
    kernel._amx = kernel.use_amx() and not args.no_amx
    n = args.batch
    blocks = -(-(args.context + 1) // BLOCK)
    shape = (KV_HEADS, n * blocks + 2, BLOCK, HEAD_DIM)
    copies = [[(torch.full(shape, 0.01, dtype=torch.bfloat16), torch.full(shape, 0.02, dtype=torch.bfloat16))
               for _ in range(LAYERS)] for _ in range(COPIES)]
    table = torch.arange(1, 1 + n * blocks).view(n, blocks)
    q = torch.randn(n, HEADS, HEAD_DIM).to(torch.bfloat16)
    k = v = torch.randn(n, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    slots = table[:, args.context // BLOCK] * BLOCK + args.context % BLOCK
    seq, keys = torch.arange(n, dtype=torch.int32), torch.full((n,), args.context + 1, dtype=torch.int32)

    def step(i: int) -> None:
        for k_cache, v_cache in copies[i % COPIES]:
            kernel.attend(q, k, v, k_cache, v_cache, slots, table, seq, keys, HEAD_DIM**-0.5)

    for i in range(COPIES):
        step(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step(i)
    calls = args.steps * LAYERS
    wall, cpu = (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls
    gigabytes = n * 2 * KV_HEADS * (args.context + 1) * HEAD_DIM * 2 / 1e9
    print(f"context {args.context}, {n} row(s), {args.threads} thread(s), {'AMX' if kernel._amx else 'dpbf16'}: "
          f"{wall * 1e6:.0f} us a layer (CPU {cpu * 1e6:.0f} us), K/V read at {gigabytes / wall:.1f} GB/s")


if __name__ == "__main__":
    main()
