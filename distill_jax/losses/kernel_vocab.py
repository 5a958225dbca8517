"""The cpu_kernel form on a vocab-sharded mesh: the kernel over each device's block of items.

Rows (positions) are split along mesh axis 'data' and the item table along
'model', as in `vocab_parallel.py`. A row's softmax needs the whole row, so
the kernel (`kernel_lib.block_rows_hidden`) runs in two phases:

* forward: each device computes its rows' logits over its block of items in
  cache and writes a few statistics per row (maxima, exponential sums, the
  KL's cross term, the label logits); these are combined across 'model'
  (one ``pmax`` and one ``psum`` of ``[n, 8]``) into CE and KL;
* backward: from the whole rows' statistics, each device's kernel computes
  the gradient over its block and its products: the hidden states' gradient
  (summed across 'model'), the table block's and bias's (summed across
  'data'). ``[N, V]`` is never stored.

Values and gradients equal the dense form's (tests/test_kernels.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from distill_jax.losses import kernel_lib

DATA, MODEL = "data", "model"
ROWS = P(DATA)
BLOCK = P(MODEL)  # a table's rows, a bias
BLOCKS = P(DATA, MODEL)  # [N, V] teacher logits


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static settings of one loss (hashable for custom_vjp)."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    teacher: bool  # distillation; else cross-entropy
    valid_cols: int  # items from here on (a padded table's rows) are -inf
    num_labels: int  # K labels per row, weight 1/K each


def _kernel(spec, args, stats=None):
    h, table, bias, t, t_bias, labels, valid, labelled, seen, temp, alpha = args
    offset = jax.lax.axis_index(MODEL) * table.shape[0]
    return kernel_lib.block_rows_hidden(
        h,
        table,
        bias,
        t,
        t_bias,
        labels,
        valid,
        labelled,
        temp,
        alpha,
        offset,
        valid_cols=spec.valid_cols,
        mask_first=True,
        seen=seen,
        stats=stats,
    )


def _local_forward(spec, *args):
    """Per device: its rows' statistics over its block, combined across 'model'."""
    valid, labelled, temp = args[6], args[7], args[9]
    st = _kernel(spec, args)
    max_s, sum_z, sum_b, max_t, sum_a, cross, lab, count = (st[:, i] for i in range(8))
    # Each block's sums are relative to its own maxima: rescale to the row's.
    m_s = jax.lax.pmax(max_s, MODEL)
    shift_s = max_s - m_s  # -inf for a block with every item masked: weight 0
    parts = [sum_z * jnp.exp(shift_s), sum_b * jnp.exp(shift_s / temp), lab, count]
    if spec.teacher:
        m_t = jax.lax.pmax(max_t, MODEL)
        shift_t = (max_t - m_t) / temp
        w = jnp.exp(shift_t)
        parts.append(sum_a * w)
        # Σ e^a (a − b) with a, b shifted by the row's maxima instead of the block's.
        parts.append(jnp.where(sum_a > 0, w * (cross + sum_a * (shift_t - shift_s / temp)), 0))
    sums = jax.lax.psum(jnp.stack(parts), MODEL)
    z, b, lab, count = sums[0], sums[1], sums[2], sums[3]
    ce = jnp.log(z) + m_s - lab / spec.num_labels
    # A label outside the catalogue is an error, not a zero: NaN, like the kernel's.
    ce = jnp.where(count == spec.num_labels, ce, jnp.nan)
    ce_total = jnp.sum(jnp.where(labelled, ce, 0))
    kd_total = jnp.zeros_like(ce_total)
    zero = jnp.zeros_like(z)
    row = [m_s, z, b, zero, zero + 1]
    if spec.teacher:
        a, cr = sums[4], sums[5]
        kl = cr / a - jnp.log(a) + jnp.log(b)
        kd_total = jnp.square(temp) * jnp.sum(jnp.where(valid, kl, 0))
        row = [m_s, z, b, m_t, a]
    totals = jax.lax.psum(jnp.stack([ce_total, kd_total]), DATA)
    stats = jnp.stack(row + [zero] * 3, axis=-1)
    return totals, stats


