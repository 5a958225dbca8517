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

from distill_jax.losses import common
from distill_jax.losses.common import SumAndCount

__all__ = [
    "chunked_cross_entropy",
    "chunked_cross_entropy_sum",
    "chunked_distill_loss",
    "chunked_distill_loss_sum",
]

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
    # Per-row item ids left out of every softmax (exclude_history).
    exclude: bool = False


# --------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a Python int >= 1, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a Python int >= 1, got {chunk_size!r}.")


# --------------------------------------------------------------------------
# The fused chunked loss.
# --------------------------------------------------------------------------


def _balanced_chunk(rows: int, chunk_size: int) -> int:
    """The block size for `rows` table rows: at most `chunk_size`, chunks of equal size.

    chunk_size is an upper bound: the rows are split into as many chunks as it
    needs, of equal size (rounded up to 8), so that the padding stays small
    (10,001 rows with chunk_size 8192: 2 chunks of 5,008, not 16,384 rows,
    which made the scan 2.4x slower than the dense loss).
    """
    num_chunks = -(-rows // chunk_size)
    balanced = -(-rows // num_chunks)
    return min(chunk_size, -(-balanced // 8) * 8)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad)


def _to_chunks(x: jax.Array | None, chunk_size: int) -> jax.Array | None:
    """``[R, ...]`` with R a multiple of chunk_size -> ``[R / chunk_size, chunk_size, ...]``."""
    if x is None:
        return None
    return x.reshape((x.shape[0] // chunk_size, chunk_size) + x.shape[1:])


def _block_logits(h, table_c, bias_c, index, spec: _Spec, dtype, seen=None):
    """One ``[N, chunk_size]`` block of logits; padding, pad-row and `seen` columns at -inf."""
    z = jnp.einsum("nd,cd->nc", h, table_c, preferred_element_type=dtype)
    z = z + bias_c.astype(dtype)
    column = index * spec.chunk_size + jnp.arange(spec.chunk_size)
    real = (column >= 1) & (column < spec.num_rows)
    z = jnp.where(real, z, -jnp.inf)
    if spec.exclude:
        # The row's seen ids that fall in this block, scattered into an [N, C]
        # mask (an [N, C, S] comparison would be S times larger).
        local = seen - index * spec.chunk_size
        local = jnp.where((local >= 0) & (local < spec.chunk_size), local, spec.chunk_size)
        rows = jnp.arange(z.shape[0])[:, None]
        hit = jnp.zeros(z.shape, jnp.bool_).at[rows, local].set(True, mode="drop")
        z = jnp.where(hit, -jnp.inf, z)
    return z


def _finite_or_zero(m):
    # A row whose columns so far are all -inf (the first block at chunk_size 1,
    # say) has max -inf; shifting by it would give exp(-inf + inf) = NaN.
    return jnp.where(jnp.isfinite(m), m, 0)


def _forward_stats(spec: _Spec, h_s, chunks_s, h_t, chunks_t, temperature, dtype, seen):
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
        z = _block_logits(h_s, table_s, bias_s, index, spec, dtype, seen)
        new_m_z = jnp.maximum(m_z, jnp.max(z, axis=-1))
        shift_z = _finite_or_zero(new_m_z)
        zs = z - shift_z[:, None]
        s_z = s_z * jnp.exp(m_z - shift_z) + jnp.sum(jnp.exp(zs), axis=-1)
        if spec.use_kl:
            if not spec.unit_temperature:
                s_b = s_b * jnp.exp((m_z - shift_z) / temperature) + jnp.sum(
                    jnp.exp(zs / temperature), axis=-1
                )
            t = _block_logits(h_t, table_t, bias_t, index, spec, dtype, seen)
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


def _label_logits(h, table, bias, labels, dtype, num_rows):
    """``z[n, labels[n]]`` (labels ``[N]`` or ``[N, K]``) from row gathers: no block needed."""
    rows = jnp.take(table, labels, axis=0, mode="fill", fill_value=jnp.nan)
    z_y = jnp.einsum("nd,n...d->n...", h, rows, preferred_element_type=dtype)
    z_y = z_y + jnp.take(bias, labels, mode="fill", fill_value=jnp.nan).astype(dtype)
    # A label outside the catalogue at a valid position is NaN: loud. (The
    # gathers alone read -1 as the last row and a sharded table's padding
    # rows as items.)
    z_y = common.nan_outside(z_y, labels, num_rows)
    # The padding column is -inf: a valid label 0 costs +inf, as in the plain loss.
    return jnp.where(labels == 0, -jnp.inf, z_y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_total(
    spec, h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, seen, temp, alpha
):
    total, _ = _chunked_fwd(
        spec, h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, seen, temp, alpha
    )
    return total


def _chunked_fwd(
    spec, h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, seen, temp, alpha
):
    dtype = alpha.dtype
    chunks_s = (_to_chunks(table_s, spec.chunk_size), _to_chunks(bias_s, spec.chunk_size))
    chunks_t = (_to_chunks(table_t, spec.chunk_size), _to_chunks(bias_t, spec.chunk_size))
    m_z, s_z, s_b, m_t, s_a, cross = _forward_stats(
        spec, h_s, chunks_s, h_t, chunks_t, temp, dtype, seen
    )
    log_s_z, log_s_b, log_s_a = jnp.log(s_z), jnp.log(s_b), jnp.log(s_a)
    ce_total = kd_total = jnp.zeros((), dtype)
    if spec.use_ce:
        z_y = _label_logits(h_s, table_s, bias_s, labels, dtype, spec.num_rows)
        # K labels per row (a teacher's top-k) weigh 1/K each.
        z_y = z_y if labels.ndim == 1 else jnp.mean(z_y, axis=-1)
        # The two large terms first: m_z + log_s_z - z_y loses log_s_z when
        # the logits are large (1e7 + 1.79 is 1e7 in float32).
        ce = (m_z - z_y) + log_s_z
        ce_total = jnp.sum(jnp.where(valid, ce, 0))
    if spec.use_kl:
        # KL(p‖q) = Σ p·(t − z)/T + (m_z − m_t)/T − log s_a + log s_b, with
        # Σ p·(t − z) = cross / s_a (derivation in _forward_stats' docstring terms).
        kl = cross / (temp * s_a) + (m_z - m_t) / temp - log_s_a + log_s_b
        # T² keeps the gradient's scale roughly independent of T (Hinton et al. 2015).
        kd_total = jnp.square(temp) * jnp.sum(jnp.where(valid, kl, 0))
    if spec.weighted:
        total = common.weighted_total(ce_total, kd_total, alpha)
    else:
        total = ce_total + kd_total
    stats = (m_z + log_s_z, m_z, log_s_b, m_t, log_s_a)
    residuals = (h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, seen, temp, alpha)
    residuals = residuals + (stats,)
    return total, (residuals, ce_total - kd_total)


def _chunked_bwd(spec, res, g):
    residuals, dtotal_dalpha = res
    h_s, table_s, bias_s, h_t, table_t, bias_t, labels, valid, seen, temp, alpha, stats = residuals
    lse_z, m_z, log_s_b, m_t, log_s_a = (x[:, None] for x in stats)
    dtype = alpha.dtype
    w_ce = alpha if spec.weighted else 1
    w_kl = (1 - alpha) if spec.weighted else 1
    scale = jnp.where(valid, g, 0).astype(dtype)[:, None]  # masked rows get no gradient
    h_s32 = h_s.astype(dtype)

    def body(dh, xs):
        index, tab_s, b_s, tab_t, b_t = xs
        z = _block_logits(h_s, tab_s, b_s, index, spec, dtype, seen)
        grad = jnp.zeros_like(z)
        if spec.use_ce:
            column = index * spec.chunk_size + jnp.arange(spec.chunk_size)
            if labels.ndim == 1:
                onehot = labels[:, None] == column
            else:
                onehot = jnp.mean(labels[:, :, None] == column, axis=1, dtype=dtype)
            grad = w_ce * (jnp.exp(z - lse_z) - onehot)
        if spec.use_kl:
            q = jnp.exp(z - lse_z) if spec.unit_temperature else jnp.exp((z - m_z) / temp - log_s_b)
            t = _block_logits(h_t, tab_t, b_t, index, spec, dtype, seen)
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
    no_cotangent = (None,) * 7  # teacher (3), labels, valid, seen, temperature
    return (dh.astype(h_s.dtype), d_table, d_bias, *no_cotangent, d_alpha)


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
    seen=None,
    num_valid_rows=None,
) -> SumAndCount:
    """Checks and flattens the arguments, pads the tables, calls the fused core."""
    _check_chunk_size(chunk_size)
    h_s, tab_s = jnp.asarray(h_student), jnp.asarray(table_s)
    b_s = None if bias_s is None else jnp.asarray(bias_s)
    common.check_tower("student " if use_kl else "", h_s, tab_s, b_s)
    positions = h_s.shape[:-1]
    num_rows = tab_s.shape[0]
    valid = common.rows_where(where, positions).reshape(-1)
    dtype = functools.reduce(jnp.promote_types, [h_s.dtype, tab_s.dtype, jnp.float32])
    chunk_size = _balanced_chunk(num_rows, chunk_size)
    padded_rows = -(-num_rows // chunk_size) * chunk_size

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
        common.check_tower("teacher ", h_t, tab_t, b_t)
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
        k = () if labels.ndim == len(positions) else labels.shape[-1:]
        common.check_labels(labels, positions + k, "the hidden states' leading shape")
        # Masked labels may be out of range (e.g. -1 padding); point them at a real row.
        flat = labels.reshape((-1,) + k)
        flat_labels = jnp.where(valid.reshape((-1,) + (1,) * len(k)), flat, 1)
    flat_seen = None
    if seen is not None:
        seen = jnp.asarray(seen)
        if seen.ndim != len(positions) + 1 or seen.shape[:-1] != positions:
            raise ValueError(
                f"seen must have shape {positions} + (S,) (item ids to leave out per "
                f"position), got {seen.shape}."
            )
        flat_seen = seen.reshape(-1, seen.shape[-1]).astype(jnp.int32)
    if num_valid_rows is not None and not 2 <= num_valid_rows <= num_rows:
        raise ValueError(
            f"num_valid_rows={num_valid_rows} must be in [2, {num_rows}] (the table's rows)."
        )
    spec = _Spec(
        num_rows=num_rows if num_valid_rows is None else int(num_valid_rows),
        chunk_size=int(chunk_size),
        use_ce=use_ce,
        use_kl=use_kl,
        weighted=use_ce and use_kl,
        unit_temperature=isinstance(temperature, numbers.Real) and temperature == 1,
        exclude=flat_seen is not None,
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
        flat_seen,
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
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
) -> SumAndCount:
    """Softmax cross-entropy of ``h @ table.T + bias`` summed over valid positions.

    Equal in value and gradient to ``losses.cross_entropy_sum`` on the full
    logits (column 0 at -inf), with memory ``O(N·chunk_size)`` beyond the
    inputs and their gradients.

    Args:
      h: ``[..., D]`` hidden states.
      table: ``[R, D]`` item table, ``R >= V+1``; row 0 is padding and never scored.
      bias: optional ``[R]`` output bias (None means zero).
      labels: ``[...]`` integer target ids in ``[1, V]``, or ``[..., K]``: K
        targets per position, each weighing 1/K.
      where: optional ``[...]`` boolean mask of valid positions.
      seen: optional ``[..., S]`` item ids each position leaves out of every
        softmax (exclude_history; never its label; 0 is ignored).
      num_valid_rows: rows of the table that are the catalogue (V+1); rows at
        or beyond it (a sharded table's padding) score -inf. None: all rows.
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
        seen=seen,
        num_valid_rows=num_valid_rows,
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
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
) -> SumAndCount:
    """``alpha·CE + (1 − alpha)·T²·KL`` from hidden states, summed over valid positions.

    Equal in value and gradient to ``losses.distill_loss_sum`` on the full
    student and teacher logits (``h @ table.T + bias`` of each, column 0 at
    -inf, the ``seen`` columns of both at -inf), including the derivative
    with respect to ``alpha``.

    Args:
      h_student: ``[..., D_s]`` student hidden states.
      table_s: ``[R, D_s]`` student item table.
      bias_s: optional ``[R]`` student output bias (None means zero).
      h_teacher: ``[..., D_t]`` teacher hidden states; receive no gradient.
      table_t: ``[R, D_t]`` teacher item table; receives no gradient.
      bias_t: optional ``[R]`` teacher output bias; receives no gradient.
      labels: ``[...]`` integer target ids in ``[1, V]``.
      where: optional ``[...]`` boolean mask of valid positions.
      temperature: softening temperature ``T > 0``; receives no gradient.
      alpha: weight of the hard-label term, in ``[0, 1]``.
      seen: optional ``[..., S]`` item ids each position leaves out of every
        softmax (exclude_history; never its label; 0 is ignored).
      num_valid_rows: rows of the table that are the catalogue (V+1); rows at
        or beyond it (a sharded table's padding) score -inf. None: all rows.
      chunk_size: table rows per block of logits (a Python int >= 1).

    Returns:
      ``(sum, count)`` scalars.
    """
    common.check_temperature(temperature)
    common.check_alpha(alpha)
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
        seen=seen,
        num_valid_rows=num_valid_rows,
    )


def chunked_top_k(
    h: ArrayLike,
    table: ArrayLike,
    bias: ArrayLike | None,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
) -> jax.Array:
    """int32 ``[..., k]``: each position's k best items of ``h @ table.T + bias``.

    A running top-k merged block by block, so the logits are never whole; the
    ids are those `jax.lax.top_k` gives on the full logits (column 0, pad rows
    and ``seen`` columns at -inf; ties to the lower id). No gradient.
    """
    _check_chunk_size(chunk_size)
    h, table = jax.lax.stop_gradient(jnp.asarray(h)), jax.lax.stop_gradient(jnp.asarray(table))
    bias = jnp.zeros(table.shape[:1], table.dtype) if bias is None else jnp.asarray(bias)
    bias = jax.lax.stop_gradient(bias)
    common.check_tower("", h, table, bias)
    positions, rows = h.shape[:-1], table.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < rows:
        raise ValueError(f"k must be a Python int in [1, {rows - 1}], got {k!r}.")
    dtype = functools.reduce(jnp.promote_types, [h.dtype, table.dtype, jnp.float32])
    chunk = max(_balanced_chunk(rows, chunk_size), k)
    padded = -(-rows // chunk) * chunk
    spec = _Spec(
        num_rows=rows if num_valid_rows is None else int(num_valid_rows),
        chunk_size=chunk,
        use_ce=False,
        use_kl=False,
        weighted=False,
        unit_temperature=True,
        exclude=seen is not None,
    )
    flat_h = h.reshape(-1, h.shape[-1])
    flat_seen = None if seen is None else jnp.asarray(seen).reshape(flat_h.shape[0], -1)
    n = flat_h.shape[0]

    def body(carry, xs):
        best, ids = carry
        index, tab, b = xs
        z = _block_logits(flat_h, tab, b, index, spec, dtype, flat_seen)
        vals, local = jax.lax.top_k(z, k)
        # Earlier blocks first: among equal scores the lower id wins, as in top_k.
        both = jnp.concatenate([best, vals], axis=1)
        both_ids = jnp.concatenate([ids, local + index * chunk], axis=1)
        top, where = jax.lax.top_k(both, k)
        return (top, jnp.take_along_axis(both_ids, where, axis=1)), None

    init = (jnp.full((n, k), -jnp.inf, dtype), jnp.zeros((n, k), jnp.int32))
    xs = (
        jnp.arange(padded // chunk),
        _to_chunks(_pad_rows(table, padded), chunk),
        _to_chunks(_pad_rows(bias, padded), chunk),
    )
    (_, ids), _ = jax.lax.scan(body, init, xs)
    return ids.astype(jnp.int32).reshape(positions + (k,))


def chunked_hard_label_distill_sum(
    h_student: ArrayLike,
    table_s: ArrayLike,
    bias_s: ArrayLike | None,
    h_teacher: ArrayLike,
    table_t: ArrayLike,
    bias_t: ArrayLike | None,
    where: ArrayLike | None = None,
    *,
    k: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
) -> SumAndCount:
    """Cross-entropy against the teacher's top-k items (1/k each), from hidden states.

    Equal in value and gradient to ``losses.hard_label_distill_sum`` on the
    full logits: the teacher's top-k come from :func:`chunked_top_k`, the
    student's cross-entropy to them from the chunked scan.

    Args: as :func:`chunked_distill_loss_sum` without labels, temperature and
      alpha, and ``k``, the number of teacher items to imitate.

    Returns:
      ``(sum, count)`` scalars.
    """
    top = chunked_top_k(
        h_teacher,
        table_t,
        bias_t,
        k,
        chunk_size=chunk_size,
        seen=seen,
        num_valid_rows=num_valid_rows,
    )
    return chunked_cross_entropy_sum(
        h_student,
        table_s,
        bias_s,
        top,
        where,
        chunk_size=chunk_size,
        seen=seen,
        num_valid_rows=num_valid_rows,
    )


chunked_cross_entropy = common.mean_of(chunked_cross_entropy_sum)


chunked_distill_loss = common.mean_of(chunked_distill_loss_sum)


chunked_hard_label_distill = common.mean_of(chunked_hard_label_distill_sum)
