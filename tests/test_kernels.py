"""Tests for the fused CPU kernel (distill_jax/losses/cpu_kernel.py) against float64 NumPy.

The kernel is built with the system C++ compiler on first use; without one
these tests skip (the plain loss needs no compiler).
"""

import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_jax import losses, models
from distill_jax import sharding as sharding_lib
from distill_jax.data import preprocess
from distill_jax.data import synthetic as synthetic_data
from distill_jax.data.pipeline import TrainBatches
from distill_jax.losses import cpu_kernel
from distill_jax.losses import kernel_lib as kernels
from distill_jax.train import state as state_lib
from distill_jax.train import steps
from tests import test_train  # its tiny config and step runner

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler to build distill_jax/losses/distill_rows.cc",
)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_reference(s, t, labels, valid, labelled, temperature, alpha):
    """Per-row ce, kl and d(alpha·labelled·ce + (1-alpha)·T²·kl)/ds, float64."""
    ls, lst, ltt = (
        np_log_softmax(s),
        np_log_softmax(s / temperature),
        np_log_softmax(t / temperature),
    )
    p = np.exp(ltt)
    with np.errstate(invalid="ignore"):
        kl = np.where(p > 0, p * (ltt - lst), 0.0).sum(-1)
    rows = np.arange(s.shape[0])
    ce = -ls[rows, np.clip(labels, 0, s.shape[1] - 1)]
    onehot = np.eye(s.shape[1])[np.clip(labels, 0, s.shape[1] - 1)]
    grad = alpha * labelled[:, None] * (np.exp(ls) - onehot) + (1 - alpha) * temperature * (
        np.exp(lst) - p
    )
    grad = np.where(valid[:, None], grad, 0.0)
    return np.where(labelled, ce, 0.0), np.where(valid, kl, 0.0), grad


