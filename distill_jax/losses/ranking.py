"""Ranking distillation: the student learns the teacher's top-K ranking, not its distribution.

Two listwise losses over the teacher's top-K items of each slot (history
excluded where the form excludes it), both over the full catalogue:

* ``rd``, position-weighted positives, after Ranking Distillation (Tang &
  Wang, KDD 2018): the teacher's r-th item (r = 1..K) is a positive of
  weight ``w_r ∝ exp(-r / lam)`` (normalised to sum 1), and the student
  pays ``-Σ_r w_r log softmax(z)_{item_r}``. The paper's sampled binary
  loss becomes a softmax over every item here, as the rest of this package
  ranks every item; its dynamic (rank-discrepancy) weights are left out.
* ``rrd``, relaxed ranking distillation, after DE-RRD (Kang et al., CIKM
  2020): the Plackett-Luce likelihood of the teacher's order of its top K,
  with every other item as one unordered block that follows them:
  ``-(1/K) Σ_k [ z_k - log( Σ_{l >= k} e^{z_l} + Σ_{rest} e^{z} ) ]``. The
  paper samples its "uninteresting" items; here the rest is the whole
  remaining catalogue, exact, from one logsumexp.

Both are ``(sum, count)`` over valid slots, and mixed with the label's
cross-entropy by ``alpha`` like the soft target: ``alpha·CE + (1 −
alpha)·rank_loss`` (teacher-only slots add their ranking term alone).
"""

import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import common
from distill_jax.losses.common import SumAndCount, masked_sum_and_count

LOSSES = ("rd", "rrd")


def _check(k, lam, loss, num_items) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_items:
        raise ValueError(f"k must be a Python int in [1, V={num_items}], got {k!r}.")
    if loss not in LOSSES:
        raise ValueError(f"ranking loss {loss!r} is invalid; expected one of {LOSSES}.")
    if not (isinstance(lam, numbers.Real) and lam > 0):
        raise ValueError(f"lam (the position-weight scale) must be > 0, got {lam!r}.")


def position_weights(k: int, lam: float) -> jax.Array:
    """``[k]`` weights ``exp(-r / lam)`` for r = 1..k, normalised to sum 1."""
    w = jnp.exp(-jnp.arange(1, k + 1, dtype=jnp.float32) / lam)
    return w / jnp.sum(w)


def _rrd_rows(log_q: jax.Array, top: jax.Array) -> jax.Array:
    """Per-row relaxed Plackett-Luce NLL, from log-probabilities (shift invariant)."""
    k = top.shape[-1]
    z = jnp.take_along_axis(log_q, top, axis=-1)  # [N, k] log p of the top items
    # log of the mass outside the top k: log(1 - Σ p_top), kept finite.
    top_mass = jnp.exp(jax.nn.logsumexp(z, axis=-1))
    log_rest = jnp.log(jnp.clip(1.0 - top_mass, jnp.finfo(jnp.float32).tiny, None))
    # suffix[k] = log Σ_{l >= k} p_l, by a reverse cumulative logaddexp.
    suffix = jax.lax.cumlogsumexp(z, axis=z.ndim - 1, reverse=True)
    denom = jnp.logaddexp(suffix, log_rest[..., None])
    return -jnp.sum(z - denom, axis=-1) / k


def ranking_distill_sum(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    k: int = 10,
    loss: str = "rrd",
    lam: float = 5.0,
    alpha: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    label_where: ArrayLike | None = None,
) -> SumAndCount:
    """``alpha·CE + (1 − alpha)·ranking loss`` summed over valid positions.

    Args:
      student_logits: ``[..., V]`` student logits (excluded columns at -inf).
      teacher_logits: ``[..., V]`` teacher logits; receives no gradient. Its
        top-k items (the ranking taught) must be finite in every valid row.
      labels: ``[...]`` target ids in ``[0, V)`` for the CE part.
      k: how many of the teacher's items are ranked, a Python int in [1, V].
      loss: ``'rd'`` or ``'rrd'`` (the module docstring).
      lam: ``rd`` only: the scale of the position weights.
      alpha: weight of the label's cross-entropy, in [0, 1].
      where: optional ``[...]`` mask of valid positions.
      label_where: optional mask of the valid positions that carry a label
        (the others: the ranking term alone). None: every valid position.

    Returns:
      ``(sum, count)`` scalars.
    """
    common.check_alpha(alpha)
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    common.check_catalogue("student_logits", student_logits)
    common.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check(k, lam, loss, student_logits.shape[-1])
    valid = common.rows_where(where, student_logits.shape[:-1])
    labelled = valid & common.rows_where(label_where, valid.shape)
    teacher = common.sanitize(jax.lax.stop_gradient(teacher_logits), valid)
    _, top = jax.lax.top_k(teacher, int(k))
    log_q = jax.nn.log_softmax(common.sanitize(student_logits, valid), axis=-1)
    if loss == "rd":
        rank = -jnp.sum(position_weights(k, lam) * jnp.take_along_axis(log_q, top, -1), -1)
    else:
        rank = _rrd_rows(log_q, top)
    labels = jnp.asarray(labels)
    safe = jnp.where(labelled, labels, 0).astype(jnp.int32)
    ce = -jnp.take_along_axis(log_q, safe[..., None], axis=-1)[..., 0]
    per_row = (1.0 - alpha) * rank + jnp.where(labelled, alpha * ce, 0.0)
    return masked_sum_and_count(per_row, valid)


ranking_distill = common.mean_of(ranking_distill_sum)
