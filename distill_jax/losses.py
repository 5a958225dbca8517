"""Training losses for teachers and distilled students.

Pure functions of arrays (jax.numpy only: no flax, no config). Conventions
shared by every function here:

* Catalogue logits have shape ``[..., V]``; columns masked to ``-inf`` (the
  padding column 0 always is) have probability 0 for teacher and student and
  produce neither NaN values nor NaN gradients.
* ``where`` is an optional boolean mask over positions (``logits.shape[:-1]``,
  or the full shape for the elementwise :func:`binary_distill`). A masked
  position may hold anything, even NaN, an all ``-inf`` row or label -1: it
  is zeroed (or, in the fused loss, discarded by a select) so it cannot
  poison values or gradients.
* ``foo(...)`` returns the mean over valid positions, exactly ``0.0`` when
  nothing is valid; ``foo_sum(...)`` returns ``(sum, count)`` so that metrics
  can be accumulated exactly across batches, shards and uneven masks.
* Arithmetic runs in at least float32: bfloat16 logits are upcast
  elementwise inside the loss; gradients come back in the input dtype.
* The teacher never receives a gradient (``jax.lax.stop_gradient`` inside).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax import kernels  # builds its C++ library on first use only

__all__ = [
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

SumAndCount = tuple[jax.Array, jax.Array]


# --------------------------------------------------------------------------
# Argument checks. Shapes are static under jit, so they are always checked;
# hyper-parameters only when they are Python numbers (a traced value cannot be
# inspected without a host sync).
# --------------------------------------------------------------------------


def _check_temperature(temperature: float | ArrayLike) -> None:
    if isinstance(temperature, numbers.Real) and not temperature > 0:  # also catches NaN
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}.")
    _check_scalar("temperature", temperature)


def _check_alpha(alpha: float | ArrayLike) -> None:
    if isinstance(alpha, numbers.Real) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    _check_scalar("alpha", alpha)


def _check_scalar(name: str, value: float | ArrayLike) -> None:
    if not isinstance(value, numbers.Real) and jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}."
        )


def _check_catalogue(name: str, logits: jax.Array) -> None:
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {logits.shape}.")


def _check_labels(labels: jax.Array, positions: tuple[int, ...]) -> None:
    if labels.shape != positions:
        raise ValueError(
            f"labels must have shape {positions} (logits.shape[:-1]), got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer item ids, got dtype {labels.dtype}.")


def _prepare_where(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    """Returns ``where`` as a bool array of exactly ``shape``, or None."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.shape != shape:
        raise ValueError(
            f"where must have shape {shape} (one flag per position), got {where.shape}."
        )
    # A float mask would usually mean per-position weights, which these losses
    # do not implement; refuse rather than silently binarise it.
    if where.dtype != jnp.bool_ and not jnp.issubdtype(where.dtype, jnp.integer):
        raise TypeError(f"where must be a boolean (or 0/1 integer) mask, got {where.dtype}.")
    return where.astype(jnp.bool_)


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    # Upcast bf16/f16 to f32; keep f64 when x64 is enabled.
    return jnp.promote_types(x.dtype, jnp.float32)


