"""Distillation from cached soft labels: the teacher's top-K items and the mass of the rest.

The `soft_labels` stage (distill_jax/data/soft_labels.py) runs the teacher
once over every training slot and keeps, per slot, the ids of its K most
probable items, their log-probabilities at the distillation temperature T,
and the log of the probability mass on every other item (the "rest"). The
student then learns with no teacher in memory from

    alpha·CE(label) + (1 − alpha)·T²·KL(p̄ ‖ q̄)

where p̄ and q̄ are the teacher's and the student's distributions at
temperature T coarsened to K + 1 buckets: the K stored items, each its own
bucket, and one bucket holding the rest of the catalogue. The K stored
probabilities and the rest's total are the teacher's exactly; what the
bucket gives up is how the teacher spreads the rest's mass over the
remaining items: the student is asked to put the same total there, in any
shape. So this KL is at most the full one (coarsening never increases a KL)
and equals it when the teacher's rest mass is 0; with K = 128 of Beauty's
12,101 items the teacher's rest holds a few percent of its mass at T = 0.75.

The student's side costs one log-softmax over the catalogue, as cross-
entropy does, plus an O(N·K) gather: the rest's mass is 1 − Σ q of the
top-K, not another pass over [N, V].
"""

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import common
from distill_jax.losses.common import SumAndCount, masked_sum_and_count


def _log1m_exp(log_x: jax.Array) -> jax.Array:
    """log(1 − e^log_x) for log_x <= 0, kept finite when the mass outside is ~0."""
    x = jnp.exp(log_x)
    return jnp.log(jnp.clip(1.0 - x, jnp.finfo(x.dtype).tiny, None))


def cached_distill_sum(
    student_logits: ArrayLike,
    top_ids: ArrayLike,
    top_log_p: ArrayLike,
    rest_log_p: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    label_where: ArrayLike | None = None,
) -> SumAndCount:
    """``alpha·CE + (1 − alpha)·T²·KL`` over the K + 1 buckets, summed over valid rows.

    Args:
      student_logits: ``[N, V]`` student logits (excluded columns at -inf).
      top_ids: ``[N, K]`` the teacher's K most probable item ids per row.
      top_log_p: ``[N, K]`` their teacher log-probabilities at temperature T
        (-inf allowed: an excluded item the top-K had to include).
      rest_log_p: ``[N]`` log of the teacher's probability of every other item.
      labels: ``[N]`` target ids for the CE part.
      temperature: T of the student's softmax (the teacher's was applied
        when the labels were written).
      alpha: weight of the label's cross-entropy, in [0, 1].
      where: ``[N]`` valid rows (the others may hold anything).
      label_where: the valid rows that carry a label (the others: the KL
        term alone, as teacher-only slots); None: every valid row.

    Returns:
      ``(sum, count)`` scalars.
    """
    common.check_temperature(temperature)
    common.check_alpha(alpha)
    s = jnp.asarray(student_logits)
    common.check_catalogue("student_logits", s)
    top_ids = jnp.asarray(top_ids)
    if top_ids.shape[:-1] != s.shape[:-1] or jnp.shape(top_log_p) != top_ids.shape:
        raise ValueError(
            f"top_ids {top_ids.shape} and top_log_p {jnp.shape(top_log_p)} must be "
            f"[N, K] over the rows of student_logits {s.shape}."
        )
    valid = common.rows_where(where, s.shape[:-1])
    labelled = valid & common.rows_where(label_where, valid.shape)
    s = common.sanitize(s, valid)
    dtype = s.dtype
    log_p = jnp.where(valid[..., None], jnp.asarray(top_log_p, dtype), -jnp.inf)
    log_p_rest = jnp.where(valid, jnp.asarray(rest_log_p, dtype), -jnp.inf)
    # Masked rows point at columns 0..K-1: distinct, as the backward's scatter assumes.
    k_iota = jax.lax.broadcasted_iota(jnp.int32, top_ids.shape, top_ids.ndim - 1)
    safe_ids = jnp.where(valid[..., None], top_ids, k_iota).astype(jnp.int32)
    safe_labels = jnp.where(labelled, jnp.asarray(labels), 0).astype(jnp.int32)
    # T = 1 as a Python number: the CE's softmax and the KL's are one.
    unit_temperature = isinstance(temperature, int | float) and temperature == 1
    total = _fused_cached_total(
        unit_temperature,
        s,
        safe_ids,
        jax.lax.stop_gradient(log_p),
        jax.lax.stop_gradient(log_p_rest),
        safe_labels,
        valid,
        labelled,
        jax.lax.stop_gradient(jnp.asarray(temperature, dtype)),
        jnp.asarray(alpha, dtype),
    )
    return total, jnp.sum(valid, dtype=dtype)


# The closed form. With z = s / T, q = softmax(z), q_k = q[id_k], Q = Σ_k q_k,
# P = Σ_k p_k and p_r the stored rest mass,
#
#   KL = Σ_k p_k (log p_k − log q_k) + p_r (log p_r − log(1 − Q))
#   ∂KL/∂z_j = q_j · (P − p_r·Q / (1 − Q)) + Σ_{k: id_k = j} (p_r·q_k / (1 − Q) − p_k)
#
# so the backward pass is one elementwise pass over [N, V] (the softmaxes are
# the forward pass's unnormalised exps, kept, times the row normalisers) plus
# an O(N·K) scatter; autodiff of the composition keeps two [N, V]
# log-softmaxes and walks them several times.


