"""The compiled parts of Parley: the multi-LoRA CPU kernel (parley/kernels/_lora.c) and paged
attention (parley/kernels/_attention.c).

Both are optional: where they cannot be built (no C compiler) the install goes on, and where they
cannot run (another architecture, no AVX512-BF16) parley/kernels/lora.py and attention.py report
them unavailable, so LoRA and attention run on their torch paths.
-fopenmp links the libgomp.so.1 that torch loads too, so the kernel shares torch's thread pool.
"""

from setuptools import Extension, setup


def kernel(name: str) -> Extension:
    return Extension(f"parley.kernels.{name}", [f"parley/kernels/{name}.c"], depends=["parley/kernels/cpu.h"], optional=True,
                     extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])


setup(ext_modules=[kernel("_lora"), kernel("_attention"), kernel("_quant"), kernel("_norm")])
