"""Parley: an LLM inference server."""

import os

__version__ = "0.1.0"

# One kernel family for bfloat16 projections on every x86 CPU, so outputs are batch-invariant
# everywhere (README "Determinism"). On CPUs with AMX tiles (Intel Xeon 4th gen and later) oneDNN
# would run bf16 matmuls on AMX kernels whose summation order changes with the number of rows: the
# same token rounds differently alone, in a batch, or in a draft verification (seen on a Xeon: 7
# failed tests, all passing with this cap). Capped at AVX512_CORE_BF16 it takes the AVX512-BF16
# brgemm kernels there too, the ones AMD Zen 4 runs, which are row-count invariant from two rows
# on (kernels/linear.py makes one row two). It costs AMX's speed under load (see BENCHMARKS.md).
# oneDNN reads this once, at its first use, so it is set when parley is imported, before any
# torch op; a value the user set is kept (kernels.linear.projection_kernel says what it means).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
