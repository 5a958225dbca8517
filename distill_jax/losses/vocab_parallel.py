"""Vocabulary-parallel catalogue losses: logits sharded along the item axis.

With the item table row-sharded along the mesh axis ``'model'`` (DESIGN.md:
large item tables are), the logits ``h @ E.T`` come out sharded along their
last (vocab) axis for free: each device scores its own block of items. The
plain losses would then need the whole row on one device; XLA either gathers
the catalogue or, at best, leaves the choice to its partitioner. Here the
reductions are written out with ``jax.shard_map``: each device reduces its
block, and only per-position statistics cross devices (a ``pmax`` for the row
maxima, one ``psum`` of a few ``[n]`` rows for the exponential sums, the KL
cross term and the label's logit). Positions are split along ``'data'``.

The backward pass is a ``jax.custom_vjp`` with the closed form of
:mod:`distill_jax.losses`' fused loss,
``alpha·(softmax(z) − onehot(y)) + (1 − alpha)·T·(softmax(z/T) − p_teacher)``,
evaluated block by block from the saved row statistics: purely local, no
collective at all.

Layout contract (checked, errors name the argument):

* logits ``[N, V']`` with ``N`` divisible by the ``'data'`` axis size and
  ``V'`` by the ``'model'`` axis size; ``V'`` may exceed ``V+1`` by extra
  ``-inf`` columns (:func:`vocab_parallel_logits` pads the table that way).
* ``labels``/``where`` ``[N]``.

Values, ``where`` semantics and dtype rules follow :mod:`distill_jax.losses`.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from distill_jax.losses import common
from distill_jax.losses.common import SumAndCount

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_cross_entropy_sum",
    "vocab_parallel_distill_loss",
    "vocab_parallel_distill_loss_sum",
    "vocab_parallel_logits",
]

Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh

DATA, MODEL = "data", "model"
ROWS = P(DATA)  # per-position arrays
BLOCKS = P(DATA, MODEL)  # [N, V'] logits


def _resolve_mesh(mesh: Mesh | None) -> Mesh:
    """The given mesh, else the one set by ``jax.set_mesh``; checks its axes."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                "mesh is None and no mesh is set: pass mesh= or call under "
                "jax.set_mesh(mesh) with a ('data', 'model') mesh."
            )
    if DATA not in mesh.axis_names or MODEL not in mesh.axis_names:
        raise ValueError(
            f"mesh must have axes 'data' and 'model', got axis names {mesh.axis_names}."
        )
    return mesh


def _place(x: jax.Array | None, spec: P, mesh: Mesh) -> jax.Array | None:
    """Reshards ``x`` to ``spec`` where the mesh's axes are Explicit.

    Under Explicit axes (``jax.make_mesh``'s default) shard_map refuses inputs
    whose sharding type differs from its in_specs; under Auto axes it reshards
    them itself. Doing it here, outside the custom_vjp, lets autodiff route the
    cotangent back to the caller's layout.
    """
    if x is None or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return x
    target = NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
    return jax.reshard(x, target)


def _check_divisible(name: str, size: int, axis: str, mesh: Mesh, what: str) -> None:
    count = mesh.shape[axis]
    if size % count:
        raise ValueError(
            f"{name} has {size} {what}, which must be divisible by the mesh's "
            f"'{axis}' axis size {count}."
        )


# --------------------------------------------------------------------------
# Logits from hidden states and a row-sharded table.
# --------------------------------------------------------------------------


