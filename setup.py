"""The compiled parts of Parley (parley/kernels/*.c): multi-LoRA, paged attention, 4- and 8-bit
projections, the residual add and norm, the gated MLP's activation, the sampled rows' draw, and a
stack of decoder layers calling those in one call a step.

All are optional: where they cannot be built (no C compiler) the install goes on, and where they
cannot run (another architecture, no AVX512-BF16) each one's Python module (parley/kernels/*.py)
reports it unavailable, and torch's ops run instead.
-fopenmp links the libgomp.so.1 that torch loads too, so the kernel shares torch's thread pool.
"""

from setuptools import Extension, setup


def kernel(name: str) -> Extension:
    return Extension(f"parley.kernels.{name}", [f"parley/kernels/{name}.c"], depends=["parley/kernels/cpu.h"], optional=True,
                     extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])


setup(ext_modules=[kernel("_lora"), kernel("_attention"), kernel("_quant"), kernel("_norm"), kernel("_activation"), kernel("_sample"), kernel("_stack")])
