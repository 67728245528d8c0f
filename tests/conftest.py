"""Test-wide setup: emulate 4 CPU devices so sharded code paths are exercised.

XLA reads the flag when the backend starts, so it must be set before anything
imports jax; conftest is imported first by pytest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
