"""Test set-up: 8 virtual CPU devices, so sharding tests run without accelerators.

XLA reads the flags once, when jax initialises its backend, so they must be set
before anything imports jax; pytest imports conftest.py first. Subprocesses the
tests start (the main job, launch/local.sh) inherit them.

`--xla_backend_optimization_level=0` skips LLVM's optimisation passes: the
suite is dominated by compiling many small train steps (every batch shape
bucket is its own compile), and this makes each compile about 3x faster on a
2-core CPU (8.9-10.8 s -> 2.9-3.4 s for the tiny synthetic train step). The
compiled programs compute the same operations, so numerics tests are unchanged;
only the speed of the generated code drops, which tests never measure.

A persistent compilation cache in a fresh temporary directory (removed at
exit) lets identical programs compile once per session: a resumed run, the
single-device references that several sharding tests share, and the main-job
subprocesses all reuse what an earlier test compiled. The xdist workers inherit
the directory from the controller, so the two workers share it too.
"""

import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="distill_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Every program, as the main job caches them (distill_jax/compile_cache.py):
# jax's default skips those compiled in under a second, most of the suite's.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Property tests (tests/test_properties_*.py): each sets its own max_examples.
# 'ci' (the default) draws the same examples on every run, so a failure is
# reproducible and CI does not flake; HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
