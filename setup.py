"""The one compiled part of Parley: the multi-LoRA CPU kernel (parley/kernels/_lora.c).

It is optional: where it cannot be built (no C compiler) the install goes on, and where it cannot
run (another architecture, no AVX512-BF16) parley/kernels/lora.py reports it unavailable, so LoRA
runs on the torch path.
-fopenmp links the libgomp.so.1 that torch loads too, so the kernel shares torch's thread pool.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("parley.kernels._lora", ["parley/kernels/_lora.c"], optional=True,
                             extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])])