def random_rows(rows, items, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    s = (scale * rng.normal(size=(rows, items))).astype(np.float32)
    t = (scale * rng.normal(size=(rows, items))).astype(np.float32)
    s[:, 0] = t[:, 0] = -np.inf  # the padding column
    t[:, 5] = -np.inf  # an item the teacher masks: p = 0 there
    labels = rng.integers(1, items, rows).astype(np.int32)
    valid = rng.random(rows) > 0.2
    labelled = valid & (rng.random(rows) > 0.3)
    # Masked rows may hold anything: NaN logits and a -1 label.
    s[~valid] = np.nan
    labels[~valid] = -1
    return s, t, labels, valid, labelled


# 37 rows run on one thread, 203 on several; 1,003 items leave a tail after
# the 8-wide vector loops.
@pytest.mark.parametrize("rows", [37, 203])
@pytest.mark.parametrize(
    "temperature,alpha", [(1.0, 0.0), (1.0, 0.5), (2.5, 0.3), (0.7, 1.0), (4.0, 0.0)]
)
def test_distill_rows_matches_float64_reference(rows, temperature, alpha):
    s, t, labels, valid, labelled = random_rows(rows, 1003, seed=rows)
    # Biases added inside the kernel, and column 0 masked by it: the raw
    # products may hold anything there.
    rng = np.random.default_rng(rows + 1)
    b_s, b_t = rng.normal(size=(2, 1003)).astype(np.float32)
    s_raw, t_raw = s - b_s, t - b_t
    s_raw[valid, 0] = t_raw[:, 0] = 7.0

    def rows_fn(s_raw, t_raw, with_grad):
        return kernels.distill_rows(
            s_raw,
            b_s,
            t_raw,
            b_t,
            labels,
            valid,
            labelled,
            temperature,
            alpha,
            mask_first=True,
            with_grad=with_grad,
        )

    ce, kl, grad, col = jax.jit(rows_fn, static_argnums=2)(s_raw, t_raw, True)
    chex.assert_shape((ce, kl), (rows,))
    chex.assert_shape(grad, (rows, 1003))
    chex.assert_shape(col, (1003,))
    ce_ref, kl_ref, grad_ref = np_reference(s, t, labels, valid, labelled, temperature, alpha)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(col, grad_ref.sum(0), rtol=1e-4, atol=1e-5)
    # The stats-only target returns the same rows.
    ce2, kl2 = rows_fn(s_raw, t_raw, False)
    np.testing.assert_array_equal(ce2, ce)
    np.testing.assert_array_equal(kl2, kl)


# Rows not a multiple of the kernel's 4-row blocks (37, 203 on several
# threads), widths 1, 5 and 16, and 1,003 items (a tail after the 8-wide
# vector loops).
@pytest.mark.parametrize("rows,dim", [(37, 5), (203, 16), (6, 1)])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.5, 0.3), (0.7, 0.0)])
def test_distill_rows_hidden_matches_float64_reference(rows, dim, temperature, alpha):
    """The student's logits and backward products computed in the kernel."""
    items = 1003
    rng = np.random.default_rng(rows + dim)
    h = rng.normal(size=(rows, dim)).astype(np.float32)
    table = rng.normal(size=(items, dim)).astype(np.float32)
    b_s, b_t = rng.normal(size=(2, items)).astype(np.float32)
    _, t, labels, valid, labelled = random_rows(rows, items, seed=rows)
    h[~valid] = np.nan  # masked rows may hold anything
    s = h.astype(np.float64) @ table.T.astype(np.float64) + b_s
    s[:, 0] = -np.inf  # the padding column, masked by the kernel
    t_raw = t - b_t
    t_raw[:, 0] = 7.0

    def rows_fn(h, table, with_grad):
        return kernels.distill_rows_hidden(
            h,
            table,
            b_s,
            t_raw,
            b_t,
            labels,
            valid,
            labelled,
            temperature,
            alpha,
            mask_first=True,
            with_grad=with_grad,
        )

    ce, kl, d_h, d_table, col = jax.jit(rows_fn, static_argnums=2)(h, table, True)
    chex.assert_shape((ce, kl), (rows,))
    chex.assert_shape(d_h, (rows, dim))
    chex.assert_shape(d_table, (items, dim))
    chex.assert_shape(col, (items,))
    ce_ref, kl_ref, grad_ref = np_reference(s, t, labels, valid, labelled, temperature, alpha)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-5, atol=1e-5)
    # The logits' gradient is never stored: its products are returned.
    h_valid = np.where(valid[:, None], h, 0.0).astype(np.float64)
    np.testing.assert_allclose(d_h, grad_ref @ table, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_table, grad_ref.T @ h_valid, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(col, grad_ref.sum(0), rtol=1e-4, atol=1e-5)
    ce2, kl2 = rows_fn(h, table, False)
    np.testing.assert_array_equal(ce2, ce)
    np.testing.assert_array_equal(kl2, kl)


def test_distill_rows_hidden_width_mismatch_is_refused():
    zeros = np.zeros(7, np.float32)
    rows = np.zeros((3, 7), np.float32)
    ones = np.ones(3, bool)
    with pytest.raises(ValueError, match=r"hidden states \[3, 4\] and table \[7, 5\]"):
        kernels.distill_rows_hidden(
            np.zeros((3, 4), np.float32),
            np.zeros((7, 5), np.float32),
            zeros,
            rows,
            zeros,
            np.ones(3, np.int32),
            ones,
            ones,
            1.0,
            0.5,
            mask_first=True,
            with_grad=False,
        )


def test_distill_rows_extreme_logits():
    """Rows far below the float range of exp, and one-hot teachers, stay exact."""
    rows, items = 4, 300
    rng = np.random.default_rng(1)
    s = rng.normal(size=(rows, items)).astype(np.float32)
    t = rng.normal(size=(rows, items)).astype(np.float32)
    s[0] *= 500.0  # most entries underflow to 0 after the shift
    t[1] = -np.inf
    t[1, 7] = 2.0  # the teacher puts all its mass on item 7
    s[2] += 1e4  # a large offset: the shift by the row maximum removes it
    labels = np.array([3, 7, 9, 11], np.int32)
    ones = np.ones(rows, bool)
    zeros = np.zeros(items, np.float32)
    ce, kl, grad, _ = kernels.distill_rows(
        s, zeros, t, zeros, labels, ones, ones, 1.0, 0.5, mask_first=False, with_grad=True
    )
    ce_ref, kl_ref, grad_ref = np_reference(s, t, labels, ones, ones, 1.0, 0.5)
    assert np.all(np.isfinite(kl)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_distill_loss_cpu_kernel_equals_xla(temperature, alpha, dtype):
    """Same loss, gradient (student logits and alpha) through either impl."""
    rng = np.random.default_rng(2)
    shape = (3, 11, 257)
    s = jnp.asarray(rng.normal(size=shape), dtype)
    t = jnp.asarray(rng.normal(size=shape), dtype)
    s = s.at[..., 0].set(-jnp.inf)
    t = t.at[..., 0].set(-jnp.inf)
    labels = jnp.asarray(rng.integers(1, shape[-1], shape[:-1]))
    where = jnp.asarray(rng.random(shape[:-1]) > 0.25)
    label_where = where & jnp.asarray(rng.random(shape[:-1]) > 0.3)

    def loss(s, a, impl):
        return losses.distill_loss(
            s,
            t,
            labels,
            temperature=temperature,
            alpha=a,
            where=where,
            label_where=label_where,
            impl=impl,
        )

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (v_x, (g_x, ga_x)) = grad_fn(s, jnp.float32(alpha), "xla")
    (v_k, (g_k, ga_k)) = grad_fn(s, jnp.float32(alpha), "cpu_kernel")
    assert g_k.dtype == s.dtype and v_k.dtype == v_x.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(v_k, v_x, rtol=tol)
    np.testing.assert_allclose(ga_k, ga_x, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.asarray(g_k, np.float32), np.asarray(g_x, np.float32), rtol=tol, atol=tol * 1e-2
    )


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (3.0, 0.0)])
def test_kernel_distill_loss_from_hidden_equals_plain(temperature, alpha):
    """Value and gradients (h, table, bias, alpha) equal the plain loss on full logits."""
    rng = np.random.default_rng(4)
    items, d_s, d_t, shape = 301, 5, 12, (4, 9)
    h_s = jnp.asarray(rng.normal(size=(*shape, d_s)), jnp.float32)
    table_s = jnp.asarray(rng.normal(size=(items, d_s)), jnp.float32)
    bias_s = jnp.asarray(rng.normal(size=(items,)), jnp.float32)
    h_t = jnp.asarray(rng.normal(size=(*shape, d_t)), jnp.float32)
    table_t = jnp.asarray(rng.normal(size=(items, d_t)), jnp.float32)
    bias_t = jnp.asarray(rng.normal(size=(items,)), jnp.float32)
    labels = jnp.asarray(rng.integers(1, items, shape))
    where = jnp.asarray(rng.random(shape) > 0.2)
    label_where = where & jnp.asarray(rng.random(shape) > 0.3)
    padding = jnp.arange(items) == 0

    def plain(h, table, bias, a):
        s = jnp.where(padding, -jnp.inf, h @ table.T + bias)
        t = jnp.where(padding, -jnp.inf, h_t @ table_t.T + bias_t)
        return losses.distill_loss(
            s, t, labels, temperature=temperature, alpha=a, where=where, label_where=label_where
        )

    def kernel(h, table, bias, a):
        return cpu_kernel.kernel_distill_loss(
            h,
            table,
            bias,
            h_t,
            table_t,
            bias_t,
            labels,
            where,
            label_where,
            temperature=temperature,
            alpha=a,
        )

    args = (h_s, table_s, bias_s, jnp.float32(alpha))
    v_p, g_p = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2, 3)))(*args)
    v_k, g_k = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(v_k, v_p, rtol=1e-5)
    chex.assert_trees_all_close(g_k, g_p, rtol=1e-4, atol=1e-6)
    # The teacher's tower gets no gradient.
    g_teacher = jax.grad(
        lambda ht, tt, bt: cpu_kernel.kernel_distill_loss(
            h_s, table_s, bias_s, ht, tt, bt, labels, where, temperature=temperature, alpha=alpha
        ),
        argnums=(0, 1, 2),
    )(h_t, table_t, bias_t)
    for g in g_teacher:
        np.testing.assert_array_equal(g, 0.0)


