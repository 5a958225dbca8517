"""Ranking distillation (losses/ranking.py) against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import ranking


def reference_rows(z, t, k, loss, lam):
    """float64 (per-row loss, d loss / d z) of the ranking term; -inf columns are not items."""
    n, v = z.shape
    per_row, grad = np.zeros(n), np.zeros((n, v))
    for i in range(n):
        finite = np.isfinite(z[i])
        top = np.argsort(-np.where(finite, t[i], -np.inf), kind="stable")[:k]
        m = z[i][finite].max()
        e = np.where(finite, np.exp(z[i] - m), 0.0)
        q = e / e.sum()
        if loss == "rd":
            w = np.exp(-np.arange(1, k + 1) / lam)
            w /= w.sum()
            per_row[i] = -(w * np.log(q[top])).sum()
            grad[i] = q
            np.add.at(grad[i], top, -w)
            continue
        rest = e.sum() - e[top].sum()
        denom = np.array([e[top[j:]].sum() + rest for j in range(k)])  # D_j
        per_row[i] = -np.mean(np.log(e[top] / denom))
        # d/dz_c of -(1/k) sum_j [z_top_j - log D_j]
        for j in range(k):
            grad[i, top[j]] -= 1.0 / k
            in_d = np.zeros(v, bool)
            in_d[top[j:]] = True
            in_d[finite] |= ~np.isin(np.arange(v), top)[finite]
            grad[i] += np.where(in_d, e / denom[j], 0.0) / k
    return per_row, grad


def _data(seed=0, n=6, v=15):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, v)) * 1.5
    t = rng.normal(size=(n, v)) * 2.0
    z[:, 0] = t[:, 0] = -np.inf  # padding column
    z[1, 4] = t[1, 4] = -np.inf  # an excluded (already seen) item
    labels = rng.integers(1, v, size=n)
    labels[1] = 5
    where = np.array([True, True, True, False, True, True])
    label_where = np.array([True, False, True, True, True, True])  # row 1: ranking alone
    return z, t, labels, where, label_where


@pytest.mark.parametrize("loss", ranking.LOSSES)
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_ranking_loss_and_gradient_match_float64(loss, alpha):
    z, t, labels, where, label_where = _data()
    k, lam = 4, 2.0
    rank, d_rank = reference_rows(z, t, k, loss, lam)
    m = np.nanmax(np.where(np.isfinite(z), z, np.nan), axis=1, keepdims=True)
    e = np.where(np.isfinite(z), np.exp(z - m), 0)
    q = e / e.sum(1, keepdims=True)
    ce = -np.log(q[np.arange(len(z)), labels])
    d_ce = q - np.eye(z.shape[1])[labels]
    labelled = (where & label_where)[:, None]
    per_row = (1 - alpha) * rank + alpha * np.where(labelled[:, 0], ce, 0)
    grad = (1 - alpha) * d_rank + alpha * d_ce * labelled
    want = per_row[where].sum() / where.sum()
    want_grad = np.where(where[:, None] & np.isfinite(z), grad, 0) / where.sum()

    def f(z32):
        return ranking.ranking_distill(
            z32,
            jnp.asarray(t, jnp.float32),
            jnp.asarray(labels),
            k=k,
            loss=loss,
            lam=lam,
            alpha=alpha,
            where=jnp.asarray(where),
            label_where=jnp.asarray(label_where),
        )

    value, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(float(value), want, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(g), want_grad, rtol=2e-4, atol=1e-6)


def test_rrd_prefers_the_teachers_order_and_rd_its_items():
    v, k = 12, 4
    t = np.linspace(3, -3, v)[None]
    t[0, 0] = -np.inf
    agree = t.copy()
    reverse = t.copy()
    reverse[0, 1 : k + 1] = reverse[0, 1 : k + 1][::-1]  # same top set, order reversed
    loss = {}
    for name, z in (("agree", agree), ("reverse", reverse)):
        for kind in ranking.LOSSES:
            loss[name, kind] = float(
                ranking.ranking_distill(z, t, np.array([1]), k=k, loss=kind, lam=1.0)
            )
    assert loss["agree", "rrd"] < loss["reverse", "rrd"]
    assert loss["agree", "rd"] < loss["reverse", "rd"]  # rank-1 weight is the largest


def test_bad_settings_name_the_setting():
    z, t, labels, *_ = _data()
    with pytest.raises(ValueError, match="k must be a Python int"):
        ranking.ranking_distill(z, t, labels, k=99)
    with pytest.raises(ValueError, match="ranking loss 'listnet'"):
        ranking.ranking_distill(z, t, labels, loss="listnet")
    with pytest.raises(ValueError, match="lam"):
        ranking.ranking_distill(z, t, labels, loss="rd", lam=0.0)