def _local_backward(spec, stats, g, *args):
    """Per device: the gradient over its block from the whole rows' statistics."""
    d_h, d_table, d_bias = _kernel(spec, args, stats)
    return (
        g * jax.lax.psum(d_h, MODEL),
        g * jax.lax.psum(d_table, DATA),
        g * jax.lax.psum(d_bias, DATA),
    )


def _in_specs(spec):
    # h, table, bias, t, t_bias, labels, valid, labelled, seen, temp, alpha
    t, t_bias = (BLOCKS, BLOCK) if spec.teacher else (None, None)
    return (ROWS, BLOCK, BLOCK, t, t_bias, ROWS, ROWS, ROWS, ROWS, P(), P())


def _weighted(totals, alpha):
    ce_total, kd_total = totals[0], totals[1]
    # A term with weight 0 is dropped outright (0·inf would be NaN).
    total = jnp.where(alpha == 0, 0, alpha * ce_total) + jnp.where(
        alpha == 1, 0, (1 - alpha) * kd_total
    )
    return total, ce_total - kd_total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _total(spec, *args):
    return _fwd(spec, *args)[0]


def _fwd(spec, *args):
    fwd = jax.shard_map(
        functools.partial(_local_forward, spec),
        mesh=spec.mesh,
        in_specs=_in_specs(spec),
        out_specs=(P(), ROWS),
        check_vma=False,
    )
    totals, stats = fwd(*args)
    total, dtotal_dalpha = _weighted(totals, args[-1])
    return total, (args, stats, dtotal_dalpha)


def _bwd(spec, residuals, g):
    args, stats, dtotal_dalpha = residuals
    bwd = jax.shard_map(
        functools.partial(_local_backward, spec),
        mesh=spec.mesh,
        in_specs=(ROWS, P(), *_in_specs(spec)),
        out_specs=(ROWS, BLOCK, BLOCK),
        check_vma=False,
    )
    d_h, d_table, d_bias = bwd(stats, g, *args)
    # Teacher, labels, masks, seen ids and temperature get no cotangent.
    return (d_h, d_table, d_bias) + (None,) * 7 + (g * dtotal_dalpha,)


_total.defvjp(_fwd, _bwd)


def _pad_rows(x, rows):
    if x is None or x.shape[0] == rows:
        return x
    return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def total(
    mesh,
    h,
    table,
    bias,
    labels,
    valid,
    labelled,
    seen,
    *,
    num_valid_rows: int,
    teacher: tuple | None = None,
    temperature=1.0,
    alpha=1.0,
) -> jax.Array:
    """``alpha·ΣCE + (1 − alpha)·T²·ΣKL`` (``ΣCE`` without `teacher`), float32 rows.

    Args:
      mesh: a mesh with axes 'data' (rows) and 'model' (the table's rows).
      h: ``[N, D]``; table: ``[R, D]``; bias: ``[R]``; the table is padded
        with -inf items to a multiple of the 'model' axis where it is not one.
      labels: ``[N, K]`` int item ids (weight 1/K each).
      valid, labelled: ``[N]`` bool; seen: ``[N, S]`` or None.
      num_valid_rows: the table rows that are items (V+1).
      teacher: ``(logits [N, R], bias [R])`` for distillation, else None.
    """
    model = mesh.shape[MODEL]
    rows = -(-table.shape[0] // model) * model
    t_logits, t_bias = (None, None) if teacher is None else teacher
    spec = _Spec(
        mesh=mesh,
        teacher=teacher is not None,
        valid_cols=int(num_valid_rows),
        num_labels=labels.shape[-1],
    )
    f32 = jnp.float32
    args = (
        h,
        _pad_rows(table, rows),
        _pad_rows(bias, rows),
        None if t_logits is None else jnp.pad(t_logits, ((0, 0), (0, rows - t_logits.shape[1]))),
        _pad_rows(t_bias, rows),
        labels,
        valid,
        labelled,
        seen,
        jax.lax.stop_gradient(jnp.asarray(temperature, f32)),
        jnp.asarray(alpha, f32),
    )
    return _total(spec, *args)
