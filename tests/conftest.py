"""Test set-up: 8 virtual CPU devices, so sharding tests run without accelerators.

XLA reads the flag once, when jax initialises its backend, so it must be set
before anything imports jax; pytest imports conftest.py first.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
