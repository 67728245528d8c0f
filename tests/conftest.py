"""Test-wide setup: emulate 4 CPU devices so sharded code paths are exercised, and compile fast.

XLA reads its flags when the backend starts, so they must be set before
anything imports jax; conftest is imported first by pytest.

Compile time: most of the suite's time is XLA:CPU compiling many small
programs (tiny models, 32-64 px, a few steps), and most of that is LLVM's
optimisation of the generated code. ``--xla_backend_optimization_level=0``
skips it: the same HLO programs, through the same HLO passes, with less
optimised machine code (the heavy convolutions and matmuls call the same
precompiled Eigen kernels). Measured on tests/test_embedder.py: 77 s of CPU
down to 30 s. Subprocesses (multi-process workers, notebook kernels) inherit
the flag through the environment. A caller's own XLA_FLAGS are used as they are.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
