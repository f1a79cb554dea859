"""The quantized kernel alone (parley/kernels/_quant.c): a decode step's worth of the default
model's projections (30 layers of qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, each
layer its own random 4-bit weights, so they stream from memory as in a step) and its 49152x576
8-bit lm_head, at a few row counts. Prints ms per step on the path this process takes (AMX where
the CPU has it; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 for the path without AMX).

    python bench/quant.py                  # rows 1, 8, 32, 128
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/quant.py --rows 1 32

Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from parley.kernels.linear import Q8Rows, linear, pack, quant_amx, quantize_q4

LAYERS, SHAPES = 30, [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def per_step(weights: list[tuple[torch.Tensor, object]], repeats: int) -> float:
    for x, w in weights:  # warm up
        linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        for x, w in weights:
            linear(x, w)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    projections = [pack(quantize_q4(torch.randn(o, i, generator=generator).bfloat16()))
                   for _ in range(LAYERS) for o, i in SHAPES]
    lm_head = pack(Q8Rows(torch.randint(-128, 128, (49152, 576), generator=generator, dtype=torch.int8),
                          (torch.rand(49152, 18, generator=generator) * 0.01).half()))
    path = "AMX tiles" if quant_amx() else "AVX512-VNNI, 8-bit activations"
    print(f"path: {path}, {args.threads} threads; ms per step")
    print("| rows | projections (4-bit) | lm_head (8-bit) |\n|---|---|---|")
    for rows in args.rows:
        x = {i: torch.randn(rows, i, generator=generator).bfloat16() for i in (576, 1536)}
        repeats = max(3, 200 // rows)
        projection_ms = per_step([(x[w.shape[1]], w) for w in projections], repeats)
        lm_head_ms = per_step([(x[576], lm_head)], repeats)
        print(f"| {rows} | {projection_ms:.2f} | {lm_head_ms:.2f} |")


if __name__ == "__main__":
    main()
