"""The dense form: losses of full ``[N, V]`` logits; the trainer's default.

Training losses for teachers and distilled students, as pure functions of
arrays (jax.numpy only: no flax, no config), with the conventions of
:mod:`distill_jax.losses.common`. ``where`` is a mask over positions
(``logits.shape[:-1]``, or the full shape for the elementwise
:func:`binary_distill`).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import common, cpu_kernel
from distill_jax.losses.common import SumAndCount, masked_mean, masked_sum_and_count

__all__ = [
    "exclude_columns",
    "binary_distill",
    "binary_distill_sum",
    "cross_entropy",
    "cross_entropy_sum",
    "distill_loss",
    "distill_loss_sum",
    "hard_label_distill",
    "hard_label_distill_sum",
    "kl_distill",
    "kl_distill_sum",
    "masked_mean",
    "masked_sum_and_count",
]


def exclude_columns(logits: jax.Array, columns: jax.Array) -> jax.Array:
    """``logits [N, V]`` with ``columns [N, K]`` of each row set to -inf (exclude_history).

    A column listed as 0 (the padding column, -inf anyway) changes nothing.
    """
    # A boolean [N, V] mask scattered once, then a select that XLA fuses into
    # whatever reads the logits next (a softmax's passes): scattering -inf into
    # the float logits themselves made XLA copy them and kept the select's
    # transpose (another scatter) in the backward pass, +60% on a CE step.
    rows = jnp.arange(logits.shape[0])[:, None]
    mask = jnp.zeros(logits.shape, bool).at[rows, columns].set(True)
    return jnp.where(mask, -jnp.inf, logits)


# --------------------------------------------------------------------------
# Cross-entropy (teacher training and the hard-label term of distillation).
# --------------------------------------------------------------------------


def cross_entropy_sum(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> SumAndCount:
    """Softmax cross-entropy summed over valid positions, and their count.

    Args:
      logits: ``[..., V]`` catalogue logits (``-inf`` columns allowed).
      labels: ``[...]`` integer target ids in ``[0, V)``.
      where: optional ``[...]`` boolean mask of valid positions.

    Returns:
      ``(sum, count)`` scalars. A valid position whose label column is -inf
      contributes +inf, as it should: such an item can never be predicted.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    common.check_catalogue("logits", logits)
    common.check_labels(labels, logits.shape[:-1])
    valid = common.prepare_where(where, labels.shape)
    log_probs = jax.nn.log_softmax(common.sanitize(logits, valid), axis=-1)
    if valid is not None:
        # Masked labels may be out of range (e.g. -1 padding); point them at a
        # real column so the gather is well defined.
        labels = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return masked_sum_and_count(common.nan_outside(nll, labels, logits.shape[-1]), valid)


cross_entropy = common.mean_of(cross_entropy_sum)


# --------------------------------------------------------------------------
# Soft-label distillation (Hinton et al. 2015).
# --------------------------------------------------------------------------


