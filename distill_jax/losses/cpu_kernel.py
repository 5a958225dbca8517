"""The cpu_kernel form: catalogue losses through the fused C++ CPU kernel.

Distillation (`kernel_distill_loss`): the teacher's catalogue product is
XLA's; the student's (narrow) logits, the softmaxes, the KL, the logits'
gradient and its products with the table and the hidden states are the
kernel's (`kernel_lib.distill_rows_hidden`), and the backward pass applies the
loss's scale to those small results (dh, dE, db), never to ``[N, V]``.
Cross-entropy (`kernel_cross_entropy`: teachers, students trained alone, and
the teacher's top-k as K labels) is the same pass without a teacher
(`kernel_lib.cross_entropy_rows_hidden`). Both leave each position's seen ids
out when given them (exclude_history). `logits_distill_total` is the
distillation loss from given logits (`kernel_lib.distill_rows`), behind
`dense.distill_loss(impl=...)`. Values and gradients equal the dense form's;
CPU backend only, float32. From hidden states the losses run on any mesh (the
one set by ``jax.set_mesh``): rows split along 'data', the item table whole on
every device (`common.on_rows`) or, where the mesh has a 'model' axis, split along it
(`kernel_vocab.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import common, kernel_lib, kernel_vocab
from distill_jax.losses.common import SumAndCount

__all__ = [
    "kernel_cross_entropy",
    "kernel_cross_entropy_sum",
    "kernel_distill_loss",
    "kernel_distill_loss_sum",
    "logits_distill_total",
]


# The same loss through the CPU kernel (distill_jax/losses/kernel_lib.py): its forward pass
# also writes the gradient, which the backward pass only scales.


def kernel_total(ce, kl, valid, labelled, temperature, alpha):
    """(alpha·ΣCE + (1 − alpha)·T²·ΣKL, its derivative in alpha) from kernel rows."""
    ce_total = jnp.sum(jnp.where(labelled, ce, 0))
    kd_total = jnp.square(temperature) * jnp.sum(jnp.where(valid, kl, 0))
    return common.weighted_total(ce_total, kd_total, alpha), ce_total - kd_total


def _logit_rows(s, t, labels, valid, labelled, temperature, alpha, with_grad):
    zeros = jnp.zeros(s.shape[-1], jnp.float32)
    return kernel_lib.distill_rows(
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
    ce, kl = _logit_rows(s, t, labels, valid, labelled, temperature, alpha, False)
    return kernel_total(ce, kl, valid, labelled, temperature, alpha)[0]


def _kernel_distill_fwd(s, t, labels, valid, labelled, temperature, alpha):
    ce, kl, grad, _ = _logit_rows(s, t, labels, valid, labelled, temperature, alpha, True)
    total, dtotal_dalpha = kernel_total(ce, kl, valid, labelled, temperature, alpha)
    return total, (grad, dtotal_dalpha)


def _kernel_distill_bwd(residuals, g):
    # Every float operand is float32 here (the caller casts), so are these.
    grad, dtotal_dalpha = residuals
    return g * grad, None, None, None, None, None, g * dtotal_dalpha


_kernel_distill_total.defvjp(_kernel_distill_fwd, _kernel_distill_bwd)


def logits_distill_total(s, t, labels, valid, label_valid, temperature, alpha) -> jax.Array:
    """``alpha·ΣCE + (1 − alpha)·T²·ΣKL`` of given logits through the kernel (float32)."""
    items = s.shape[-1]
    rows = jnp.ones(labels.shape, bool) if valid is None else valid
    # float32 in and out of the kernel; autodiff casts the gradient back.
    return _kernel_distill_total(
        s.reshape(-1, items).astype(jnp.float32),
        jax.lax.stop_gradient(t).reshape(-1, items).astype(jnp.float32),
        labels.reshape(-1),
        rows.reshape(-1),
        (rows if label_valid is None else label_valid).reshape(-1),
        jax.lax.stop_gradient(jnp.asarray(temperature, jnp.float32)),
        jnp.asarray(alpha, jnp.float32),
    )


# --------------------------------------------------------------------------
# The fused CPU kernel (distill_jax/losses/kernel_lib.py) from hidden states: the teacher's
# product is XLA's; the student's (narrow) logits, the softmaxes, KL, the
# logits' gradient and its products with the table and the hidden states are
# the kernel's, and the backward pass applies the loss's scale to those small
# results (dh, dE, db), never to [N, V].
#
# On a mesh of several devices the kernel runs under shard_map
# (`common.on_rows`): each device takes its block of rows (split along
# 'data'; the table whole on each), and the table's and bias's gradients,
# sums over rows, are summed across 'data'.
# --------------------------------------------------------------------------


def _hidden_rows(
    mesh, h, table, bias, t_logits, t_bias, labels, valid, labelled, seen, temp, alpha, grad
):
    def fn(rows, shared):
        h, t_logits, labels, valid, labelled, seen = rows
        table, bias, t_bias, temp, alpha = shared
        return kernel_lib.distill_rows_hidden(
            h,
            table,
            bias,
            t_logits,
            t_bias,
            labels,
            valid,
            labelled,
            temp,
            alpha,
            mask_first=True,
            with_grad=grad,
            seen=seen,
        )

    rows = (h, t_logits, labels, valid, labelled, seen)
    shared = (table, bias, t_bias, temp, alpha)
    # (ce, kl) per row; with the gradient also d_h per row, d_table and d_bias summed.
    return common.on_rows(mesh, fn, rows, shared, 5 if grad else 2, 2 if grad else 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hidden_total(
    mesh, h, table, bias, t_logits, t_bias, labels, valid, labelled, seen, temp, alpha
):
    args = (h, table, bias, t_logits, t_bias, labels, valid, labelled, seen, temp, alpha)
    ce, kl = _hidden_rows(mesh, *args, grad=False)
    return kernel_total(ce, kl, valid, labelled, temp, alpha)[0]


def _hidden_fwd(mesh, h, table, bias, t_logits, t_bias, labels, valid, labelled, seen, temp, alpha):
    args = (h, table, bias, t_logits, t_bias, labels, valid, labelled, seen, temp, alpha)
    # The kernel returns the logits' gradient already multiplied out: grad @
    # table, grad.T @ h and grad.sum(0); the [N, V] gradient is never stored.
    ce, kl, d_h, d_table, bias_grad = _hidden_rows(mesh, *args, grad=True)
    total, dtotal_dalpha = kernel_total(ce, kl, valid, labelled, temp, alpha)
    return total, (d_h, d_table, bias_grad, dtotal_dalpha)


def _hidden_bwd(mesh, residuals, g):
    d_h, d_table, bias_grad, dtotal_dalpha = residuals
    # Teacher, labels, masks, seen ids and temperature get no cotangent.
    return (g * d_h, g * d_table, g * bias_grad) + (None,) * 7 + (g * dtotal_dalpha,)


_hidden_total.defvjp(_hidden_fwd, _hidden_bwd)


def _mask_items(bias, num_valid):
    """`bias` with the rows past the catalogue (a padded table's) at -inf."""
    if num_valid == bias.shape[0]:
        return bias
    return jnp.where(jnp.arange(bias.shape[0]) < num_valid, bias, -jnp.inf)


def _seen_rows(seen, positions):
    """`seen` ``[..., S]`` as ``[N, S]`` int32 rows, or None."""
    if seen is None:
        return None
    seen = jnp.asarray(seen)
    if seen.shape[:-1] != positions or not jnp.issubdtype(seen.dtype, jnp.integer):
        raise ValueError(
            f"seen must be integer item ids of shape {positions} + (S,), got "
            f"{seen.shape} {seen.dtype}."
        )
    return seen.reshape(-1, seen.shape[-1]).astype(jnp.int32)


def kernel_distill_loss_sum(
    h_student: ArrayLike,
    table_s: ArrayLike,
    bias_s: ArrayLike | None,
    h_teacher: ArrayLike,
    table_t: ArrayLike,
    bias_t: ArrayLike | None,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    label_where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
) -> SumAndCount:
    """``alpha·CE + (1 − alpha)·T²·KL`` from hidden states through the CPU kernel.

    Equal in value and gradient (``h_student``, ``table_s``, ``bias_s``,
    ``alpha``) to ``losses.distill_loss_sum`` on the full logits (column 0 at
    -inf), computed in float32. The teacher's catalogue product is an XLA
    matrix multiply; the student's logits, softmaxes, KL, the gradient with
    respect to the logits and its products with the student's table and
    hidden states are the fused kernel of :mod:`distill_jax.losses.kernel_lib`
    (``distill_rows_hidden``: four rows at a time in cache, built on first
    use; CPU backend only).

    Args: as :func:`chunked_distill_loss_sum`, and ``label_where``, an
      optional ``[...]`` mask of the valid positions that carry a label (the
      others add their KL term alone; see ``losses.distill_loss_sum``), and
      ``seen``, optional ``[..., S]`` ids each position leaves out of both
      softmaxes (exclude_history; 0 = none, never the position's label), and
      ``num_valid_rows``, the table rows that are items (V+1; None: all), the
      others -inf (a padded table's).

    Returns:
      ``(sum, count)`` scalars.
    """
    common.check_temperature(temperature)
    common.check_alpha(alpha)
    h_s, table_s = jnp.asarray(h_student), jnp.asarray(table_s)
    h_t, table_t = jnp.asarray(h_teacher), jax.lax.stop_gradient(jnp.asarray(table_t, jnp.float32))
    common.check_tower("student ", h_s, table_s, None if bias_s is None else jnp.asarray(bias_s))
    common.check_tower("teacher ", h_t, table_t, None if bias_t is None else jnp.asarray(bias_t))
    if table_s.shape[0] != table_t.shape[0] or h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(
            f"teacher and student must share positions and catalogue: hidden states "
            f"{h_t.shape} and {h_s.shape}, tables {table_t.shape} and {table_s.shape}."
        )
    labels = jnp.asarray(labels)
    common.check_labels(labels, h_s.shape[:-1], "the hidden states' leading shape")
    valid = common.rows_where(where, labels.shape)
    labelled = (
        valid if label_where is None else valid & common.rows_where(label_where, labels.shape)
    )
    f32 = jnp.float32
    items = table_s.shape[0]
    num_valid = items if num_valid_rows is None else int(num_valid_rows)
    zeros = jnp.zeros((items,), f32)
    bias_s = zeros if bias_s is None else jnp.asarray(bias_s, f32)
    bias_t = jax.lax.stop_gradient(zeros if bias_t is None else jnp.asarray(bias_t, f32))
    # The teacher's product (no gradient); its bias is added inside the kernel.
    t_logits = jax.lax.stop_gradient(h_t.reshape(-1, h_t.shape[-1]).astype(f32) @ table_t.T)
    h = h_s.reshape(-1, h_s.shape[-1]).astype(f32)
    y, v, lab = labels.reshape(-1), valid.reshape(-1), labelled.reshape(-1)
    seen = _seen_rows(seen, labels.shape)
    temp = jax.lax.stop_gradient(jnp.asarray(temperature, f32))
    mesh = common.row_mesh(labels.size, "cpu_kernel")
    if mesh is not None and mesh.shape.get(kernel_vocab.MODEL, 1) > 1:
        # The table split along 'model': the kernel over each device's block.
        total = kernel_vocab.total(
            mesh,
            h,
            table_s.astype(f32),
            bias_s,
            y[:, None],
            v,
            lab,
            seen,
            num_valid_rows=num_valid,
            teacher=(t_logits, bias_t),
            temperature=temp,
            alpha=alpha,
        )
    else:
        # Rows past the catalogue (a padded table's) at -inf through the biases.
        bias_s, bias_t = _mask_items(bias_s, num_valid), _mask_items(bias_t, num_valid)
        args = (h, table_s.astype(f32), bias_s, t_logits, bias_t, y, v, lab, seen, temp)
        total = _hidden_total(mesh, *args, jnp.asarray(alpha, f32))
    dtype = common.compute_dtype(h_s)
    return total.astype(dtype), jnp.sum(valid, dtype=dtype)


kernel_distill_loss = common.mean_of(kernel_distill_loss_sum)


# --------------------------------------------------------------------------
# Cross-entropy (teachers, students trained alone, the teacher's top-k): the
# same kernel without a teacher (`kernel_lib.cross_entropy_rows_hidden`).
# --------------------------------------------------------------------------


def _ce_rows(mesh, h, table, bias, labels, valid, seen, grad):
    def fn(rows, shared):
        h, labels, valid, seen = rows
        table, bias = shared
        return kernel_lib.cross_entropy_rows_hidden(
            h, table, bias, labels, valid, mask_first=True, with_grad=grad, seen=seen
        )

    # ce per row; with the gradient also d_h per row, d_table and d_bias summed.
    rows, shared = (h, labels, valid, seen), (table, bias)
    return common.on_rows(mesh, fn, rows, shared, 4 if grad else 1, 2 if grad else 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce_total(mesh, h, table, bias, labels, valid, seen):
    (ce,) = _ce_rows(mesh, h, table, bias, labels, valid, seen, grad=False)
    return jnp.sum(ce)  # 0 on masked rows


def _ce_fwd(mesh, h, table, bias, labels, valid, seen):
    ce, d_h, d_table, bias_grad = _ce_rows(mesh, h, table, bias, labels, valid, seen, grad=True)
    return jnp.sum(ce), (d_h, d_table, bias_grad)


def _ce_bwd(mesh, residuals, g):
    d_h, d_table, bias_grad = residuals
    return g * d_h, g * d_table, g * bias_grad, None, None, None


_ce_total.defvjp(_ce_fwd, _ce_bwd)


def kernel_cross_entropy_sum(
    hidden: ArrayLike,
    table: ArrayLike,
    bias: ArrayLike | None,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    *,
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
) -> SumAndCount:
    """Softmax cross-entropy from hidden states through the CPU kernel, summed.

    Equal in value and gradient (``hidden``, ``table``, ``bias``) to
    ``losses.cross_entropy_sum`` of the logits ``hidden @ table.T + bias``
    with column 0 (and each position's ``seen`` ids) at -inf, computed in
    float32; the ``[..., V]`` logits and their gradient are never stored.

    Args:
      hidden: ``[..., D]`` hidden states.
      table: ``[V+1, D]`` item table (row 0: padding).
      bias: optional ``[V+1]`` output bias.
      labels: ``[...]`` target ids, or ``[..., K]``: K targets per position,
        weight 1/K each (the 'hard' target's top-k).
      where: optional ``[...]`` mask of the valid positions.
      seen: optional ``[..., S]`` ids each position leaves out (exclude_history;
        0 = none).
      num_valid_rows: the table rows that are items (V+1; None: all), the
        others -inf (a padded table's).

    Returns:
      ``(sum, count)`` scalars.
    """
    h, table = jnp.asarray(hidden), jnp.asarray(table)
    common.check_tower("", h, table, None if bias is None else jnp.asarray(bias))
    positions = h.shape[:-1]
    labels = jnp.asarray(labels)
    if labels.shape[: len(positions)] != positions or labels.ndim > len(positions) + 1:
        raise ValueError(
            f"labels must have shape {positions} or {positions} + (K,) (the hidden "
            f"states' leading shape), got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer item ids, got dtype {labels.dtype}.")
    valid = common.rows_where(where, positions)
    f32 = jnp.float32
    rows = valid.size
    items = table.shape[0]
    num_valid = items if num_valid_rows is None else int(num_valid_rows)
    bias = jnp.zeros((items,), f32) if bias is None else jnp.asarray(bias, f32)
    h = h.reshape(rows, h.shape[-1]).astype(f32)
    y, v, seen = labels.reshape(rows, -1), valid.reshape(-1), _seen_rows(seen, positions)
    mesh = common.row_mesh(rows, "cpu_kernel")
    if mesh is not None and mesh.shape.get(kernel_vocab.MODEL, 1) > 1:
        # The table split along 'model': the kernel over each device's block.
        total = kernel_vocab.total(
            mesh, h, table.astype(f32), bias, y, v, v, seen, num_valid_rows=num_valid
        )
    else:
        total = _ce_total(mesh, h, table.astype(f32), _mask_items(bias, num_valid), y, v, seen)
    dtype = common.compute_dtype(h)
    return total.astype(dtype), jnp.sum(valid, dtype=dtype)


kernel_cross_entropy = common.mean_of(kernel_cross_entropy_sum)
