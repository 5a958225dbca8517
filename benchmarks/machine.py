"""The machine's own matmul rate: the reference that achieved FLOP rates are a share of."""

import time

import jax
import jax.numpy as jnp


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
