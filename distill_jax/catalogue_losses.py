"""Catalogue losses from hidden states and the item table, chunk by chunk.

The plain losses in :mod:`distill_jax.losses` take ``[N, V+1]`` logits. For a
large catalogue that tensor (and its gradient, and autodiff's intermediates)
dominates memory and time. The functions here take the hidden states
``h [..., D]``, the tied item table ``E [V+1, D]`` and an optional output bias
``b [V+1]`` instead, and compute the same values and gradients as the plain
losses applied to ``h @ E.T + b`` (column 0, the padding item, at ``-inf``,
exactly as ``SequenceRecommender.logits`` does) without ever forming more than
an ``[N, chunk_size]`` block of logits:

* The forward pass scans (``jax.lax.scan``) over blocks of ``chunk_size``
  table rows and keeps, per position, a running maximum and running sums: the
  online logsumexp. The table is padded to a multiple of ``chunk_size`` with
  rows whose columns are masked to ``-inf``.
* The backward pass is a ``jax.custom_vjp`` that scans the blocks again,
  recomputes each block of logits and applies the closed-form gradient with
  respect to the student logits,
  ``alpha·(softmax(z) − onehot(y)) + (1 − alpha)·T·(softmax(z/T) − p_teacher)``,
  accumulating ``dh`` in the scan carry and emitting the table and bias
  gradients block by block. Autodiff of the forward scan would instead store
  every block's logits for the backward pass, i.e. the full ``[N, V]`` again.

Conventions are those of :mod:`distill_jax.losses`: ``where`` masks positions
(which may hold anything, even NaN), ``*_sum`` functions return ``(sum,
count)``, the teacher gets no gradient, arithmetic runs in at least float32.
The teacher and student may have different widths ``D``, but must share the
catalogue (``V+1`` rows).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax import kernels, losses

__all__ = [
    "chunked_cross_entropy",
    "chunked_cross_entropy_sum",
    "chunked_distill_loss",
    "chunked_distill_loss_sum",
    "chunked_kl_distill",
    "chunked_kl_distill_sum",
    "kernel_distill_loss",
    "kernel_distill_loss_sum",
]

SumAndCount = tuple[jax.Array, jax.Array]

DEFAULT_CHUNK_SIZE = 2048


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static configuration of one fused chunked loss (hashable for custom_vjp)."""

    num_rows: int  # V + 1: the real catalogue columns, before padding
    chunk_size: int
    use_ce: bool
    use_kl: bool
    # Both terms present: weigh them alpha and (1 − alpha); otherwise weight 1.
    weighted: bool
    # T == 1 as a Python number: the student's two softmaxes coincide.
    unit_temperature: bool


# --------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a Python int >= 1, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a Python int >= 1, got {chunk_size!r}.")


def _check_tower(prefix: str, h: jax.Array, table: jax.Array, bias: jax.Array | None) -> None:
    """Checks one model's hidden states, item table and bias against each other."""
    if h.ndim < 1:
        raise ValueError(f"{prefix}hidden states must have shape [..., D], got {h.shape}.")
    if table.ndim != 2 or table.shape[0] < 2:
        raise ValueError(
            f"{prefix}table must have shape [V+1, D] with V >= 1 (row 0 = padding), "
            f"got {table.shape}."
        )
    if table.shape[1] != h.shape[-1]:
        raise ValueError(
            f"{prefix}table has width D={table.shape[1]} but the hidden states have "
            f"D={h.shape[-1]}; expected equal."
        )
    if bias is not None and bias.shape != (table.shape[0],):
        raise ValueError(
            f"{prefix}bias must have shape [V+1]=({table.shape[0]},) to match the table, "
            f"got {bias.shape}."
        )


def _check_labels(labels: jax.Array, positions: tuple[int, ...]) -> None:
    if labels.shape != positions:
        raise ValueError(
            f"labels must have shape {positions} (the hidden states' leading shape), "
            f"got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer item ids, got dtype {labels.dtype}.")