def _sanitize(logits: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Upcasts and zeroes masked positions so garbage there cannot make NaNs."""
    logits = logits.astype(_compute_dtype(logits))
    if valid is None:
        return logits
    # Zeros, not -inf: an all -inf row has an undefined softmax (NaN).
    return jnp.where(valid[..., None], logits, 0)


def _xlogy_guarded(p: jax.Array, log_ratio: jax.Array) -> jax.Array:
    """``p * log_ratio`` with ``0 * anything = 0``.

    Columns that are -inf for teacher and student give ``0 * (-inf + inf)``;
    the value is 0 by the convention 0·log 0 = 0. ``jnp.where`` (not a
    multiplication by a mask) keeps the NaN out of the backward pass too,
    because d(p·r)/dr = p is 0 there.
    """
    return jnp.where(p > 0, p * log_ratio, 0)


# --------------------------------------------------------------------------
# Masked reductions.
# --------------------------------------------------------------------------


def masked_sum_and_count(values: ArrayLike, where: ArrayLike | None = None) -> SumAndCount:
    """Sum of ``values`` over valid entries and the number of valid entries.

    Args:
      values: array of per-position losses, any shape.
      where: optional boolean mask of ``values.shape``; None means all valid.

    Returns:
      ``(sum, count)``, both scalars of the values' (at least float32) dtype.
      Masked entries are excluded with ``jnp.where``, so NaN/inf there does not
      leak into the sum or its gradient.
    """
    values = jnp.asarray(values)
    values = values.astype(_compute_dtype(values))
    valid = _prepare_where(where, values.shape)
    if valid is None:
        return jnp.sum(values), jnp.asarray(values.size, values.dtype)
    total = jnp.sum(jnp.where(valid, values, 0))
    return total, jnp.sum(valid, dtype=values.dtype)


def _mean(sum_and_count: SumAndCount) -> jax.Array:
    total, count = sum_and_count
    # max(count, 1): an all-masked batch gives exactly 0 (total is 0), not NaN.
    return total / jnp.maximum(count, 1)


def masked_mean(values: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
    """Mean of ``values`` over valid entries; exactly 0.0 if none is valid.

    Args:
      values: array of per-position losses, any shape.
      where: optional boolean mask of ``values.shape``; None means all valid.

    Returns:
      A scalar.
    """
    return _mean(masked_sum_and_count(values, where))


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
    _check_catalogue("logits", logits)
    _check_labels(labels, logits.shape[:-1])
    valid = _prepare_where(where, labels.shape)
    log_probs = jax.nn.log_softmax(_sanitize(logits, valid), axis=-1)
    if valid is not None:
        # Masked labels may be out of range (e.g. -1 padding); point them at a
        # real column so the gather is well defined.
        labels = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return masked_sum_and_count(nll, valid)


def cross_entropy(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    """Mean softmax cross-entropy over valid positions (0.0 if none).

    Arguments are those of :func:`cross_entropy_sum`. Returns a scalar, exactly
    0.0 (with zero gradients) when no position is valid.
    """
    return _mean(cross_entropy_sum(logits, labels, where=where))


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
    _check_temperature(temperature)
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _check_catalogue("student_logits", student_logits)
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    valid = _prepare_where(where, student_logits.shape[:-1])
    s = _sanitize(student_logits, valid)
    t = _sanitize(jax.lax.stop_gradient(teacher_logits), valid)
    log_q = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p = jax.nn.log_softmax(t / temperature, axis=-1)
    kl = jnp.sum(_xlogy_guarded(jnp.exp(log_p), log_p - log_q), axis=-1)
    # T² keeps the gradient's scale roughly independent of T (Hinton et al. 2015).
    total, count = masked_sum_and_count(kl, valid)
    return jnp.square(temperature) * total, count


def kl_distill(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Mean of ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over valid positions.

    Arguments are those of :func:`kl_distill_sum`. Returns a scalar, exactly
    0.0 (with zero gradients) when no position is valid.
    """
    return _mean(
        kl_distill_sum(student_logits, teacher_logits, temperature=temperature, where=where)
    )


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
    dtype = _compute_dtype(s)
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
    cross = jnp.sum(_xlogy_guarded(exp_a, a - b), axis=-1, keepdims=True)
    log_sum_a = jnp.log(sum_a)
    kl = (cross / sum_a - log_sum_a + log_sum_b)[..., 0]
    if labelled is not None:
        # Masked labels may be out of range (e.g. -1 padding).
        labels = jnp.where(labelled, labels, 0)
    # An O(N) gather from the raw input, so no [N, V] intermediate is needed.
    z_y = jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    ce = log_sum_z[..., 0] + max_z[..., 0] - z_y
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
    # A term with weight 0 is dropped outright, so that e.g. pure KD (alpha=0)
    # is not turned into NaN by 0·inf from a label on a -inf column.
    total = jnp.where(alpha == 0, 0, alpha * ce_total) + jnp.where(
        alpha == 1, 0, (1 - alpha) * kd_total
    )
    residuals = (s, t, labels, valid, label_valid, temperature, alpha, stats, ce_total - kd_total)
    return total, residuals


def _fused_distill_bwd(unit_temperature, residuals, g):
    s, t, labels, valid, label_valid, temperature, alpha, stats, dtotal_dalpha = residuals
    max_z, max_t, log_sum_z, log_sum_b, log_sum_a = stats
    dtype = _compute_dtype(s)
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


# The same loss through the CPU kernel (distill_jax/kernels): its forward pass
# also writes the gradient, which the backward pass only scales.


def kernel_total(ce, kl, valid, labelled, temperature, alpha):
    """(alpha·ΣCE + (1 − alpha)·T²·ΣKL, its derivative in alpha) from kernel rows."""
    ce_total = jnp.sum(jnp.where(labelled, ce, 0))
    kd_total = jnp.square(temperature) * jnp.sum(jnp.where(valid, kl, 0))
    # As in the fused form: a term with weight 0 is dropped outright.
    total = jnp.where(alpha == 0, 0, alpha * ce_total) + jnp.where(
        alpha == 1, 0, (1 - alpha) * kd_total
    )
    return total, ce_total - kd_total


def _kernel_rows(s, t, labels, valid, labelled, temperature, alpha, with_grad):
    zeros = jnp.zeros(s.shape[-1], jnp.float32)
    return kernels.distill_rows(
        s,
        zeros,
        t,
        zeros,
        labels,
        valid,
        labelled,
        temperature,
        alpha,
        mask_first=False,
        with_grad=with_grad,
    )


@jax.custom_vjp
def _kernel_distill_total(s, t, labels, valid, labelled, temperature, alpha):
    ce, kl = _kernel_rows(s, t, labels, valid, labelled, temperature, alpha, False)
    return kernel_total(ce, kl, valid, labelled, temperature, alpha)[0]


def _kernel_distill_fwd(s, t, labels, valid, labelled, temperature, alpha):
    ce, kl, grad, _ = _kernel_rows(s, t, labels, valid, labelled, temperature, alpha, True)
    total, dtotal_dalpha = kernel_total(ce, kl, valid, labelled, temperature, alpha)
    return total, (grad, dtotal_dalpha)


def _kernel_distill_bwd(residuals, g):
    # Every float operand is float32 here (the caller casts), so are these.
    grad, dtotal_dalpha = residuals
    return g * grad, None, None, None, None, None, g * dtotal_dalpha


_kernel_distill_total.defvjp(_kernel_distill_fwd, _kernel_distill_bwd)

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
        C++ kernel of :mod:`distill_jax.kernels`, CPU only, float32
        arithmetic; built on first use). Same values and gradients.

    Returns:
      ``(sum, count)`` scalars.
    """
    if impl not in DISTILL_IMPLS:
        raise ValueError(f"distill_loss impl={impl!r} is invalid; expected one of {DISTILL_IMPLS}.")
    _check_temperature(temperature)
    _check_alpha(alpha)
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    labels = jnp.asarray(labels)
    _check_catalogue("student_logits", student_logits)
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_labels(labels, student_logits.shape[:-1])
    valid = _prepare_where(where, labels.shape)
    label_valid = _prepare_where(label_where, labels.shape)
    if label_valid is not None and valid is not None:
        label_valid = label_valid & valid
    dtype = _compute_dtype(student_logits)
    count = jnp.asarray(labels.size, dtype) if valid is None else jnp.sum(valid, dtype=dtype)
    if impl == "cpu_kernel":
        items = student_logits.shape[-1]
        rows = jnp.ones(labels.shape, bool) if valid is None else valid
        # float32 in and out of the kernel; autodiff casts the gradient back.
        total = _kernel_distill_total(
            student_logits.reshape(-1, items).astype(jnp.float32),
            jax.lax.stop_gradient(teacher_logits).reshape(-1, items).astype(jnp.float32),
            labels.reshape(-1),
            rows.reshape(-1),
            (rows if label_valid is None else label_valid).reshape(-1),
            jax.lax.stop_gradient(jnp.asarray(temperature, jnp.float32)),
            jnp.asarray(alpha, jnp.float32),
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


def distill_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    where: ArrayLike | None = None,
    label_where: ArrayLike | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Fused mean of ``alpha·CE + (1 − alpha)·T²·KL`` over valid positions.

    Arguments are those of :func:`distill_loss_sum`. Returns a scalar, exactly
    0.0 (with zero gradients) when no position is valid.
    """
    return _mean(
        distill_loss_sum(
            student_logits,
            teacher_logits,
            labels,
            temperature=temperature,
            alpha=alpha,
            where=where,
            label_where=label_where,
            impl=impl,
        )
    )


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
    _check_catalogue("student_logits", student_logits)
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    num_items = student_logits.shape[-1]
    # k is a shape (top_k's output), so it must be a static Python int.
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_items:
        raise ValueError(f"k must be a Python int in [1, V={num_items}], got {k!r}.")
    valid = _prepare_where(where, student_logits.shape[:-1])
    teacher = _sanitize(jax.lax.stop_gradient(teacher_logits), valid)
    _, top_items = jax.lax.top_k(teacher, int(k))
    log_q = jax.nn.log_softmax(_sanitize(student_logits, valid), axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(log_q, top_items, axis=-1), axis=-1)
    return masked_sum_and_count(nll, valid)