def test_distill_loss_cpu_kernel_nothing_valid_is_zero():
    s = jnp.full((2, 5, 30), jnp.nan)
    labels = jnp.zeros((2, 5), jnp.int32)
    where = jnp.zeros((2, 5), bool)
    value, grad = jax.value_and_grad(
        lambda s: losses.distill_loss(
            s, s, labels, temperature=1.0, alpha=0.5, where=where, impl="cpu_kernel"
        )
    )(s)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl='fused'"):
        losses.distill_loss(
            jnp.zeros((2, 3)),
            jnp.zeros((2, 3)),
            jnp.zeros(2, int),
            temperature=1.0,
            alpha=0.5,
            impl="fused",
        )


def test_missing_compiler_names_the_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-for-distill-jax")
    monkeypatch.setenv("DISTILL_JAX_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(kernels.KernelBuildError, match=r"loss\.form='cpu_kernel'.*\$CXX"):
        kernels.library_path()


# The distill step through the kernel against dense, two optimiser steps with
# and without seen-item exclusion and teacher-only slots:
# test_train_steps_through_the_kernel_equal_dense below.


# --------------------------------------------------------------------------
# Cross-entropy through the kernel (teachers, students trained alone, the
# teacher's top-k): no teacher, K labels, seen ids left out.
# --------------------------------------------------------------------------


def np_cross_entropy(h, table, bias, labels, valid, seen):
    """Per-row ce and d(ce)/d(logits), float64; labels [N, K] of weight 1/K each."""
    z = h.astype(np.float64) @ table.T.astype(np.float64) + bias
    z[:, 0] = -np.inf
    if seen is not None:
        for r in range(z.shape[0]):
            z[r, seen[r][seen[r] > 0]] = -np.inf
    log_q = np_log_softmax(np.where(valid[:, None], z, 0.0))
    rows = np.arange(z.shape[0])
    target = np.zeros_like(z)
    for k in range(labels.shape[1]):
        target[rows, np.clip(labels[:, k], 0, z.shape[1] - 1)] += 1.0 / labels.shape[1]
    with np.errstate(invalid="ignore"):  # 0 · -inf off the targets, discarded
        ce = -np.sum(np.where(target > 0, target * log_q, 0.0), axis=-1)
    grad = np.where(valid[:, None], np.exp(log_q) - target, 0.0)
    return np.where(valid, ce, 0.0), grad


def ce_rows(rows, items, dim, k, exclude, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(rows, dim)).astype(np.float32)
    table = rng.normal(size=(items, dim)).astype(np.float32)
    bias = rng.normal(size=items).astype(np.float32)
    labels = rng.integers(1, items, (rows, k)).astype(np.int32)
    valid = rng.random(rows) > 0.2
    # Masked rows may hold anything: NaN hidden states and label -1.
    h[~valid] = np.nan
    labels[~valid] = -1
    seen = None
    if exclude:
        seen = rng.integers(0, items, (rows, 6)).astype(np.int32)
        seen[:, 2] = seen[:, 1]  # an id listed twice
        for r in range(rows):  # never a row's own label
            seen[r][np.isin(seen[r], labels[r])] = 0
    return h, table, bias, labels, valid, seen


@pytest.mark.parametrize("rows,dim", [(37, 5), (203, 16), (6, 1)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("exclude", [False, True])
def test_cross_entropy_rows_hidden_matches_float64_reference(rows, dim, k, exclude):
    h, table, bias, labels, valid, seen = ce_rows(rows, 1003, dim, k, exclude, seed=rows + k)

    def rows_fn(h, table, with_grad):
        return kernels.cross_entropy_rows_hidden(
            h,
            table,
            bias,
            labels if k > 1 else labels[:, 0],
            valid,
            mask_first=True,
            with_grad=with_grad,
            seen=seen,
        )

    ce, d_h, d_table, col = jax.jit(rows_fn, static_argnums=2)(h, table, True)
    chex.assert_shape(ce, (rows,))
    chex.assert_shape(d_h, (rows, dim))
    chex.assert_shape(d_table, (1003, dim))
    ce_ref, grad_ref = np_cross_entropy(h, table, bias, labels, valid, seen)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
    h_valid = np.where(valid[:, None], h, 0.0).astype(np.float64)
    np.testing.assert_allclose(d_h, grad_ref @ table, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_table, grad_ref.T @ h_valid, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(col, grad_ref.sum(0), rtol=1e-4, atol=1e-5)
    (ce2,) = rows_fn(h, table, False)
    np.testing.assert_array_equal(ce2, ce)


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_kernel_cross_entropy_value_and_gradients_match_float64(exclude, k):
    """The loss (mean over valid positions) and its gradients: hidden, table, bias."""
    h, table, bias, labels, valid, seen = ce_rows(45, 301, 7, k, exclude, seed=11)
    shape = (5, 9)  # positions as [B, S]: the loss flattens them

    def loss(h, table, bias):
        return cpu_kernel.kernel_cross_entropy(
            h.reshape(*shape, -1),
            table,
            bias,
            labels.reshape(*shape, k) if k > 1 else labels.reshape(shape),
            valid.reshape(shape),
            seen=None if seen is None else seen.reshape(*shape, -1),
        )

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(h, table, bias)
    ce_ref, grad_ref = np_cross_entropy(h, table, bias, labels, valid, seen)
    count = valid.sum()
    np.testing.assert_allclose(value, ce_ref.sum() / count, rtol=1e-5)
    h_valid = np.where(valid[:, None], h, 0.0).astype(np.float64)
    want = (grad_ref @ table / count, grad_ref.T @ h_valid / count, grad_ref.sum(0) / count)
    for got, ref, name in zip(grads, want, ("d_hidden", "d_table", "d_bias"), strict=True):
        got = np.where(valid[:, None], got, 0.0) if name == "d_hidden" else got
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6, err_msg=name)
    # Masked rows get a zero gradient (not NaN), whatever they hold.
    np.testing.assert_array_equal(np.asarray(grads[0])[~valid], 0.0)


def test_kernel_cross_entropy_equals_the_dense_form_in_bfloat16():
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.normal(size=(3, 11, 6)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(257, 6)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=257), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(1, 257, (3, 11)))
    where = jnp.asarray(rng.random((3, 11)) > 0.25)
    padding = jnp.arange(257) == 0

    def dense(h, table, bias):
        z = jnp.einsum("bsd,vd->bsv", h, table, preferred_element_type=jnp.float32)
        z = jnp.where(padding, -jnp.inf, z + bias.astype(jnp.float32))
        return losses.cross_entropy(z, labels, where=where)

    def kernel(h, table, bias):
        return cpu_kernel.kernel_cross_entropy(h, table, bias, labels, where)

    v_d, g_d = jax.value_and_grad(dense, argnums=(0, 1, 2))(h, table, bias)
    v_k, g_k = jax.value_and_grad(kernel, argnums=(0, 1, 2))(h, table, bias)
    np.testing.assert_allclose(v_k, v_d, rtol=1e-5)
    for a, b in zip(g_k, g_d, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2)


def test_kernel_cross_entropy_nothing_valid_is_zero_and_a_bad_label_is_nan():
    h = jnp.full((4, 3), jnp.nan)
    table = jnp.ones((9, 3))
    where = jnp.zeros(4, bool)
    value, grad = jax.value_and_grad(
        lambda h: cpu_kernel.kernel_cross_entropy(h, table, None, -jnp.ones(4, int), where)
    )(h)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    # A valid slot whose label is no item (outside [0, V)) is not silently dropped.
    bad = cpu_kernel.kernel_cross_entropy(
        jnp.ones((2, 3)), table, None, jnp.array([3, 9]), jnp.ones(2, bool)
    )
    assert np.isnan(float(bad))


def _two_steps(
    config, split, form, task, *, exclude_history=False, mesh_shape=(1, 1), vocab_axis=None
):
    """Two steps of `task` in `form` on a mesh of `mesh_shape`, the item table split
    along `vocab_axis` (None: whole on every device): (losses, params)."""
    config.mesh.data, config.mesh.model = mesh_shape
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[: np.prod(mesh_shape)])
    rules = tuple((n, vocab_axis if n == "vocab" else a) for n, a in sharding_lib.rules(config))
    student = models.build_model(config.student, num_items=split.num_items, max_len=16)
    state, shard = state_lib.create_state(student, config.student, mesh, rules, jax.random.key(1))
    teacher = t_params = t_shard = None
    if task == "distill":
        teacher = models.build_model(config.teacher, num_items=split.num_items, max_len=16)
        t_state, t_sh = state_lib.create_state(
            teacher, config.teacher, mesh, rules, jax.random.key(2)
        )
        t_params, t_shard = t_state.params, t_sh.params
    step = steps.make_train_step(
        student,
        task=task,
        mesh=mesh,
        state_shardings=shard,
        teacher=teacher,
        teacher_shardings=t_shard,
        distill_cfg=config.distill,
        loss_cfg=ml_collections.ConfigDict(dict(form=form, chunk_size=16)),
        exclude_history=exclude_history,
        vocab_shards=1 if vocab_axis is None else mesh.shape[vocab_axis],
    )
    assert step.loss_form == form
    batches = TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=16,
        batch_size=config.student.batch_size,
        causal=student.is_causal,
        mask_prob=0.3,
        seed=0,
        # The same packing on every mesh: identical batches, comparable losses.
        num_shards=8,
        last_item_slot=task == "distill" and config.distill.last_item_slot,
    )
    out = []
    for i in range(2):
        batch = sharding_lib.put_batch(batches.batch(i), mesh)
        state, metrics = step(state, t_params, batch, jax.random.key(3))
        out.append(float(metrics["loss"]))
    return out, jax.device_get(state.params)