def kl_distill_sum(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike,
    where: ArrayLike | None = None,
) -> SumAndCount:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` summed over valid positions.

    Args:
      student_logits: ``[..., V]`` student logits.
      teacher_logits: ``[..., V]`` teacher logits; receives no gradient.
      temperature: softening temperature ``T > 0``.
      where: optional ``[...]`` boolean mask of valid positions.

    Returns:
      ``(sum, count)`` scalars.
    """
    common.check_temperature(temperature)
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    common.check_catalogue("student_logits", student_logits)
    common.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    valid = common.prepare_where(where, student_logits.shape[:-1])
    s = common.sanitize(student_logits, valid)
    t = common.sanitize(jax.lax.stop_gradient(teacher_logits), valid)
    # Shifted before dividing by T (log_softmax does not change): with a small
    # T the raw logits would overflow to inf and give NaN or a KL of 0.
    log_q = jax.nn.log_softmax(_shifted(s) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(_shifted(t) / temperature, axis=-1)
    kl = jnp.sum(common.xlogy_guarded(jnp.exp(log_p), log_p - log_q), axis=-1)
    # T² keeps the gradient's scale roughly independent of T (Hinton et al. 2015).
    total, count = masked_sum_and_count(kl, valid)
    return jnp.square(temperature) * total, count


kl_distill = common.mean_of(kl_distill_sum)


def _shifted(x: jax.Array) -> jax.Array:
    """``x`` minus its row maximum (no gradient through the maximum: softmaxes ignore it)."""
    return x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))


# --------------------------------------------------------------------------
# Fused alpha·CE + (1 − alpha)·T²·KL: the hot path of distillation training.
#
# Autodiff of the composition walks the [N, V] logits many times (three
# log-softmaxes, their exps, the products, and the transposes of each). Here
# the forward pass needs the row maxima and then a handful of row sums, and
# the backward pass is one elementwise pass using the closed form
#   dL/dz = alpha·(softmax(z) − onehot(y)) + (1 − alpha)·T·(softmax(z/T) − softmax(t/T)).
# Only the raw inputs and O(N) row statistics are kept for the backward pass.
#
# Unlike the autodiff losses above, masked positions are not zeroed at the
# [N, V] level (that select would be one more pass): their row statistics may
# be NaN, and they are discarded by row-level `where`s in the forward pass and
# by the final `where` on the gradient, neither of which lets a NaN through.
# --------------------------------------------------------------------------


def _distill_row_stats(s, t, labels, labelled, temperature, unit_temperature):
    """Per-row CE, KL and the statistics the backward pass needs."""
    dtype = common.compute_dtype(s)
    z, tt = s.astype(dtype), t.astype(dtype)
    max_z = jnp.max(z, axis=-1, keepdims=True)
    max_t = jnp.max(tt, axis=-1, keepdims=True)
    # Shift before dividing by T so the largest entry is exactly 0 (no
    # cancellation error from subtracting two large logsumexps).
    zs = z - max_z
    a = (tt - max_t) / temperature  # teacher: log of the unnormalised p
    b = zs if unit_temperature else zs / temperature  # student at temperature T
    exp_a = jnp.exp(a)
    log_sum_z = jnp.log(jnp.sum(jnp.exp(zs), axis=-1, keepdims=True))
    # At T = 1 (the common case) the student's two softmaxes coincide.
    log_sum_b = log_sum_z if unit_temperature else jnp.log(jnp.sum(jnp.exp(b), -1, keepdims=True))
    sum_a = jnp.sum(exp_a, axis=-1, keepdims=True)
    # KL(p‖q) = Σ p (a − b) − log Σe^a + log Σe^b with p = e^a / Σe^a, so one
    # more row sum gives it without normalising p first.
    cross = jnp.sum(common.xlogy_guarded(exp_a, a - b), axis=-1, keepdims=True)
    log_sum_a = jnp.log(sum_a)
    kl = (cross / sum_a - log_sum_a + log_sum_b)[..., 0]
    if labelled is not None:
        # Masked labels may be out of range (e.g. -1 padding).
        labels = jnp.where(labelled, labels, 0)
    # An O(N) gather from the raw input, so no [N, V] intermediate is needed.
    z_y = jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    # The two large terms first: max_z + log_sum_z - z_y would lose log_sum_z
    # when the logits are large (1e7 + 1.79 is 1e7 in float32).
    ce = common.nan_outside((max_z[..., 0] - z_y) + log_sum_z[..., 0], labels, z.shape[-1])
    return ce, kl, (max_z, max_t, log_sum_z, log_sum_b, log_sum_a)


def _masked_total(values, valid):
    return jnp.sum(values if valid is None else jnp.where(valid, values, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_distill_total(unit_temperature, s, t, labels, valid, label_valid, temperature, alpha):
    total, _ = _fused_distill_fwd(
        unit_temperature, s, t, labels, valid, label_valid, temperature, alpha
    )
    return total


def _fused_distill_fwd(unit_temperature, s, t, labels, valid, label_valid, temperature, alpha):
    # `label_valid` (a subset of `valid`): rows whose CE term counts; the
    # other valid rows are teacher-only (KL alone). None: every valid row.
    labelled = valid if label_valid is None else label_valid
    ce, kl, stats = _distill_row_stats(s, t, labels, labelled, temperature, unit_temperature)
    ce_total = _masked_total(ce, labelled)
    kd_total = jnp.square(temperature) * _masked_total(kl, valid)
    total = common.weighted_total(ce_total, kd_total, alpha)
    residuals = (s, t, labels, valid, label_valid, temperature, alpha, stats, ce_total - kd_total)
    return total, residuals


def _fused_distill_bwd(unit_temperature, residuals, g):
    s, t, labels, valid, label_valid, temperature, alpha, stats, dtotal_dalpha = residuals
    max_z, max_t, log_sum_z, log_sum_b, log_sum_a = stats
    dtype = common.compute_dtype(s)
    zs = s.astype(dtype) - max_z
    softmax_z = jnp.exp(zs - log_sum_z)
    softmax_tt = jnp.exp((t.astype(dtype) - max_t) / temperature - log_sum_a)
    # The one-hot is an iota comparison fused into this pass, never stored.
    onehot = labels[..., None] == jax.lax.broadcasted_iota(labels.dtype, zs.shape, zs.ndim - 1)
    # The CE weight per row: alpha, or 0 on teacher-only rows.
    a = alpha if label_valid is None else jnp.where(label_valid, alpha, 0)[..., None]
    if unit_temperature and label_valid is None:
        grad = softmax_z - alpha * onehot - (1 - alpha) * softmax_tt
    elif unit_temperature:
        # a·(q − y) + (1 − alpha)·(q − p), with the two q terms merged.
        grad = (a + (1 - alpha)) * softmax_z - a * onehot - (1 - alpha) * softmax_tt
    else:
        softmax_zt = jnp.exp(zs / temperature - log_sum_b)
        grad = a * (softmax_z - onehot) + (1 - alpha) * temperature * (softmax_zt - softmax_tt)
    if valid is not None:
        grad = jnp.where(valid[..., None], grad, 0)
    grad = (g * grad).astype(s.dtype)
    # Teacher, labels and mask get no cotangent (None = zero). Temperature is a
    # hyper-parameter, stop_gradient'ed by the caller; alpha's exact
    # derivative (CE − T²·KL) is free, so give it.
    return grad, None, None, None, None, None, (g * dtotal_dalpha).astype(alpha.dtype)


_fused_distill_total.defvjp(_fused_distill_fwd, _fused_distill_bwd)


DISTILL_IMPLS = ("xla", "cpu_kernel")


def distill_loss_sum(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    where: ArrayLike | None = None,
    label_where: ArrayLike | None = None,
    impl: str = "xla",
) -> SumAndCount:
    """Fused ``alpha·CE + (1 − alpha)·T²·KL`` summed over valid positions.

    Equal in value and gradient to ``alpha * cross_entropy_sum + (1 - alpha) *
    kl_distill_sum``, but with a closed-form backward pass (see the comment
    above ``_distill_row_stats``) that keeps far fewer ``[N, V]``
    intermediates than autodiff of the composition. ``temperature == 1`` as a
    Python number takes a specialised path with one exponential fewer.

    Args:
      student_logits: ``[..., V]`` student logits.
      teacher_logits: ``[..., V]`` teacher logits; receives no gradient.
      labels: ``[...]`` integer target ids in ``[0, V)``.
      temperature: softening temperature ``T > 0``; receives no gradient.
      alpha: weight of the hard-label term, in ``[0, 1]``.
      where: optional ``[...]`` boolean mask of valid positions.
      label_where: optional ``[...]`` boolean mask of the valid positions that
        carry a label. The others are teacher-only: they add their
        ``(1 − alpha)·T²·KL`` term alone (their ``labels`` are ignored). The
        count is still that of ``where``. None: every valid position has one.
      impl: ``'xla'`` (jax.numpy, any backend) or ``'cpu_kernel'`` (the fused
        C++ kernel of :mod:`distill_jax.losses.kernel_lib`, CPU only, float32
        arithmetic; built on first use). Same values and gradients.

    Returns:
      ``(sum, count)`` scalars.
    """
    if impl not in DISTILL_IMPLS:
        raise ValueError(f"distill_loss impl={impl!r} is invalid; expected one of {DISTILL_IMPLS}.")
    common.check_temperature(temperature)
    common.check_alpha(alpha)
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    labels = jnp.asarray(labels)
    common.check_catalogue("student_logits", student_logits)
    common.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    common.check_labels(labels, student_logits.shape[:-1])
    valid = common.prepare_where(where, labels.shape)
    label_valid = common.prepare_where(label_where, labels.shape)
    if label_valid is not None and valid is not None:
        label_valid = label_valid & valid
    dtype = common.compute_dtype(student_logits)
    count = jnp.asarray(labels.size, dtype) if valid is None else jnp.sum(valid, dtype=dtype)
    if impl == "cpu_kernel":
        total = cpu_kernel.logits_distill_total(
            student_logits, teacher_logits, labels, valid, label_valid, temperature, alpha
        )
        return total.astype(dtype), count
    # T = 1 is the common setting: specialise it statically (one exp fewer).
    unit_temperature = isinstance(temperature, numbers.Real) and temperature == 1
    total = _fused_distill_total(
        unit_temperature,
        student_logits,
        jax.lax.stop_gradient(teacher_logits),
        labels,
        valid,
        label_valid,
        jax.lax.stop_gradient(jnp.asarray(temperature, dtype)),
        jnp.asarray(alpha, dtype),
    )
    return total, count


distill_loss = common.mean_of(distill_loss_sum)


# --------------------------------------------------------------------------
# Hard-label distillation: the student imitates the teacher's top-k items.
# --------------------------------------------------------------------------


def hard_label_distill_sum(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    k: int = 1,
    where: ArrayLike | None = None,
) -> SumAndCount:
    """Cross-entropy against the teacher's top-k items (weight 1/k each), summed.

    Args:
      student_logits: ``[..., V]`` student logits.
      teacher_logits: ``[..., V]`` teacher logits; receives no gradient.
      k: number of teacher items to imitate, ``1 <= k <= V``. If a row has
        fewer than k finite teacher logits, -inf columns are picked and the
        loss is +inf.
      where: optional ``[...]`` boolean mask of valid positions.

    Returns:
      ``(sum, count)`` scalars.
    """
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    common.check_catalogue("student_logits", student_logits)
    common.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    num_items = student_logits.shape[-1]
    # k is a shape (top_k's output), so it must be a static Python int.
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_items:
        raise ValueError(f"k must be a Python int in [1, V={num_items}], got {k!r}.")
    valid = common.prepare_where(where, student_logits.shape[:-1])
    teacher = common.sanitize(jax.lax.stop_gradient(teacher_logits), valid)
    _, top_items = jax.lax.top_k(teacher, int(k))
    log_q = jax.nn.log_softmax(common.sanitize(student_logits, valid), axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(log_q, top_items, axis=-1), axis=-1)
    return masked_sum_and_count(common.nan_rows(nll, teacher), valid)


hard_label_distill = common.mean_of(hard_label_distill_sum)


# --------------------------------------------------------------------------
# Binary (sigmoid, click / no-click) distillation.
# --------------------------------------------------------------------------


def binary_distill_sum(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    where: ArrayLike | None = None,
) -> SumAndCount:
    """``alpha·BCE + (1 − alpha)·T²·KL(Bern(σ(t/T)) ‖ Bern(σ(s/T)))``, summed.

    Elementwise: there is no catalogue axis.

    Args:
      student_logits: ``[...]`` student logits.
      teacher_logits: ``[...]`` teacher logits; receives no gradient.
      labels: ``[...]`` targets in ``{0, 1}`` (soft targets in ``[0, 1]`` work
        too).
      temperature: softening temperature ``T > 0``.
      alpha: weight of the hard-label term, in ``[0, 1]``.
      where: optional boolean mask with the logits' shape.

    Returns:
      ``(sum, count)`` scalars.
    """
    common.check_temperature(temperature)
    common.check_alpha(alpha)
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    labels = jnp.asarray(labels)
    common.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    common.check_same_shape("student_logits", student_logits, "labels", labels)
    valid = common.prepare_where(where, student_logits.shape)
    dtype = common.compute_dtype(student_logits)

    def clean(x):
        x = x.astype(dtype)
        return x if valid is None else jnp.where(valid, x, 0)

    s, y = clean(student_logits), clean(labels)
    t = clean(jax.lax.stop_gradient(teacher_logits))
    # log σ(x) and log(1 − σ(x)) = log σ(−x) via log_sigmoid: exact at ±1e4.
    bce = -(y * jax.nn.log_sigmoid(s) + (1 - y) * jax.nn.log_sigmoid(-s))
    st, tt = s / temperature, t / temperature
    log_p1, log_p0 = jax.nn.log_sigmoid(tt), jax.nn.log_sigmoid(-tt)
    kl = common.xlogy_guarded(
        jnp.exp(log_p1), log_p1 - jax.nn.log_sigmoid(st)
    ) + common.xlogy_guarded(jnp.exp(log_p0), log_p0 - jax.nn.log_sigmoid(-st))
    loss = alpha * bce + (1 - alpha) * jnp.square(temperature) * kl
    return masked_sum_and_count(loss, valid)


binary_distill = common.mean_of(binary_distill_sum)