def vocab_parallel_logits(
    hidden: ArrayLike,
    table: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    mesh: Mesh | None = None,
    num_valid_rows: int | None = None,
) -> jax.Array:
    """Catalogue logits ``hidden @ table.T + bias``, sharded ``P('data', 'model')``.

    Each device multiplies its rows of ``hidden`` by its block of table rows,
    so neither the table nor the logits are ever gathered. In the backward
    pass the hidden-state gradient is summed over ``'model'`` (``[N/data, D]``
    per device) and the table gradient over ``'data'`` (``[V'/model, D]``).

    Args:
      hidden: ``[N, D]`` hidden states; ``N`` divisible by the 'data' axis size.
      table: ``[V+1, D]`` item table; row 0 is padding. If ``V+1`` is not a
        multiple of the 'model' axis size, the table is padded with zero rows
        (whose columns are masked to -inf), which may move table rows between
        devices; give the table a multiple of that size to avoid it.
      bias: optional ``[V+1]`` output bias.
      mesh: a mesh with axes ``('data', 'model')``; None means the mesh set
        by ``jax.set_mesh``.
      num_valid_rows: table rows that are the catalogue (V+1) when the table
        already carries padding rows (a model built for a sharded mesh);
        their columns are -inf too. None: every row.

    Returns:
      ``[N, V']`` float32 (at least) logits, ``V'`` = ``V+1`` rounded up to a
      multiple of the 'model' axis size; column 0 and the pad columns are -inf.
    """
    mesh = _resolve_mesh(mesh)
    hidden, table = jnp.asarray(hidden), jnp.asarray(table)
    if hidden.ndim != 2 or table.ndim != 2 or hidden.shape[1] != table.shape[1]:
        raise ValueError(
            f"hidden must be [N, D] and table [V+1, D] with the same D, got "
            f"{hidden.shape} and {table.shape}."
        )
    num_rows = table.shape[0]
    valid_rows = num_rows if num_valid_rows is None else int(num_valid_rows)
    bias = jnp.zeros((num_rows,), table.dtype) if bias is None else jnp.asarray(bias)
    if bias.shape != (num_rows,):
        raise ValueError(
            f"bias must have shape ({num_rows},) to match the table, got {bias.shape}."
        )
    _check_divisible("hidden", hidden.shape[0], DATA, mesh, "rows (positions)")
    model = mesh.shape[MODEL]
    padded = -(-num_rows // model) * model
    if padded != num_rows:
        table = jnp.pad(table, ((0, padded - num_rows), (0, 0)))
        bias = jnp.pad(bias, (0, padded - num_rows))
    dtype = functools.reduce(jnp.promote_types, [hidden.dtype, table.dtype, jnp.float32])
    block = padded // model
    hidden = _place(hidden, P(DATA, None), mesh)
    table, bias = _place(table, P(MODEL, None), mesh), _place(bias, P(MODEL), mesh)

    def body(h, tab, b):
        z = jnp.einsum("nd,vd->nv", h, tab, preferred_element_type=dtype) + b.astype(dtype)
        column = jax.lax.axis_index(MODEL) * block + jnp.arange(block)
        # Padding column 0 and the pad rows can never be predicted.
        return jnp.where((column >= 1) & (column < valid_rows), z, -jnp.inf)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(DATA, None), P(MODEL, None), P(MODEL)), out_specs=BLOCKS
    )(hidden, table, bias)


# --------------------------------------------------------------------------
# The fused vocab-parallel loss.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static configuration of one fused loss (hashable for custom_vjp)."""

    mesh: Mesh
    use_ce: bool
    use_kl: bool
    weighted: bool  # both terms: weights alpha and 1 − alpha; else weight 1
    unit_temperature: bool  # T == 1 as a Python number


def _local_forward(spec: _Spec, s, t, labels, valid, temp):
    """Per-device body: row statistics reduced over 'model', totals over 'data'."""
    dtype = temp.dtype
    z = s.astype(dtype)
    block = z.shape[-1]
    # Only the [n] row maxima cross devices; they are a shift for stability
    # (the values do not depend on them), so there is nothing to differentiate.
    maxes = [jnp.max(z, axis=-1)]
    if spec.use_kl:
        tt = t.astype(dtype)
        maxes.append(jnp.max(tt, axis=-1))
    maxes = jax.lax.pmax(jnp.stack(maxes), MODEL)
    m_z = maxes[0]
    zs = z - m_z[:, None]
    sums = [jnp.sum(jnp.exp(zs), axis=-1)]
    if spec.use_ce:
        # The label's logit lives on one device; the others contribute 0.
        local = labels - jax.lax.axis_index(MODEL) * block
        here = (local >= 0) & (local < block)
        z_y = jnp.take_along_axis(z, jnp.clip(local, 0, block - 1)[:, None], axis=-1)[:, 0]
        sums.append(jnp.where(here, z_y, 0))
        sums.append(here.astype(dtype))  # 0 on every device: a label outside the catalogue
    if spec.use_kl:
        m_t = maxes[1]
        a = (tt - m_t[:, None]) / temp  # teacher: log of the unnormalised p
        b = zs if spec.unit_temperature else zs / temp
        exp_a = jnp.exp(a)
        sums.append(jnp.sum(exp_a, axis=-1))
        # Σ p (a − b) unnormalised; 0·(−inf + inf) = 0 on columns -inf for both.
        sums.append(jnp.sum(jnp.where(exp_a > 0, exp_a * (a - b), 0), axis=-1))
        if not spec.unit_temperature:
            sums.append(jnp.sum(jnp.exp(b), axis=-1))
    # One all-reduce of a few [n] rows instead of one per statistic.
    sums = list(jax.lax.psum(jnp.stack(sums), MODEL))
    log_s_z = jnp.log(sums.pop(0))
    ce_total = kd_total = jnp.zeros((), dtype)
    stats = {"lse_z": m_z + log_s_z}
    if spec.use_ce:
        z_y, held = sums.pop(0), sums.pop(0)
        # The large terms first (see dense._distill_row_stats); NaN for a
        # label no device holds, rather than a CE against logit 0.
        ce = jnp.where(held > 0, (m_z - z_y) + log_s_z, jnp.nan)
        ce_total = jnp.sum(jnp.where(valid, ce, 0))
    if spec.use_kl:
        s_a, cross = sums.pop(0), sums.pop(0)
        log_s_a = jnp.log(s_a)
        log_s_b = log_s_z if spec.unit_temperature else jnp.log(sums.pop(0))
        kl = cross / s_a - log_s_a + log_s_b
        kd_total = jnp.square(temp) * jnp.sum(jnp.where(valid, kl, 0))
        stats.update(m_z=m_z, log_s_b=log_s_b, m_t=m_t, log_s_a=log_s_a)
    totals = jax.lax.psum(jnp.stack([ce_total, kd_total]), DATA)
    return totals, stats