def _prepare_where(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array:
    """``where`` as a bool array of ``shape`` (all True when None)."""
    if where is None:
        return jnp.ones(shape, jnp.bool_)
    where = jnp.asarray(where)
    if where.shape != shape:
        raise ValueError(
            f"where must have shape {shape} (one flag per position), got {where.shape}."
        )
    if where.dtype != jnp.bool_ and not jnp.issubdtype(where.dtype, jnp.integer):
        raise TypeError(f"where must be a boolean (or 0/1 integer) mask, got {where.dtype}.")
    return where.astype(jnp.bool_)


# --------------------------------------------------------------------------
# The fused chunked loss.
# --------------------------------------------------------------------------


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad)


def _to_chunks(x: jax.Array | None, chunk_size: int) -> jax.Array | None:
    """``[R, ...]`` with R a multiple of chunk_size -> ``[R / chunk_size, chunk_size, ...]``."""
    if x is None:
        return None
    return x.reshape((x.shape[0] // chunk_size, chunk_size) + x.shape[1:])


def _block_logits(h, table_c, bias_c, index, spec: _Spec, dtype):
    """One ``[N, chunk_size]`` block of logits; padding and pad-row columns at -inf."""
    z = jnp.einsum("nd,cd->nc", h, table_c, preferred_element_type=dtype)
    z = z + bias_c.astype(dtype)
    column = index * spec.chunk_size + jnp.arange(spec.chunk_size)
    real = (column >= 1) & (column < spec.num_rows)
    return jnp.where(real, z, -jnp.inf)


def _finite_or_zero(m):
    # A row whose columns so far are all -inf (the first block at chunk_size 1,
    # say) has max -inf; shifting by it would give exp(-inf + inf) = NaN.
    return jnp.where(jnp.isfinite(m), m, 0)


def _forward_stats(spec: _Spec, h_s, chunks_s, h_t, chunks_t, temperature, dtype):
    """Online logsumexp over the blocks; returns per-row statistics ``[N]`` each.

    Returns ``(m_z, s_z, s_b, m_t, s_a, cross)`` where, over all real columns,
    ``m_z = max z``, ``s_z = Σ e^(z−m_z)``, ``s_b = Σ e^((z−m_z)/T)``,
    ``m_t = max t``, ``s_a = Σ e^((t−m_t)/T)`` and
    ``cross = Σ e^((t−m_t)/T)·(t − z)``. Unused entries are zeros.
    """
    n = h_s.shape[0]
    neg_inf = jnp.full((n,), -jnp.inf, dtype)
    zeros = jnp.zeros((n,), dtype)
    init = (neg_inf, zeros, zeros, neg_inf, zeros, zeros)

    def body(carry, xs):
        m_z, s_z, s_b, m_t, s_a, cross = carry
        index, table_s, bias_s, table_t, bias_t = xs
        z = _block_logits(h_s, table_s, bias_s, index, spec, dtype)
        new_m_z = jnp.maximum(m_z, jnp.max(z, axis=-1))
        shift_z = _finite_or_zero(new_m_z)
        zs = z - shift_z[:, None]
        s_z = s_z * jnp.exp(m_z - shift_z) + jnp.sum(jnp.exp(zs), axis=-1)
        if spec.use_kl:
            if not spec.unit_temperature:
                s_b = s_b * jnp.exp((m_z - shift_z) / temperature) + jnp.sum(
                    jnp.exp(zs / temperature), axis=-1
                )
            t = _block_logits(h_t, table_t, bias_t, index, spec, dtype)
            new_m_t = jnp.maximum(m_t, jnp.max(t, axis=-1))
            shift_t = _finite_or_zero(new_m_t)
            rescale = jnp.exp((m_t - shift_t) / temperature)
            p = jnp.exp((t - shift_t[:, None]) / temperature)  # unnormalised teacher
            s_a = s_a * rescale + jnp.sum(p, axis=-1)
            # Columns -inf for both give 0·(−inf + inf): 0 by 0·log 0 = 0.
            cross = cross * rescale + jnp.sum(jnp.where(p > 0, p * (t - z), 0), axis=-1)
            m_t = new_m_t
        return (new_m_z, s_z, s_b, m_t, s_a, cross), None

    index = jnp.arange(chunks_s[0].shape[0])
    xs = (index, chunks_s[0], chunks_s[1]) + (chunks_t if spec.use_kl else (None, None))
    (m_z, s_z, s_b, m_t, s_a, cross), _ = jax.lax.scan(body, init, xs)
    if spec.unit_temperature:
        s_b = s_z
    return m_z, s_z, s_b, m_t, s_a, cross


def _label_logits(h, table, bias, labels, dtype):
    """``z[n, labels[n]]`` from one row gather: O(N·D), no block needed."""
    # mode="fill" gives NaN for an out-of-range label at a valid position: loud.
    rows = jnp.take(table, labels, axis=0, mode="fill", fill_value=jnp.nan)
    z_y = jnp.einsum("nd,nd->n", h, rows, preferred_element_type=dtype)
    z_y = z_y + jnp.take(bias, labels, mode="fill", fill_value=jnp.nan).astype(dtype)
    # The padding column is -inf: a valid label 0 costs +inf, as in the plain loss.
    return jnp.where(labels == 0, -jnp.inf, z_y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_total(spec, h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, temp, alpha):
    total, _ = _chunked_fwd(
        spec, h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, temp, alpha
    )
    return total


def _chunked_fwd(spec, h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, temp, alpha):
    dtype = alpha.dtype
    chunks_s = (_to_chunks(table_s, spec.chunk_size), _to_chunks(bias_s, spec.chunk_size))
    chunks_t = (_to_chunks(table_t, spec.chunk_size), _to_chunks(bias_t, spec.chunk_size))
    m_z, s_z, s_b, m_t, s_a, cross = _forward_stats(spec, h_s, chunks_s, h_t, chunks_t, temp, dtype)
    log_s_z, log_s_b, log_s_a = jnp.log(s_z), jnp.log(s_b), jnp.log(s_a)
    ce_total = kd_total = jnp.zeros((), dtype)
    if spec.use_ce:
        ce = m_z + log_s_z - _label_logits(h_s, table_s, bias_s, labels, dtype)
        ce_total = jnp.sum(jnp.where(valid, ce, 0))
    if spec.use_kl:
        # KL(p‖q) = Σ p·(t − z)/T + (m_z − m_t)/T − log s_a + log s_b, with
        # Σ p·(t − z) = cross / s_a (derivation in _forward_stats' docstring terms).
        kl = cross / (temp * s_a) + (m_z - m_t) / temp - log_s_a + log_s_b
        # T² keeps the gradient's scale roughly independent of T (Hinton et al. 2015).
        kd_total = jnp.square(temp) * jnp.sum(jnp.where(valid, kl, 0))
    if spec.weighted:
        # A term with weight 0 is dropped outright, so that e.g. pure KD (alpha=0)
        # is not turned into NaN by 0·inf from a label on a -inf column.
        total = jnp.where(alpha == 0, 0, alpha * ce_total) + jnp.where(
            alpha == 1, 0, (1 - alpha) * kd_total
        )
    else:
        total = ce_total + kd_total
    stats = (m_z + log_s_z, m_z, log_s_b, m_t, log_s_a)
    residuals = (h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, temp, alpha, stats)
    return total, (residuals, ce_total - kd_total)


def _chunked_bwd(spec, res, g):
    residuals, dtotal_dalpha = res
    h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, temp, alpha, stats = residuals
    lse_z, m_z, log_s_b, m_t, log_s_a = (x[:, None] for x in stats)
    dtype = alpha.dtype
    w_ce = alpha if spec.weighted else 1
    w_kl = (1 - alpha) if spec.weighted else 1
    scale = jnp.where(valid, g, 0).astype(dtype)[:, None]  # masked rows get no gradient
    h_s32 = h_s.astype(dtype)

    def body(dh, xs):
        index, tab_s, b_s, tab_t, b_t = xs
        z = _block_logits(h_s, tab_s, b_s, index, spec, dtype)
        grad = jnp.zeros_like(z)
        if spec.use_ce:
            column = index * spec.chunk_size + jnp.arange(spec.chunk_size)
            onehot = labels[:, None] == column
            grad = w_ce * (jnp.exp(z - lse_z) - onehot)
        if spec.use_kl:
            q = jnp.exp(z - lse_z) if spec.unit_temperature else jnp.exp((z - m_z) / temp - log_s_b)
            t = _block_logits(h_t, tab_t, b_t, index, spec, dtype)
            p = jnp.exp((t - m_t) / temp - log_s_a)
            grad = grad + (w_kl * temp) * (q - p)
        grad = grad * scale
        dh = dh + jnp.einsum("nc,cd->nd", grad, tab_s.astype(dtype))
        d_table = jnp.einsum("nc,nd->cd", grad, h_s32).astype(tab_s.dtype)
        return dh, (d_table, jnp.sum(grad, axis=0).astype(b_s.dtype))

    chunks = (_to_chunks(table_s, spec.chunk_size), _to_chunks(bias_s, spec.chunk_size))
    chunks = chunks + (
        (_to_chunks(table_t, spec.chunk_size), _to_chunks(bias_t, spec.chunk_size))
        if spec.use_kl
        else (None, None)
    )
    index = jnp.arange(chunks[0].shape[0])
    dh0 = jnp.zeros(h_s.shape, dtype)
    dh, (d_table, d_bias) = jax.lax.scan(body, dh0, (index,) + chunks)
    d_table = d_table.reshape(table_s.shape)
    d_bias = d_bias.reshape(bias_s.shape)
    # Teacher, labels, mask and temperature get no cotangent (None = zero);
    # alpha's exact derivative (CE − T²·KL) is free, so give it.
    d_alpha = (g * dtotal_dalpha).astype(alpha.dtype)
    return (dh.astype(h_s.dtype), d_table, d_bias, None, None, None, None, None, None, d_alpha)


_chunked_total.defvjp(_chunked_fwd, _chunked_bwd)


def _run(
    *,
    h_student,
    table_s,
    bias_s,
    h_teacher=None,
    table_t=None,
    bias_t=None,
    labels=None,
    where,
    temperature,
    alpha,
    chunk_size,
    use_ce,
    use_kl,
) -> SumAndCount:
    """Checks and flattens the arguments, pads the tables, calls the fused core."""
    _check_chunk_size(chunk_size)
    h_s, tab_s = jnp.asarray(h_student), jnp.asarray(table_s)
    b_s = None if bias_s is None else jnp.asarray(bias_s)
    _check_tower("student " if use_kl else "", h_s, tab_s, b_s)
    positions = h_s.shape[:-1]
    num_rows = tab_s.shape[0]
    valid = _prepare_where(where, positions).reshape(-1)
    dtype = functools.reduce(jnp.promote_types, [h_s.dtype, tab_s.dtype, jnp.float32])
    # chunk_size is an upper bound: the rows are split into as many chunks as
    # it needs, of equal size (rounded up to 8), so that the padding stays
    # small (10,001 rows with chunk_size 8192: 2 chunks of 5,008, not 16,384
    # rows, which made the scan 2.4x slower than the plain loss).
    num_chunks = -(-num_rows // chunk_size)
    balanced = -(-num_rows // num_chunks)
    chunk_size = min(chunk_size, -(-balanced // 8) * 8)
    padded_rows = num_chunks * chunk_size

    def prepare(h, table, bias):
        # Zero masked positions' hidden states (O(N·D)) so garbage there, even
        # NaN, cannot reach the row statistics or the gradient.
        h = jnp.where(valid[:, None], h.reshape(-1, h.shape[-1]), 0)
        bias = jnp.zeros((num_rows,), dtype) if bias is None else bias
        return h, _pad_rows(table, padded_rows), _pad_rows(bias, padded_rows)

    h_s, tab_s, b_s = prepare(h_s, tab_s, b_s)
    h_t = tab_t = b_t = None
    if use_kl:
        h_t, tab_t = jnp.asarray(h_teacher), jnp.asarray(table_t)
        b_t = None if bias_t is None else jnp.asarray(bias_t)
        _check_tower("teacher ", h_t, tab_t, b_t)
        if h_t.shape[:-1] != positions:
            raise ValueError(
                f"h_teacher must have the leading shape {positions} of h_student, "
                f"got {h_t.shape[:-1]}."
            )
        if tab_t.shape[0] != num_rows:
            raise ValueError(
                f"table_t must have the student's V+1={num_rows} rows (one catalogue), "
                f"got {tab_t.shape[0]}."
            )
        h_t, tab_t, b_t = jax.lax.stop_gradient(prepare(h_t, tab_t, b_t))
    flat_labels = None
    if use_ce:
        labels = jnp.asarray(labels)
        _check_labels(labels, positions)
        # Masked labels may be out of range (e.g. -1 padding); point them at a real row.
        flat_labels = jnp.where(valid, labels.reshape(-1), 1)
    spec = _Spec(
        num_rows=num_rows,
        chunk_size=int(chunk_size),
        use_ce=use_ce,
        use_kl=use_kl,
        weighted=use_ce and use_kl,
        unit_temperature=isinstance(temperature, numbers.Real) and temperature == 1,
    )
    total = _chunked_total(
        spec,
        h_s,
        tab_s,
        b_s,
        h_t,
        tab_t,
        b_t,
        flat_labels,
        valid,
        jax.lax.stop_gradient(jnp.asarray(temperature, dtype)),
        jnp.asarray(alpha, dtype),
    )
    return total, jnp.sum(valid, dtype=dtype)


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def chunked_cross_entropy_sum(
    h: ArrayLike,
    table: ArrayLike,
    bias: ArrayLike | None,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SumAndCount:
    """Softmax cross-entropy of ``h @ table.T + bias`` summed over valid positions.

    Equal in value and gradient to ``losses.cross_entropy_sum`` on the full
    logits (column 0 at -inf), with memory ``O(N·chunk_size)`` beyond the
    inputs and their gradients.

    Args:
      h: ``[..., D]`` hidden states.
      table: ``[V+1, D]`` item table; row 0 is padding and never scored.
      bias: optional ``[V+1]`` output bias (None means zero).
      labels: ``[...]`` integer target ids in ``[1, V]``.
      where: optional ``[...]`` boolean mask of valid positions.
      chunk_size: table rows per block of logits (a Python int >= 1).

    Returns:
      ``(sum, count)`` scalars.
    """
    return _run(
        h_student=h,
        table_s=table,
        bias_s=bias,
        labels=labels,
        where=where,
        temperature=1.0,
        alpha=1.0,
        chunk_size=chunk_size,
        use_ce=True,
        use_kl=False,
    )


def chunked_kl_distill_sum(
    h_student: ArrayLike,
    table_s: ArrayLike,
    bias_s: ArrayLike | None,
    h_teacher: ArrayLike,
    table_t: ArrayLike,
    bias_t: ArrayLike | None,
    where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SumAndCount:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` summed over valid positions.

    ``s = h_student @ table_s.T + bias_s`` and ``t = h_teacher @ table_t.T +
    bias_t``, both with column 0 at -inf, are never formed whole. Equal in value
    and gradient to ``losses.kl_distill_sum`` on those logits.

    Args:
      h_student: ``[..., D_s]`` student hidden states.
      table_s: ``[V+1, D_s]`` student item table.
      bias_s: optional ``[V+1]`` student output bias (None means zero).
      h_teacher: ``[..., D_t]`` teacher hidden states; receive no gradient.
      table_t: ``[V+1, D_t]`` teacher item table; receives no gradient.
      bias_t: optional ``[V+1]`` teacher output bias; receives no gradient.
      where: optional ``[...]`` boolean mask of valid positions.
      temperature: softening temperature ``T > 0``; receives no gradient.
      chunk_size: table rows per block of logits (a Python int >= 1).

    Returns:
      ``(sum, count)`` scalars.
    """
    losses._check_temperature(temperature)
    return _run(
        h_student=h_student,
        table_s=table_s,
        bias_s=bias_s,
        h_teacher=h_teacher,
        table_t=table_t,
        bias_t=bias_t,
        where=where,
        temperature=temperature,
        alpha=0.0,
        chunk_size=chunk_size,
        use_ce=False,
        use_kl=True,
    )


def chunked_distill_loss_sum(
    h_student: ArrayLike,
    table_s: ArrayLike,
    bias_s: ArrayLike | None,
    h_teacher: ArrayLike,
    table_t: ArrayLike,
    bias_t: ArrayLike | None,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SumAndCount:
    """``alpha·CE + (1 − alpha)·T²·KL`` from hidden states, summed over valid positions.

    Equal in value and gradient to ``losses.distill_loss_sum`` on the full
    student and teacher logits (see :func:`chunked_kl_distill_sum`), including
    the derivative with respect to ``alpha``.

    Args:
      h_student: ``[..., D_s]`` student hidden states.
      table_s: ``[V+1, D_s]`` student item table.
      bias_s: optional ``[V+1]`` student output bias (None means zero).
      h_teacher: ``[..., D_t]`` teacher hidden states; receive no gradient.
      table_t: ``[V+1, D_t]`` teacher item table; receives no gradient.
      bias_t: optional ``[V+1]`` teacher output bias; receives no gradient.
      labels: ``[...]`` integer target ids in ``[1, V]``.
      where: optional ``[...]`` boolean mask of valid positions.
      temperature: softening temperature ``T > 0``; receives no gradient.
      alpha: weight of the hard-label term, in ``[0, 1]``.
      chunk_size: table rows per block of logits (a Python int >= 1).

    Returns:
      ``(sum, count)`` scalars.
    """
    losses._check_temperature(temperature)
    losses._check_alpha(alpha)
    return _run(
        h_student=h_student,
        table_s=table_s,
        bias_s=bias_s,
        h_teacher=h_teacher,
        table_t=table_t,
        bias_t=bias_t,
        labels=labels,
        where=where,
        temperature=temperature,
        alpha=alpha,
        chunk_size=chunk_size,
        use_ce=True,
        use_kl=True,
    )


def _mean(sum_and_count: SumAndCount) -> jax.Array:
    total, count = sum_and_count
    # max(count, 1): an all-masked batch gives exactly 0 (total is 0), not NaN.
    return total / jnp.maximum(count, 1)


def chunked_cross_entropy(
    h: ArrayLike,
    table: ArrayLike,
    bias: ArrayLike | None,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Mean of :func:`chunked_cross_entropy_sum` over valid positions (0.0 if none)."""
    return _mean(chunked_cross_entropy_sum(h, table, bias, labels, where, chunk_size=chunk_size))


def chunked_kl_distill(
    h_student: ArrayLike,
    table_s: ArrayLike,
    bias_s: ArrayLike | None,
    h_teacher: ArrayLike,
    table_t: ArrayLike,
    bias_t: ArrayLike | None,
    where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Mean of :func:`chunked_kl_distill_sum` over valid positions (0.0 if none)."""
    return _mean(
        chunked_kl_distill_sum(
            h_student,
            table_s,
            bias_s,
            h_teacher,
            table_t,
            bias_t,
            where,
            temperature=temperature,
            chunk_size=chunk_size,
        )
    )


def chunked_distill_loss(
    h_student: ArrayLike,
    table_s: ArrayLike,
    bias_s: ArrayLike | None,
    h_teacher: ArrayLike,
    table_t: ArrayLike,
    bias_t: ArrayLike | None,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Mean of :func:`chunked_distill_loss_sum` over valid positions (0.0 if none)."""
    return _mean(
        chunked_distill_loss_sum(
            h_student,
            table_s,
            bias_s,
            h_teacher,
            table_t,
            bias_t,
            labels,
            where,
            temperature=temperature,
            alpha=alpha,
            chunk_size=chunk_size,
        )
    )


# --------------------------------------------------------------------------
# The fused CPU kernel (distill_jax/kernels) from hidden states: the teacher's
# product is XLA's; the student's (narrow) logits, the softmaxes, KL, the
# logits' gradient and its products with the table and the hidden states are
# the kernel's, and the backward pass applies the loss's scale to those small
# results (dh, dE, db), never to [N, V].
# --------------------------------------------------------------------------


def _kernel_rows(h, table, bias, t_logits, t_bias, labels, valid, labelled, temp, alpha, grad):
    return kernels.distill_rows_hidden(
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
    )


@jax.custom_vjp
def _kernel_total(h, table, bias, t_logits, t_bias, labels, valid, labelled, temp, alpha):
    args = (h, table, bias, t_logits, t_bias, labels, valid, labelled, temp, alpha)
    ce, kl = _kernel_rows(*args, grad=False)
    return losses.kernel_total(ce, kl, valid, labelled, temp, alpha)[0]


def _kernel_fwd(h, table, bias, t_logits, t_bias, labels, valid, labelled, temp, alpha):
    args = (h, table, bias, t_logits, t_bias, labels, valid, labelled, temp, alpha)
    # The kernel returns the logits' gradient already multiplied out: grad @
    # table, grad.T @ h and grad.sum(0); the [N, V] gradient is never stored.
    ce, kl, d_h, d_table, bias_grad = _kernel_rows(*args, grad=True)
    total, dtotal_dalpha = losses.kernel_total(ce, kl, valid, labelled, temp, alpha)
    return total, (d_h, d_table, bias_grad, dtotal_dalpha)


def _kernel_bwd(residuals, g):
    d_h, d_table, bias_grad, dtotal_dalpha = residuals
    return (
        g * d_h,
        g * d_table,
        g * bias_grad,
        None,
        None,
        None,
        None,
        None,
        None,
        g * dtotal_dalpha,
    )


_kernel_total.defvjp(_kernel_fwd, _kernel_bwd)


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
) -> SumAndCount:
    """``alpha·CE + (1 − alpha)·T²·KL`` from hidden states through the CPU kernel.

    Equal in value and gradient (``h_student``, ``table_s``, ``bias_s``,
    ``alpha``) to ``losses.distill_loss_sum`` on the full logits (column 0 at
    -inf), computed in float32. The teacher's catalogue product is an XLA
    matrix multiply; the student's logits, softmaxes, KL, the gradient with
    respect to the logits and its products with the student's table and
    hidden states are the fused kernel of :mod:`distill_jax.kernels`
    (``distill_rows_hidden``: four rows at a time in cache, built on first
    use; CPU backend only).

    Args: as :func:`chunked_distill_loss_sum`, and ``label_where``, an
      optional ``[...]`` mask of the valid positions that carry a label (the
      others add their KL term alone; see ``losses.distill_loss_sum``).

    Returns:
      ``(sum, count)`` scalars.
    """
    losses._check_temperature(temperature)
    losses._check_alpha(alpha)
    h_s, table_s = jnp.asarray(h_student), jnp.asarray(table_s)
    h_t, table_t = jnp.asarray(h_teacher), jax.lax.stop_gradient(jnp.asarray(table_t, jnp.float32))
    _check_tower("student ", h_s, table_s, None if bias_s is None else jnp.asarray(bias_s))
    _check_tower("teacher ", h_t, table_t, None if bias_t is None else jnp.asarray(bias_t))
    if table_s.shape[0] != table_t.shape[0] or h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(
            f"teacher and student must share positions and catalogue: hidden states "
            f"{h_t.shape} and {h_s.shape}, tables {table_t.shape} and {table_s.shape}."
        )
    labels = jnp.asarray(labels)
    _check_labels(labels, h_s.shape[:-1])
    valid = _prepare_where(where, labels.shape)
    labelled = valid if label_where is None else valid & _prepare_where(label_where, labels.shape)
    f32 = jnp.float32
    items = table_s.shape[0]
    zeros = jnp.zeros((items,), f32)
    # The teacher's product (no gradient); its bias is added inside the kernel.
    t_logits = jax.lax.stop_gradient(h_t.reshape(-1, h_t.shape[-1]).astype(f32) @ table_t.T)
    total = _kernel_total(
        h_s.reshape(-1, h_s.shape[-1]).astype(f32),
        table_s.astype(f32),
        zeros if bias_s is None else jnp.asarray(bias_s, f32),
        t_logits,
        jax.lax.stop_gradient(zeros if bias_t is None else jnp.asarray(bias_t, f32)),
        labels.reshape(-1),
        valid.reshape(-1),
        labelled.reshape(-1),
        jax.lax.stop_gradient(jnp.asarray(temperature, f32)),
        jnp.asarray(alpha, f32),
    )
    dtype = losses._compute_dtype(h_s)
    return total.astype(dtype), jnp.sum(valid, dtype=dtype)


def kernel_distill_loss(
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
) -> jax.Array:
    """Mean of :func:`kernel_distill_loss_sum` over valid positions (0.0 if none)."""
    return _mean(
        kernel_distill_loss_sum(
            h_student,
            table_s,
            bias_s,
            h_teacher,
            table_t,
            bias_t,
            labels,
            where,
            label_where,
            temperature=temperature,
            alpha=alpha,
        )
    )
