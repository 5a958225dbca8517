"""Every (target, form) pair of `losses.PAIRS`, with every option it supports,
against one float64 NumPy reference: loss values and gradients with respect to
the student's hidden states, item table and bias. The cases are generated from
the table, so a new pair is tested by adding its line."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_jax import losses
from distill_jax import sharding as sharding_lib
from distill_jax.losses import cached as cached_lib
from distill_jax.losses import kernel_lib
from tests.test_ranking import reference_rows as ranking_reference

N, D, DT, ROWS, VALID_ROWS, S = 12, 5, 7, 24, 23, 4
CACHE_K = 4  # the 'cached' target: teacher items stored per slot
SETTINGS = {
    "temperature": 1.7,
    "alpha": 0.3,
    "k": 2,
    "chunk_size": 8,
    "ranking_k": 3,
    "ranking_loss": "rrd",
    "ranking_lambda": 2.0,
}


def _cases():
    for (target, form), pair in sorted(losses.PAIRS.items()):
        options = []
        if pair.exclude_history:
            options.append("exclude")
        if pair.teacher_only_slots and target != "label":
            options.append("slots")
        for n in range(len(options) + 1):
            for chosen in itertools.combinations(options, n):
                yield pytest.param(
                    target, form, set(chosen), id=f"{target}-{form}-{'+'.join(chosen) or 'plain'}"
                )


def _data():
    rng = np.random.default_rng(0)
    rows = ROWS
    x = {
        "h": rng.normal(size=(N, D)),
        "table": rng.normal(size=(rows, D)) * 0.7,
        "bias": rng.normal(size=rows) * 0.3,
        "ht": rng.normal(size=(N, DT)),
        "table_t": rng.normal(size=(rows, DT)) * 0.7,
        "bias_t": rng.normal(size=rows) * 0.3,
        "labels": rng.integers(1, VALID_ROWS, size=N),
        "where": np.arange(N) % 5 != 3,  # two slots without a label
    }
    # Teacher-only slots: the unlabelled slots the teacher still supervises.
    x["kd_where"] = x["where"] | (np.arange(N) == 3)
    # Already-seen ids per slot (0 = none), never the slot's own label.
    seen = rng.integers(1, VALID_ROWS, size=(N, S))
    seen[:, -1] = 0
    x["seen"] = np.where(seen == x["labels"][:, None], 0, seen)
    return x


def _masked(z, seen, num_valid):
    z = z.copy()
    z[:, 0] = -np.inf
    z[:, num_valid:] = -np.inf
    if seen is not None:
        for n in range(z.shape[0]):
            z[n, seen[n][seen[n] > 0]] = -np.inf
    return z


def _softmax(z):
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - m)
    return e / e.sum(-1, keepdims=True), m[:, 0] + np.log(e.sum(-1))


def _reference(target, x, exclude, slots, num_valid):
    """(loss, d_h, d_table, d_bias) in float64 NumPy."""
    seen = x["seen"] if exclude else None
    z = _masked(x["h"] @ x["table"].T + x["bias"], seen, num_valid)
    t = _masked(x["ht"] @ x["table_t"].T + x["bias_t"], seen, num_valid)
    where = x["where"]
    rows = x["kd_where"] if slots else where
    q, lse = _softmax(z)
    onehot = np.eye(z.shape[1])[x["labels"]]
    if target == "label":
        per_row = lse - z[np.arange(N), x["labels"]]
        grad = q - onehot
        rows = where
    elif target == "hard":
        k = SETTINGS["k"]
        top = np.argsort(-t, axis=-1, kind="stable")[:, :k]
        per_row = lse - z[np.arange(N)[:, None], top].mean(-1)
        grad = q - np.eye(z.shape[1])[top].mean(1)
    elif target == "ranking":
        alpha = SETTINGS["alpha"]
        rank, d_rank = ranking_reference(
            z, t, SETTINGS["ranking_k"], SETTINGS["ranking_loss"], SETTINGS["ranking_lambda"]
        )
        ce = lse - z[np.arange(N), x["labels"]]
        per_row = alpha * np.where(where, ce, 0) + (1 - alpha) * rank
        grad = alpha * (q - onehot) * where[:, None] + (1 - alpha) * d_rank
    elif target == "cached":
        # The KL between the K + 1 buckets: the teacher's top-K items, the rest.
        temp, alpha = SETTINGS["temperature"], SETTINGS["alpha"]
        p_t, _ = _softmax(t / temp)
        q_t, _ = _softmax(z / temp)
        top = np.argsort(-p_t, axis=-1, kind="stable")[:, :CACHE_K]
        in_top = np.zeros_like(p_t, bool)
        np.put_along_axis(in_top, top, True, axis=-1)

        def buckets(probs):  # [N, K + 1]: the top-K items, then the rest
            top_p = np.take_along_axis(probs, top, -1)
            return np.concatenate([top_p, 1 - top_p.sum(-1, keepdims=True)], -1)

        p_b, q_b = buckets(p_t), buckets(q_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p_b > 0, p_b * (np.log(p_b) - np.log(q_b)), 0).sum(-1)
        ce = lse - z[np.arange(N), x["labels"]]
        per_row = alpha * np.where(where, ce, 0) + (1 - alpha) * temp**2 * kl
        # d(T² KL)/dz_i = T·q_i·(1 − P_b/Q_b) for the bucket b holding item i.
        ratio = np.where(
            in_top,
            np.where(q_t > 0, p_t / np.where(q_t > 0, q_t, 1), 0),
            (p_b[:, -1] / q_b[:, -1])[:, None],
        )
        d_kd = temp * q_t * (1 - ratio)
        grad = alpha * (q - onehot) * where[:, None] + (1 - alpha) * d_kd
    else:
        temp, alpha = SETTINGS["temperature"], SETTINGS["alpha"]
        p_t, _ = _softmax(t / temp)
        q_t, _ = _softmax(z / temp)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p_t > 0, p_t * (np.log(p_t) - np.log(q_t)), 0).sum(-1)
        ce = lse - z[np.arange(N), x["labels"]]
        labelled = where[:, None]
        per_row = alpha * np.where(where, ce, 0) + (1 - alpha) * temp**2 * kl
        grad = alpha * (q - onehot) * labelled + (1 - alpha) * temp * (q_t - p_t)
    grad = np.where(rows[:, None], grad, 0)
    grad = np.where(np.isfinite(z), grad, 0)
    count = rows.sum()
    loss = np.where(rows, per_row, 0).sum() / count
    grad = grad / count
    return loss, grad @ x["table"], grad.T @ x["h"], grad.sum(0)


def _inputs(x, h, table, bias, exclude, slots, num_valid):
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    def logits(hh, tab, b):
        z = hh @ tab.T + b
        column = jnp.arange(tab.shape[0])
        return jnp.where((column == 0) | (column >= num_valid), -jnp.inf, z)

    ht, tt, bt = f32(x["ht"]), f32(x["table_t"]), f32(x["bias_t"])
    seen = jnp.asarray(x["seen"], jnp.int32) if exclude else None
    t_logits = logits(ht, tt, bt)
    if seen is not None:
        t_logits = losses.exclude_columns(t_logits, seen)
    stored = cached_lib.top_k_soft_labels(t_logits, CACHE_K, SETTINGS["temperature"])
    return losses.LossInputs(
        hidden=h,
        table=table,
        bias=bias,
        logits=lambda: logits(h, table, bias),
        labels=jnp.asarray(x["labels"], jnp.int32),
        where=jnp.asarray(x["where"]),
        num_valid_rows=num_valid,
        teacher_hidden=ht,
        teacher_table=tt,
        teacher_bias=bt,
        teacher_logits=lambda: logits(ht, tt, bt),
        kd_where=jnp.asarray(x["kd_where"]) if slots else None,
        seen=seen,
        cached=stored,
    )


@pytest.mark.parametrize("target,form,options", list(_cases()))
def test_pair_matches_the_float64_reference(target, form, options):
    if form == "cpu_kernel" and not kernel_lib.available():
        pytest.skip("no C++ compiler for the CPU kernel")
    exclude, slots = "exclude" in options, "slots" in options
    x = _data()
    num_valid = VALID_ROWS  # the table's last row is padding, as on a vocab-sharded mesh
    want = _reference(target, x, exclude, slots, num_valid)

    def loss(h, table, bias):
        inputs = _inputs(x, h, table, bias, exclude, slots, num_valid)
        return losses.compute(target, form, inputs, SETTINGS)

    args = tuple(jnp.asarray(x[k], jnp.float32) for k in ("h", "table", "bias"))
    # The sharded forms on a ('data', 'model') mesh too (vocab_parallel only there).
    meshes = {"vocab_parallel": [(2, 4)], "cpu_kernel": [None, (2, 4), (4, 2)]}.get(form, [None])
    for shape in meshes:
        if shape is None:
            value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
        else:
            cfg = ml_collections.ConfigDict({"data": shape[0], "model": shape[1]})
            with jax.set_mesh(sharding_lib.make_mesh(cfg)):
                value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
        np.testing.assert_allclose(float(value), want[0], rtol=2e-5, err_msg=str(shape))
        for got, ref, name in zip(grads, want[1:], ("d_hidden", "d_table", "d_bias"), strict=True):
            np.testing.assert_allclose(
                np.asarray(got), ref, rtol=2e-4, atol=2e-6, err_msg=f"{name} {shape}"
            )


def test_every_target_has_a_dense_form_and_every_form_a_label_target():
    for target in losses.TARGETS:
        assert losses.supported(target, "dense")
    for form in losses.FORMS:
        assert losses.supported("label", form)


def test_a_missing_pair_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"target 'hard' has no form 'vocab_parallel'.*dense"):
        losses.compute("hard", "vocab_parallel", None, SETTINGS)
