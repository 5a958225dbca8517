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
    log_p = jnp.where(valid[..., None], jnp.asarray(top_log_p, dtype), 0.0)
    log_p_rest = jnp.where(valid, jnp.asarray(rest_log_p, dtype), 0.0)
    log_p = jax.lax.stop_gradient(log_p)
    log_p_rest = jax.lax.stop_gradient(log_p_rest)
    safe_ids = jnp.where(valid[..., None], top_ids, 0).astype(jnp.int32)

    log_q_t = jax.nn.log_softmax(s / temperature, axis=-1)
    log_q = jnp.take_along_axis(log_q_t, safe_ids, axis=-1)
    log_q_rest = _log1m_exp(jax.nn.logsumexp(log_q, axis=-1))
    p = jnp.exp(log_p)
    kl = jnp.sum(common.xlogy_guarded(p, log_p - log_q), axis=-1) + common.xlogy_guarded(
        jnp.exp(log_p_rest), log_p_rest - log_q_rest
    )
    kd = jnp.square(temperature) * kl
    log_q_1 = log_q_t if isinstance(temperature, int | float) and temperature == 1 else None
    if log_q_1 is None:
        log_q_1 = jax.nn.log_softmax(s, axis=-1)
    safe = jnp.where(labelled, jnp.asarray(labels), 0).astype(jnp.int32)
    ce = -jnp.take_along_axis(log_q_1, safe[..., None], axis=-1)[..., 0]
    ce_total, _ = masked_sum_and_count(ce, labelled)
    kd_total, count = masked_sum_and_count(kd, valid)
    return common.weighted_total(ce_total, kd_total, jnp.asarray(alpha, dtype)), count


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
