"""The machine a benchmark ran on: its matmul rate (the reference that achieved FLOP
rates are a share of), its allocator, and a description for the results' JSON."""

import datetime
import os
import pathlib
import platform
import subprocess
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Settings that change a run's speed without changing its config.
ENV = (
    "LD_PRELOAD",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "JAX_COMPILATION_CACHE_DIR",
    "OMP_NUM_THREADS",
    "OPENBLAS_CORETYPE",
)


def matmul_rate(n: int, repeats: int = 5, dtype: str = "float32") -> float:
    """GFLOP/s of an n x n x n `dtype` matmul through jax (after warm-up)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a, b)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def allocator() -> str:
    """What serves malloc: a preloaded tcmalloc/jemalloc, or the C library's."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    return "system malloc"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def commit() -> dict:
    """The checkout's commit and whether its tracked files differ from it (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status) if status is not None else None}


def describe(matmul_size: int = 0) -> dict:
    """The machine, the jax backend, the allocator, the commit, the date and `ENV`, as JSON.

    Args:
      matmul_size: with n > 0, also the n^3 float32 matmul rate (GFLOP/s).
        Initialises jax's backend: on a GPU call it after any child process
        that needs the GPU's memory has finished.
    """
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **commit(),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "allocator": allocator(),
        "tcmalloc_preloaded": "tcmalloc" in os.environ.get("LD_PRELOAD", ""),
        "env": {k: os.environ[k] for k in ENV if k in os.environ},
    }
    if matmul_size > 0:
        out["backend"] = jax.default_backend()
        out["devices"] = [d.device_kind for d in jax.devices()]
        out[f"matmul_{matmul_size}_gflops"] = matmul_rate(matmul_size)
    return out