@pytest.mark.parametrize(
    "name,task,method,exclude,slots",
    [
        ("sasrec", "train", None, True, False),  # a student alone, seen items left out
        ("bert4rec", "train", None, False, False),  # masked positions
        ("sasrec", "distill", "soft", True, True),
        ("bert4rec", "distill", "hard", False, False),
        # (hard with exclusion and slots: test_the_kernel_on_any_mesh_equals_one_device.)
    ],
)
def test_train_steps_through_the_kernel_equal_dense(name, task, method, exclude, slots):
    """Two steps (AdamW included): the dense form's losses and parameters."""
    config = test_train._config()
    config.teacher.name = config.student.name = name
    config.distill.update(temperature=2.0, alpha=0.3, hard_k=3, last_item_slot=slots)
    if method:
        config.distill.method = method
    split = preprocess.leave_one_out(synthetic_data.generate(config.data.synthetic, config.seed))
    out = {
        form: _two_steps(config, split, form, task, exclude_history=exclude)
        for form in ("dense", "cpu_kernel")
    }
    np.testing.assert_allclose(out["cpu_kernel"][0], out["dense"][0], rtol=1e-5)
    chex.assert_trees_all_close(out["cpu_kernel"][1], out["dense"][1], rtol=1e-4, atol=1e-5)