def _local_backward(spec: _Spec, s, t, labels, valid, stats, temp, alpha, g):
    """Per-device closed-form gradient wrt the local logits block: no collectives."""
    dtype = temp.dtype
    z = s.astype(dtype)
    block = z.shape[-1]
    w_ce = alpha if spec.weighted else 1
    w_kl = (1 - alpha) if spec.weighted else 1
    softmax_z = jnp.exp(z - stats["lse_z"][:, None])
    grad = jnp.zeros_like(z)
    if spec.use_ce:
        column = jax.lax.axis_index(MODEL) * block + jnp.arange(block)
        grad = w_ce * (softmax_z - (labels[:, None] == column))
    if spec.use_kl:
        if spec.unit_temperature:
            q = softmax_z
        else:
            q = jnp.exp((z - stats["m_z"][:, None]) / temp - stats["log_s_b"][:, None])
        p = jnp.exp((t.astype(dtype) - stats["m_t"][:, None]) / temp - stats["log_s_a"][:, None])
        grad = grad + (w_kl * temp) * (q - p)
    # Masked rows may hold NaN statistics: a select, not a product, drops them.
    grad = jnp.where(valid[:, None], g * grad, 0)
    return grad.astype(s.dtype)


def _stat_specs(spec: _Spec):
    names = ["lse_z"] + (["m_z", "log_s_b", "m_t", "log_s_a"] if spec.use_kl else [])
    return {name: ROWS for name in names}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vp_total(spec, s, t, labels, valid, temp, alpha):
    total, _ = _vp_fwd(spec, s, t, labels, valid, temp, alpha)
    return total


def _vp_fwd(spec, s, t, labels, valid, temp, alpha):
    fwd = jax.shard_map(
        functools.partial(_local_forward, spec),
        mesh=spec.mesh,
        in_specs=(
            BLOCKS,
            BLOCKS if spec.use_kl else None,
            ROWS if spec.use_ce else None,
            ROWS,
            P(),
        ),
        out_specs=(P(), _stat_specs(spec)),
    )
    totals, stats = fwd(s, t, labels, valid, temp)
    ce_total, kd_total = totals[0], totals[1]
    if spec.weighted:
        # A term with weight 0 is dropped outright, so that e.g. pure KD (alpha=0)
        # is not turned into NaN by 0·inf from a label on a -inf column.
        total = jnp.where(alpha == 0, 0, alpha * ce_total) + jnp.where(
            alpha == 1, 0, (1 - alpha) * kd_total
        )
    else:
        total = ce_total + kd_total
    return total, (s, t, labels, valid, stats, temp, alpha, ce_total - kd_total)


def _vp_bwd(spec, residuals, g):
    s, t, labels, valid, stats, temp, alpha, dtotal_dalpha = residuals
    bwd = jax.shard_map(
        functools.partial(_local_backward, spec),
        mesh=spec.mesh,
        in_specs=(
            BLOCKS,
            BLOCKS if spec.use_kl else None,
            ROWS if spec.use_ce else None,
            ROWS,
            _stat_specs(spec),
            P(),
            P(),
            P(),
        ),
        out_specs=BLOCKS,
    )
    grad = bwd(s, t, labels, valid, stats, temp, alpha, g.astype(temp.dtype))
    # Teacher, labels, mask and temperature get no cotangent (None = zero);
    # alpha's exact derivative (CE − T²·KL) is free, so give it.
    return grad, None, None, None, None, (g * dtotal_dalpha).astype(alpha.dtype)


_vp_total.defvjp(_vp_fwd, _vp_bwd)


