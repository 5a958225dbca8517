"""Tests for distill_jax.losses.chunked: chunked losses from hidden states.

Each chunked loss is compared, value and gradient, with the plain loss of
distill_jax.losses applied to the full logits ``h @ E.T + b`` (column 0 at
-inf), and once with a float64 NumPy reference of the closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses
from distill_jax.losses import chunked as cl


def _chunked_kl_sum(hs, es, bs, ht, et, bt, where=None, *, temperature, chunk_size):
    """Pure KD: the chunked distillation loss at alpha=0 (its label term dropped)."""
    labels = jnp.ones(jnp.shape(hs)[:-1], jnp.int32)
    return cl.chunked_distill_loss_sum(
        hs,
        es,
        bs,
        ht,
        et,
        bt,
        labels,
        where,
        temperature=temperature,
        alpha=0.0,
        chunk_size=chunk_size,
    )


N, D_S, D_T = 11, 6, 10
V1 = 37  # V + 1 rows: not a multiple of any chunk size used below
TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(seed=0, lead=(N,), rows=V1):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    inputs = dict(
        hs=normal(*lead, D_S),
        es=normal(rows, D_S),
        bs=normal(rows),
        ht=normal(*lead, D_T),
        et=normal(rows, D_T),
        bt=normal(rows),
        labels=rng.integers(1, rows, size=lead).astype(np.int32),
        where=rng.random(lead) < 0.7,
    )
    where = inputs["where"]
    where.flat[0], where.flat[-1] = True, False  # at least one valid, one masked
    # Garbage at masked positions must not change values or gradients.
    inputs["hs"][~where] = np.nan
    inputs["ht"][~where] = np.inf
    inputs["labels"][~where] = -1
    return inputs


def full_logits(h, table, bias):
    """The plain form, as SequenceRecommender.logits computes it."""
    z = jnp.einsum("...d,vd->...v", h, table)
    if bias is not None:
        z = z + bias
    return jnp.where(jnp.arange(table.shape[0]) == 0, -jnp.inf, z)


def assert_trees_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **TOL)


# --------------------------------------------------------------------------
# Against the plain losses on full logits.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_cross_entropy_matches_plain(chunk_size):
    x = make_inputs()

    def chunked(h, e, b):
        return cl.chunked_cross_entropy_sum(
            h, e, b, x["labels"], x["where"], chunk_size=chunk_size
        )[0]

    def plain(h, e, b):
        # The plain loss zeroes masked rows' logits; give it clean hidden states
        # so autodiff of the matmul cannot turn the NaN garbage into NaN grads.
        h = jnp.where(x["where"][:, None], h, 0)
        return losses.cross_entropy_sum(full_logits(h, e, b), x["labels"], where=x["where"])[0]

    args = (x["hs"], x["es"], x["bs"])
    assert_trees_close(
        jax.value_and_grad(chunked, argnums=(0, 1, 2))(*args),
        jax.value_and_grad(plain, argnums=(0, 1, 2))(*args),
    )


@pytest.mark.parametrize("temperature, chunk_size", [(1.0, 8), (2.5, 5)])
def test_kl_matches_plain(temperature, chunk_size):
    x = make_inputs(seed=1)
    valid = x["where"][:, None]
    ht = np.where(valid, x["ht"], 0)

    def chunked(h, e, b, ht):
        return _chunked_kl_sum(
            h, e, b, ht, x["et"], None, x["where"], temperature=temperature, chunk_size=chunk_size
        )[0]

    def plain(h, e, b, ht):
        s = full_logits(jnp.where(valid, h, 0), e, b)
        t = full_logits(ht, x["et"], None)
        return losses.kl_distill_sum(s, t, temperature=temperature, where=x["where"])[0]

    args = (x["hs"], x["es"], x["bs"], ht)
    got = jax.value_and_grad(chunked, argnums=(0, 1, 2, 3))(*args)
    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(*args)
    assert_trees_close(got[0], want[0])
    assert_trees_close(got[1][:3], want[1])
    # The teacher gets no gradient.
    np.testing.assert_array_equal(got[1][3], 0)


@pytest.mark.parametrize(
    "temperature, alpha, chunk_size", [(1.0, 0.3, 8), (2.5, 0.6, 16), (0.7, 0.0, 7), (2.0, 1.0, 64)]
)
def test_distill_matches_plain(temperature, alpha, chunk_size):
    x = make_inputs(seed=2)
    valid = x["where"][:, None]
    ht = np.where(valid, x["ht"], 0)

    def chunked(h, e, b, a):
        return cl.chunked_distill_loss_sum(
            h,
            e,
            b,
            ht,
            x["et"],
            x["bt"],
            x["labels"],
            x["where"],
            temperature=temperature,
            alpha=a,
            chunk_size=chunk_size,
        )[0]

    def plain(h, e, b, a):
        s = full_logits(jnp.where(valid, h, 0), e, b)
        t = full_logits(ht, x["et"], x["bt"])
        return losses.distill_loss_sum(
            s, t, x["labels"], temperature=temperature, alpha=a, where=x["where"]
        )[0]

    args = (x["hs"], x["es"], x["bs"], jnp.float32(alpha))
    got = jax.value_and_grad(chunked, argnums=(0, 1, 2, 3))(*args)
    want = jax.value_and_grad(plain, argnums=(0, 1, 2, 3))(*args)
    assert_trees_close(got[0], want[0])
    assert_trees_close(got[1][:3], want[1][:3])
    # d/dalpha = CE − T²·KL is a difference of sums of order N: relative tolerance.
    np.testing.assert_allclose(got[1][3], want[1][3], rtol=1e-5)


# --------------------------------------------------------------------------
# Against a float64 NumPy reference (closed form, no autodiff).
# --------------------------------------------------------------------------


def np_log_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def test_distill_matches_float64_numpy_reference():
    x = make_inputs(seed=3)
    temperature, alpha = 2.0, 0.25
    valid = x["where"]
    f64 = {k: np.asarray(v, np.float64) for k, v in x.items() if k not in ("labels", "where")}
    hs = np.where(valid[:, None], f64["hs"], 0)
    ht = np.where(valid[:, None], f64["ht"], 0)
    s = hs @ f64["es"].T + f64["bs"]
    t = ht @ f64["et"].T + f64["bt"]
    s[:, 0] = t[:, 0] = -np.inf
    labels = np.where(valid, x["labels"], 1)
    ce = -np.take_along_axis(np_log_softmax(s), labels[:, None], axis=-1)[:, 0]
    log_p, log_q = np_log_softmax(t / temperature), np_log_softmax(s / temperature)
    p = np.exp(log_p)
    support = p > 0  # 0·log 0 = 0 on the padding column
    kl = np.zeros_like(p)
    kl[support] = p[support] * (log_p[support] - log_q[support])
    kl = kl.sum(-1)
    rows = alpha * ce + (1 - alpha) * temperature**2 * kl
    want_value = np.sum(rows[valid])
    grad_z = alpha * (np.exp(np_log_softmax(s)) - np.eye(V1)[labels]) + (
        1 - alpha
    ) * temperature * (np.exp(log_q) - p)
    grad_z = np.where(valid[:, None], grad_z, 0)
    want_grads = (grad_z @ f64["es"], grad_z.T @ hs, grad_z.sum(0))

    def chunked(h, e, b):
        return cl.chunked_distill_loss_sum(
            h,
            e,
            b,
            x["ht"],
            x["et"],
            x["bt"],
            x["labels"],
            valid,
            temperature=temperature,
            alpha=alpha,
            chunk_size=10,
        )

    value, count = chunked(x["hs"], x["es"], x["bs"])
    grads = jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1, 2))(x["hs"], x["es"], x["bs"])
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    assert count == valid.sum()
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, **TOL)


# --------------------------------------------------------------------------
# Shapes, jit, means, errors.
# --------------------------------------------------------------------------


def test_jit_and_leading_shape():
    x = make_inputs(seed=4, lead=(3, 5))

    def loss(h, e, b):
        return cl.chunked_distill_loss(
            h,
            e,
            b,
            x["ht"],
            x["et"],
            x["bt"],
            x["labels"],
            x["where"],
            temperature=1.5,
            alpha=0.5,
            chunk_size=8,
        )

    args = (x["hs"], x["es"], x["bs"])
    eager = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    assert_trees_close(jitted, eager)
    flat = make_inputs(seed=4, lead=(15,))
    flat_value = cl.chunked_distill_loss(
        flat["hs"],
        flat["es"],
        flat["bs"],
        flat["ht"],
        flat["et"],
        flat["bt"],
        flat["labels"],
        flat["where"],
        temperature=1.5,
        alpha=0.5,
        chunk_size=8,
    )
    np.testing.assert_allclose(eager[0], flat_value, rtol=1e-6)
    assert eager[1][0].shape == (3, 5, D_S)


def test_all_masked_mean_is_zero_with_zero_gradients():
    x = make_inputs(seed=5)
    where = np.zeros(N, bool)

    def loss(h, e):
        return cl.chunked_cross_entropy(h, e, None, x["labels"], where, chunk_size=8)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x["hs"], x["es"])
    assert value == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, 0)


def test_bad_arguments_name_what_was_expected():
    x = make_inputs()
    with pytest.raises(ValueError, match="table has width D=6"):
        cl.chunked_cross_entropy_sum(x["ht"], x["es"], None, x["labels"], chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        cl.chunked_cross_entropy_sum(x["hs"], x["es"], None, x["labels"], chunk_size=0)
    with pytest.raises(ValueError, match="bias must have shape"):
        cl.chunked_cross_entropy_sum(x["hs"], x["es"], x["bs"][:5], x["labels"], chunk_size=8)
    with pytest.raises(ValueError, match="table_t must have the student's V\\+1=37 rows"):
        _chunked_kl_sum(
            x["hs"], x["es"], None, x["ht"], x["et"][:10], None, temperature=1.0, chunk_size=8
        )
    with pytest.raises(ValueError, match="temperature"):
        _chunked_kl_sum(
            x["hs"], x["es"], None, x["ht"], x["et"], None, temperature=0.0, chunk_size=8
        )


# --------------------------------------------------------------------------
# Memory: the compiled loss-and-gradient must not hold [N, V] buffers.
# --------------------------------------------------------------------------


def _temp_bytes(loss, num_rows, n, d, chunk_size):
    spec = jax.ShapeDtypeStruct
    args = (
        spec((n, d), jnp.float32),
        spec((num_rows, d), jnp.float32),
        spec((num_rows,), jnp.float32),
        spec((n, d), jnp.float32),
        spec((num_rows, d), jnp.float32),
        spec((num_rows,), jnp.float32),
        spec((n,), jnp.int32),
        spec((n,), jnp.bool_),
    )
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    analysis = grad_fn.lower(*args).compile().memory_analysis()
    if analysis is None:  # pragma: no cover - depends on the backend
        pytest.skip("memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes


def test_memory_does_not_scale_with_catalogue_size():
    # Compiled only, never run: XLA's buffer assignment reports the scratch
    # ("temp") bytes the loss-and-gradient program needs.
    n, d, chunk_size = 512, 8, 1024

    def chunked(hs, es, bs, ht, et, bt, labels, where):
        return cl.chunked_distill_loss_sum(
            hs,
            es,
            bs,
            ht,
            et,
            bt,
            labels,
            where,
            temperature=2.0,
            alpha=0.5,
            chunk_size=chunk_size,
        )[0]

    def plain(hs, es, bs, ht, et, bt, labels, where):
        s, t = full_logits(hs, es, bs), full_logits(ht, et, bt)
        return losses.distill_loss_sum(s, t, labels, temperature=2.0, alpha=0.5, where=where)[0]

    small, large = 10_001, 100_001
    logits_growth = n * (large - small) * 4  # one more float32 [N, V] buffer
    chunked_small = _temp_bytes(chunked, small, n, d, chunk_size)
    chunked_large = _temp_bytes(chunked, large, n, d, chunk_size)
    plain_small = _temp_bytes(plain, small, n, d, chunk_size)
    plain_large = _temp_bytes(plain, large, n, d, chunk_size)
    # The plain form holds at least one [N, V] buffer, so it grows by at least one.
    assert plain_large - plain_small >= logits_growth
    # The chunked form grows only by table-sized (V·D) buffers: the padded tables
    # and the stacked table gradient, here D/N = 1/64 of a logits buffer each.
    assert chunked_large - chunked_small < 0.1 * logits_growth
    assert chunked_large < 0.25 * n * large * 4