def _cached_row_stats(unit_temperature, s, ids, log_p, log_p_rest, labels, temperature):
    max_s = jnp.max(s, axis=-1, keepdims=True)
    zs = s - max_s
    # The unnormalised softmaxes at 1 and at T are kept for the backward pass:
    # on the CPU their exps cost more than writing and reading them back once.
    exp_1 = jnp.exp(zs)
    exp_t = exp_1 if unit_temperature else jnp.exp(zs / temperature)
    log_sum_1 = jnp.log(jnp.sum(exp_1, axis=-1, keepdims=True))
    log_sum_t = log_sum_1 if unit_temperature else jnp.log(jnp.sum(exp_t, -1, keepdims=True))
    # O(N·K) gathers from the raw logits: no [N, V] intermediate.
    log_q = (jnp.take_along_axis(s, ids, axis=-1) - max_s) / temperature - log_sum_t
    log_q_rest = _log1m_exp(jax.nn.logsumexp(log_q, axis=-1))
    p = jnp.exp(log_p)
    kl = jnp.sum(common.xlogy_guarded(p, log_p - log_q), axis=-1) + common.xlogy_guarded(
        jnp.exp(log_p_rest), log_p_rest - log_q_rest
    )
    s_y = jnp.take_along_axis(s, labels[..., None], axis=-1)[..., 0]
    # The large terms first (see dense._distill_row_stats); a label outside the catalogue is NaN.
    ce = common.nan_outside((max_s[..., 0] - s_y) + log_sum_1[..., 0], labels, s.shape[-1])
    return ce, kl, (exp_1, exp_t, log_sum_1, log_sum_t, log_q, log_q_rest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_cached_total(
    unit_temperature, s, ids, log_p, log_p_rest, labels, valid, labelled, temperature, alpha
):
    total, _ = _fused_cached_fwd(
        unit_temperature, s, ids, log_p, log_p_rest, labels, valid, labelled, temperature, alpha
    )
    return total


def _fused_cached_fwd(
    unit_temperature, s, ids, log_p, log_p_rest, labels, valid, labelled, temperature, alpha
):
    ce, kl, stats = _cached_row_stats(
        unit_temperature, s, ids, log_p, log_p_rest, labels, temperature
    )
    ce_total, _ = masked_sum_and_count(ce, labelled)
    kd_total, _ = masked_sum_and_count(jnp.square(temperature) * kl, valid)
    total = common.weighted_total(ce_total, kd_total, alpha)
    residuals = (ids, log_p, log_p_rest, labels, valid, labelled, temperature, alpha, stats)
    return total, (residuals, ce_total - kd_total)


def _fused_cached_bwd(unit_temperature, res, g):
    (ids, log_p, log_p_rest, labels, valid, labelled, temperature, alpha, stats), dalpha = res
    exp_1, exp_t, log_sum_1, log_sum_t, log_q, log_q_rest = stats
    q_1 = exp_1 * jnp.exp(-log_sum_1)
    q_t = q_1 if unit_temperature else exp_t * jnp.exp(-log_sum_t)
    p = jnp.exp(log_p)
    q_k = jnp.exp(log_q)
    # p_r / (1 − Q), 0 where the teacher left no mass outside the top K.
    rest_ratio = jnp.where(jnp.isfinite(log_p_rest), jnp.exp(log_p_rest - log_q_rest), 0)
    dense = jnp.sum(p, axis=-1) - rest_ratio * jnp.sum(q_k, axis=-1)
    kd_weight = jnp.where(valid, (1 - alpha) * temperature, 0)[..., None]
    ce_weight = jnp.where(labelled, alpha, 0)[..., None]
    iota = jax.lax.broadcasted_iota(labels.dtype, exp_1.shape, exp_1.ndim - 1)
    onehot = labels[..., None] == iota
    if unit_temperature:
        grad = (ce_weight + kd_weight * dense[..., None]) * q_1 - ce_weight * onehot
    else:
        grad = ce_weight * (q_1 - onehot) + kd_weight * dense[..., None] * q_t
    sparse = kd_weight * (rest_ratio[..., None] * q_k - p)
    rows = jnp.arange(grad.shape[0])[:, None]
    # A row's top-K ids are distinct.
    grad = grad.at[rows, ids].add(sparse, unique_indices=True)
    # Ids, labels and masks get no cotangent; T is a stop_gradient'ed
    # hyper-parameter; alpha's exact derivative (CE − T²·KL) is free.
    return (g * grad, None, None, None, None, None, None, None, g * dalpha)


_fused_cached_total.defvjp(_fused_cached_fwd, _fused_cached_bwd)


cached_distill = common.mean_of(cached_distill_sum)


def top_k_soft_labels(
    teacher_logits: jax.Array, k: int, temperature: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What the soft_labels stage stores for ``[N, V]`` teacher logits (excluded at -inf).

    Returns:
      ``top_ids [N, K]`` int32, ``top_log_p [N, K]`` (log-probabilities at T)
      and ``rest_log_p [N]`` (log of the mass outside the top K).
    """
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    top_log_p, top_ids = jax.lax.top_k(log_p, k)
    # The rest's mass from a logsumexp over the other columns (exact even
    # when it is tiny, unlike 1 - sum of the top).
    rows = jnp.arange(log_p.shape[0])[:, None]
    rest = jax.nn.logsumexp(log_p.at[rows, top_ids].set(-jnp.inf), axis=-1)
    return top_ids.astype(jnp.int32), top_log_p, rest