def _run(
    *, student, teacher=None, labels=None, where, temperature, alpha, mesh, use_ce, use_kl
) -> SumAndCount:
    mesh = _resolve_mesh(mesh)
    s = jnp.asarray(student)
    if s.ndim != 2:
        raise ValueError(f"student_logits must have shape [N, V'], got {s.shape}.")
    name = "student_logits" if use_kl else "logits"
    _check_divisible(name, s.shape[0], DATA, mesh, "rows (positions)")
    _check_divisible(name, s.shape[1], MODEL, mesh, "vocab columns")
    t = None
    if use_kl:
        t = jax.lax.stop_gradient(jnp.asarray(teacher))
        if t.shape != s.shape:
            raise ValueError(
                f"student_logits and teacher_logits must have the same shape, got "
                f"{s.shape} and {t.shape}."
            )
    valid = jnp.ones(s.shape[:1], jnp.bool_) if where is None else jnp.asarray(where)
    if valid.shape != s.shape[:1]:
        raise ValueError(
            f"where must have shape {s.shape[:1]} (one flag per position), got {valid.shape}."
        )
    if valid.dtype != jnp.bool_ and not jnp.issubdtype(valid.dtype, jnp.integer):
        raise TypeError(f"where must be a boolean (or 0/1 integer) mask, got {valid.dtype}.")
    valid = valid.astype(jnp.bool_)
    if use_ce:
        labels = jnp.asarray(labels)
        if labels.shape != s.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"labels must be integer item ids of shape {s.shape[:1]}, got "
                f"{labels.shape} {labels.dtype}."
            )
    dtype = jnp.promote_types(s.dtype, jnp.float32)
    spec = _Spec(
        mesh=mesh,
        use_ce=use_ce,
        use_kl=use_kl,
        weighted=use_ce and use_kl,
        unit_temperature=isinstance(temperature, numbers.Real) and temperature == 1,
    )
    total = _vp_total(
        spec,
        _place(s, BLOCKS, mesh),
        _place(t, BLOCKS, mesh),
        _place(labels, ROWS, mesh) if use_ce else None,
        _place(valid, ROWS, mesh),
        jax.lax.stop_gradient(jnp.asarray(temperature, dtype)),
        jnp.asarray(alpha, dtype),
    )
    return total, jnp.sum(valid, dtype=dtype)


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def vocab_parallel_cross_entropy_sum(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    mesh: Mesh | None = None,
) -> SumAndCount:
    """Softmax cross-entropy over vocab-sharded logits, summed over valid positions.

    Equal in value and gradient to ``losses.cross_entropy_sum``.

    Args:
      logits: ``[N, V']`` logits, ideally already sharded ``P('data', 'model')``
        (e.g. from :func:`vocab_parallel_logits`); ``-inf`` columns allowed.
      labels: ``[N]`` integer target ids in ``[0, V')``.
      where: optional ``[N]`` boolean mask of valid positions.
      mesh: a ``('data', 'model')`` mesh; None means the one set by
        ``jax.set_mesh``.

    Returns:
      ``(sum, count)`` scalars, replicated.
    """
    return _run(
        student=logits,
        labels=labels,
        where=where,
        temperature=1.0,
        alpha=1.0,
        mesh=mesh,
        use_ce=True,
        use_kl=False,
    )


def vocab_parallel_distill_loss_sum(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    alpha: float | ArrayLike,
    where: ArrayLike | None = None,
    mesh: Mesh | None = None,
) -> SumAndCount:
    """Fused ``alpha·CE + (1 − alpha)·T²·KL`` over vocab-sharded logits, summed.

    Equal in value and gradient (including the derivative wrt ``alpha``) to
    ``losses.distill_loss_sum``.

    Args:
      student_logits: ``[N, V']`` student logits, sharded ``P('data', 'model')``.
      teacher_logits: ``[N, V']`` teacher logits, same layout; no gradient.
      labels: ``[N]`` integer target ids in ``[0, V')``.
      temperature: softening temperature ``T > 0``; receives no gradient.
      alpha: weight of the hard-label term, in ``[0, 1]``.
      where: optional ``[N]`` boolean mask of valid positions.
      mesh: a ``('data', 'model')`` mesh; None means the one set by
        ``jax.set_mesh``.

    Returns:
      ``(sum, count)`` scalars, replicated.
    """
    common.check_temperature(temperature)
    common.check_alpha(alpha)
    return _run(
        student=student_logits,
        teacher=teacher_logits,
        labels=labels,
        where=where,
        temperature=temperature,
        alpha=alpha,
        mesh=mesh,
        use_ce=True,
        use_kl=True,
    )


vocab_parallel_cross_entropy = common.mean_of(vocab_parallel_cross_entropy_sum)


vocab_parallel_distill_loss = common.mean_of(vocab_parallel_distill_loss_sum)