def hard_label_distill(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    k: int = 1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Mean cross-entropy against the teacher's top-k items (weight 1/k each).

    Arguments are those of :func:`hard_label_distill_sum`. Returns a scalar, exactly
    0.0 (with zero gradients) when no position is valid.
    """
    return _mean(hard_label_distill_sum(student_logits, teacher_logits, k=k, where=where))


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
    _check_temperature(temperature)
    _check_alpha(alpha)
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    labels = jnp.asarray(labels)
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_same_shape("student_logits", student_logits, "labels", labels)
    valid = _prepare_where(where, student_logits.shape)
    dtype = _compute_dtype(student_logits)

    def clean(x):
        x = x.astype(dtype)
        return x if valid is None else jnp.where(valid, x, 0)

    s, y = clean(student_logits), clean(labels)
    t = clean(jax.lax.stop_gradient(teacher_logits))
    # log σ(x) and log(1 − σ(x)) = log σ(−x) via log_sigmoid: exact at ±1e4.
    bce = -(y * jax.nn.log_sigmoid(s) + (1 - y) * jax.nn.log_sigmoid(-s))
    st, tt = s / temperature, t / temperature
    log_p1, log_p0 = jax.nn.log_sigmoid(tt), jax.nn.log_sigmoid(-tt)
    kl = _xlogy_guarded(jnp.exp(log_p1), log_p1 - jax.nn.log_sigmoid(st)) + _xlogy_guarded(
        jnp.exp(log_p0), log_p0 - jax.nn.log_sigmoid(-st)
    )
    loss = alpha * bce + (1 - alpha) * jnp.square(temperature) * kl
    return masked_sum_and_count(loss, valid)


def binary_distill(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Mean of ``alpha·BCE + (1 − alpha)·T²·KL`` for sigmoid outputs.

    Arguments are those of :func:`binary_distill_sum`. Returns a scalar, exactly
    0.0 (with zero gradients) when no position is valid.
    """
    return _mean(
        binary_distill_sum(
            student_logits,
            teacher_logits,
            labels,
            temperature=temperature,
            alpha=alpha,
            where=where,
        )
    )