# Each target on a data-parallel mesh and on a vocab-sharded one (the pairs
# the loss-level test below does not reach: the optimiser step, the packing).
@pytest.mark.parametrize(
    "task,method,exclude,slots,mesh_shape,vocab_axis",
    [
        ("train", None, True, False, (8, 1), None),
        ("train", None, True, False, (2, 4), "model"),
        ("distill", "soft", True, True, (2, 4), None),
        ("distill", "soft", True, True, (4, 2), "model"),
        ("distill", "hard", False, True, (2, 4), "model"),
    ],
)
def test_the_kernel_on_any_mesh_equals_one_device(
    task, method, exclude, slots, mesh_shape, vocab_axis
):
    """Rows split along 'data' (each device runs the kernel on its own), the table
    whole on each (its gradients summed) or split along 'model' (blocks combined):
    two steps give the one-device dense form's losses and params."""
    assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
    config = test_train._config()
    config.distill.update(temperature=2.0, alpha=0.3, hard_k=2, last_item_slot=slots)
    if method:
        config.distill.method = method
    split = preprocess.leave_one_out(synthetic_data.generate(config.data.synthetic, config.seed))
    want = _two_steps(config, split, "dense", task, exclude_history=exclude)
    got = _two_steps(
        config,
        split,
        "cpu_kernel",
        task,
        exclude_history=exclude,
        mesh_shape=mesh_shape,
        vocab_axis=vocab_axis,
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_kernel_losses_on_any_mesh_equal_one_device(mesh_shape):
    """The loss functions themselves under jax.set_mesh: values and gradients (the
    item axis of 301 rows, 297 of them items, padded to the 'model' axis inside)."""
    h, table, bias, labels, valid, seen = ce_rows(48, 297, 7, 2, True, seed=3)
    h = np.where(valid[:, None], h, 0.0).astype(np.float32)
    rng = np.random.default_rng(4)
    # Four rows past the catalogue (a padded table's): never scored.
    table = np.concatenate([table, rng.normal(size=(4, 7)).astype(np.float32)])
    bias = np.concatenate([bias, rng.normal(size=4).astype(np.float32)])
    h_t = rng.normal(size=(48, 5)).astype(np.float32)
    table_t = rng.normal(size=(301, 5)).astype(np.float32)
    label_where = valid & (rng.random(48) > 0.3)

    def both(h, table, bias, alpha):
        ce = cpu_kernel.kernel_cross_entropy(
            h, table, bias, labels[:, 0], valid, seen=seen, num_valid_rows=297
        )
        top2 = cpu_kernel.kernel_cross_entropy(h, table, bias, labels, valid, num_valid_rows=297)
        kd = cpu_kernel.kernel_distill_loss(
            h,
            table,
            bias,
            h_t,
            table_t,
            None,
            labels[:, 0],
            valid,
            label_where,
            temperature=1.5,
            alpha=alpha,
            seen=seen,
            num_valid_rows=297,
        )
        return ce + 0.5 * top2 + 2.0 * kd

    fn = jax.jit(jax.value_and_grad(both, argnums=(0, 1, 2, 3)))
    v1, g1 = fn(h, table, bias, 0.3)
    mesh = sharding_lib.make_mesh(
        ml_collections.ConfigDict(dict(data=mesh_shape[0], model=mesh_shape[1]))
    )
    with jax.set_mesh(mesh):
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        v8, g8 = fn(jax.device_put(h, rows), table, bias, 0.3)
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    chex.assert_trees_all_close(g8, g1, rtol=1e-5, atol=1e-6)
    if mesh_shape[0] > 1:
        with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"47 rows .* 'data' of size"):
            cpu_kernel.kernel_cross_entropy(h[:47], table, bias, labels[:47, 0], valid[:47])


def test_the_kernels_sums_over_rows_are_the_same_on_every_call():
    """The table's and bias's gradients are sums over rows shared out between
    threads; they are added up in a fixed order, so a resumed run repeats an
    uninterrupted one bit for bit."""
    h, table, bias, labels, valid, seen = ce_rows(997, 1003, 16, 1, True, seed=8)
    h = np.where(valid[:, None], h, 0.0).astype(np.float32)
    fn = jax.jit(
        lambda h, table, bias: kernels.cross_entropy_rows_hidden(
            h, table, bias, labels[:, 0], valid, mask_first=True, with_grad=True, seen=seen
        )
    )
    first = jax.device_get(fn(h, table, bias))
    for _ in range(12):
        for a, b in zip(jax.device_get(fn(h, table, bias)), first, strict=True):
            np.testing.assert_array_equal(a, b)
