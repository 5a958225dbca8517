"""The pallas form: the fused catalogue loss as Pallas kernels (GPU via Triton, TPU via Mosaic).

The loss is the one every form computes from the hidden states: the student's
logits ``z = h_s @ E_s.T + b_s`` (and, for distillation, the teacher's
``t = h_t @ E_t.T + b_t``) over the catalogue, column 0, the rows past
``num_valid_rows`` and each slot's ``seen`` ids (exclude_history) at -inf, then

* cross-entropy ``lse(z) − mean_k z[y_k]`` (one label, or the 'hard' target's
  K labels of weight 1/K), or
* ``alpha·CE + (1 − alpha)·T²·KL(softmax(t/T) ‖ softmax(z/T))`` (the 'soft'
  target; teacher-only slots add their KL term alone),

summed over the valid slots. As in Cut Cross-Entropy (Wijmans et al. 2024)
and Liger's fused linear losses, no ``[N, V]`` array is ever written to memory
(the kernels: `pallas_lib.py`; here the checks, the padding, the custom_vjp):

* forward kernel, grid over blocks of `block_rows` slots: a loop over tiles
  of `block_items` items computes each tile's logits (student, and teacher)
  and keeps an online (running maximum) logsumexp per slot for the student at
  T=1, the student at T and the teacher at T, the KL's cross term
  ``Σ e^((t−m_t)/T)·(t − z)`` and the label logits; ``[N, 8]`` statistics out;
* backward, two kernels that recompute the tiles and form the logits'
  gradient ``G = w_ce·(softmax(z) − onehot) + w_kl·(softmax(z/T) − p_T)`` per
  tile (``w_ce = g·alpha``, ``w_kl = g·(1 − alpha)·T`` per slot, from the
  forward statistics): one over blocks of slots accumulating
  ``d_hidden = G @ E_s``, one over tiles of items accumulating
  ``d_table = G.T @ h_s`` and ``d_bias = Σ_rows G``. Each pass recomputes
  the teacher's tile too (its product is never stored either).

Everything runs in float32 (inputs are upcast; gradients come back in the
inputs' dtypes); the products use `precision` (default HIGHEST: IEEE float32
on Triton, not TF32). Values and gradients equal the dense form's
(tests/test_pallas_kernel.py, tests/test_loss_registry.py); speed has not
been measured here (no accelerator in the session that wrote it:
`benchmarks/distill_kernel.py --variants dense,pallas` times it).

Where it runs (`platform`): 'gpu' lowers through Triton, 'tpu' through
Mosaic, and on the CPU backend the same kernels run in Pallas interpret mode
(``interpret=True``; slow, for tests: the `cpu_kernel` form is the CPU's).
Tile sizes (`TILES`): GPU 32 slots × 128 items (powers of two, as Triton
needs), TPU 128 × 256; the rows, items and widths are padded up to them (the
padding is masked). Limits, by design or not yet done:

* the 'label', 'soft' and 'hard' targets only (the teacher's top-k of 'hard'
  come from `chunked.chunked_top_k`, an XLA scan); 'ranking', 'cached' and
  'ensemble' have no pallas form (`losses.PAIRS` refuses them, so 'auto'
  never picks it for them);
* meshes: on several devices the slots are split along 'data' (shard_map,
  `common.on_rows`; each device runs the kernels on its own slots, the item
  tables whole on each, d_table and d_bias summed across 'data'); there is
  no form for an item table split along 'model' (``Pair.meshes='data'``);
* per-slot masks (``where``), not fractional weights;
* `seen` ids and the K labels are compared unrolled, one column at a time:
  meant for windows of tens of ids, not thousands;
* on TPU each kernel holds the whole padded item tables (forward,
  ``d_hidden``) or the whole padded rows (``d_table``) in VMEM, so
  catalogues and batches of a few MB; on GPU they stay in HBM and are read
  tile by tile;
* the lowering for GPU and TPU is checked on the CPU (``jax.export``), but
  it has not been compiled or run on either here.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.typing import ArrayLike

from distill_jax.losses import chunked, common
from distill_jax.losses.common import SumAndCount
from distill_jax.losses.pallas_lib import INV_T, STATS, TILES, WIDTH, Spec, backward, forward

__all__ = [
    "TILES",
    "pallas_cross_entropy",
    "pallas_cross_entropy_sum",
    "pallas_distill_loss",
    "pallas_distill_loss_sum",
    "pallas_hard_label_distill",
    "pallas_hard_label_distill_sum",
]

# --------------------------------------------------------------------------
# The loss: a custom_vjp over padded float32 arrays.
# --------------------------------------------------------------------------


def _row_terms(spec: Spec, stats, temp):
    """Per-slot (ce, kl) and the backward pass's statistics from the kernel's."""
    m_z, s_z, s_b, z_y, m_t, s_a, cross = (stats[:, c] for c in range(len(STATS)))
    log_s_z = jnp.log(s_z)
    # The two large terms first: m_z + log_s_z − z_y would lose log_s_z when
    # the logits are large (1e7 + 1.79 is 1e7 in float32).
    ce = (m_z - z_y / spec.num_labels) + log_s_z
    if not spec.use_kl:
        zeros = jnp.zeros_like(m_z)
        return ce, zeros, (m_z + log_s_z, m_z, zeros, zeros, zeros)
    log_s_b = log_s_z if spec.unit_temperature else jnp.log(s_b)
    log_s_a = jnp.log(s_a)
    # KL(p‖q) = Σ p·(t − z)/T + (m_z − m_t)/T − log s_a + log s_b.
    kl = cross / (temp * s_a) + (m_z - m_t) / temp - log_s_a + log_s_b
    return ce, kl, (m_z + log_s_z, m_z, log_s_b, m_t, log_s_a)


def _totals(spec: Spec, ce, kl, valid, labelled, temp, alpha):
    """(the loss's sum, its derivative in alpha)."""
    ce_total = jnp.sum(jnp.where(labelled, ce, 0.0))
    if not spec.use_kl:
        return ce_total, jnp.zeros_like(ce_total)
    kd_total = jnp.square(temp) * jnp.sum(jnp.where(valid, kl, 0.0))
    return common.weighted_total(ce_total, kd_total, alpha), ce_total - kd_total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _total(spec, h_s, tab_s, b_s, h_t, tab_t, b_t, labels, seen, valid, labelled, temp, alpha):
    args = (h_s, tab_s, b_s, h_t, tab_t, b_t, labels, seen, valid, labelled, temp, alpha)
    return _total_fwd(spec, *args)[0]


def _on_rows(spec: Spec, kernels, info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t, summed):
    """`kernels` on each device's slots (split along 'data'), the tables whole on each."""

    def fn(rows, shared):
        info, h_s, labels, seen, h_t = rows
        tab_s, b_s, tab_t, b_t = shared
        out = kernels(spec, info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t)
        return out if isinstance(out, tuple) else (out,)

    rows, shared = (info, h_s, labels, seen, h_t), (tab_s, b_s, tab_t, b_t)
    outputs = 1 + summed
    return common.on_rows(spec.mesh, fn, rows, shared, outputs, summed)


def _total_fwd(spec, h_s, tab_s, b_s, h_t, tab_t, b_t, labels, seen, valid, labelled, temp, alpha):
    rows = h_s.shape[0]
    info = jnp.zeros((rows, WIDTH), jnp.float32).at[:, INV_T].set(1 / temp)
    arrays = (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t)
    (stats,) = _on_rows(spec, forward, *arrays, summed=0)
    ce, kl, row_stats = _row_terms(spec, stats, temp)
    total, dtotal_dalpha = _totals(spec, ce, kl, valid, labelled, temp, alpha)
    residuals = (h_s, tab_s, b_s, h_t, tab_t, b_t, labels, seen, valid, labelled, temp, alpha)
    return total, (residuals, row_stats, dtotal_dalpha)


def _total_bwd(spec, res, g):
    residuals, row_stats, dtotal_dalpha = res
    h_s, tab_s, b_s, h_t, tab_t, b_t, labels, seen, valid, labelled, temp, alpha = residuals
    rows = h_s.shape[0]
    w_ce = jnp.where(labelled, g * alpha if spec.use_kl else g, 0.0)
    w_kl = jnp.where(valid, g * (1 - alpha) * temp, 0.0) if spec.use_kl else jnp.zeros(rows)
    inv_t = jnp.broadcast_to(1 / temp, (rows,))
    # Columns in `pallas_lib.INFO` order.
    info = jnp.stack([inv_t, w_ce, w_kl, *row_stats], axis=1).astype(jnp.float32)
    arrays = (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t)
    # d_table and d_bias are sums over the slots: summed across 'data'.
    d_h, d_table, d_bias = _on_rows(spec, backward, *arrays, summed=2)
    # Teacher, labels, seen ids, masks and temperature get no cotangent;
    # alpha's exact derivative (CE − T²·KL) is free, so give it.
    d_alpha = g * dtotal_dalpha if spec.use_kl else jnp.zeros_like(alpha)
    return (d_h, d_table, d_bias, *(None,) * 8, d_alpha)


_total.defvjp(_total_fwd, _total_bwd)


# --------------------------------------------------------------------------
# Checks, padding, the public functions.
# --------------------------------------------------------------------------


def _platform(platform: str | None, interpret: bool | None) -> str:
    """'gpu', 'tpu' or 'interpret' from the arguments and jax's default backend."""
    if platform is None:
        backend = jax.default_backend()
        platform = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"the pallas form runs on 'gpu', 'tpu' or 'cpu', got {platform!r}.")
    if interpret is None:
        interpret = platform == "cpu"
    if platform == "cpu" and not interpret:
        raise ValueError(
            "the pallas form has no CPU lowering: on the CPU backend it runs in Pallas "
            "interpret mode (interpret=True or None); use the 'cpu_kernel' form for speed."
        )
    return "interpret" if interpret else platform


def _block(name: str, value, platform: str, multiple: int) -> int:
    """`value` checked: a power of two (Triton) / a multiple of `multiple` (TPU)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a Python int >= 1, got {value!r}.")
    if platform == "gpu" and (value < 16 or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= 16 on GPU (Triton), got {value}.")
    if platform == "tpu" and value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple} on TPU, got {value}.")
    return int(value)


def _pad(x: jax.Array, shape: tuple[int, ...], value=0) -> jax.Array:
    pads = [(0, s - d) for s, d in zip(shape, x.shape, strict=True)]
    return jnp.pad(x, pads, constant_values=value)


def _pad_rows(x: jax.Array, shards: int, rows: int, value=0) -> jax.Array:
    """``x [N, ...]`` with each of its `shards` blocks of slots padded to `rows`.

    Per block, so that each device's slots stay on it (split along 'data').
    """
    blocks = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
    blocks = _pad(blocks, (shards, rows) + x.shape[1:], value)
    return blocks.reshape((shards * rows,) + x.shape[1:])


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _width(d: int, multiple: int) -> int:
    """D padded: a power of two >= `multiple` (Triton), or a multiple of it (TPU: 128)."""
    if multiple == 128:
        return _up(d, multiple)
    return max(multiple, pl.next_power_of_2(d))


def _run(
    *,
    h_student,
    table_s,
    bias_s,
    teacher,
    labels,
    where,
    label_where,
    temperature,
    alpha,
    seen,
    num_valid_rows,
    platform,
    interpret,
    block_rows,
    block_items,
    precision,
) -> SumAndCount:
    """Checks, flattens and pads the arguments; calls the kernels."""
    where_run = _platform(platform, interpret)
    bn0, bv0, d_multiple = TILES[where_run]
    bn = _block("block_rows", bn0 if block_rows is None else block_rows, where_run, 8)
    bv = _block("block_items", bv0 if block_items is None else block_items, where_run, 128)
    use_kl = teacher is not None
    h_s, tab_s = jnp.asarray(h_student), jnp.asarray(table_s)
    b_s = None if bias_s is None else jnp.asarray(bias_s)
    common.check_tower("student " if use_kl else "", h_s, tab_s, b_s)
    positions, items = h_s.shape[:-1], tab_s.shape[0]
    labels = jnp.asarray(labels)
    if labels.shape[: len(positions)] != positions or labels.ndim > len(positions) + 1:
        raise ValueError(
            f"labels must have shape {positions} or {positions} + (K,) (the hidden "
            f"states' leading shape), got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer item ids, got dtype {labels.dtype}.")
    num_valid = items if num_valid_rows is None else int(num_valid_rows)
    if not 2 <= num_valid <= items:
        raise ValueError(f"num_valid_rows={num_valid} must be in [2, {items}] (the table's rows).")
    valid = common.rows_where(where, positions).reshape(-1)
    labelled = valid
    if label_where is not None:
        labelled = valid & common.rows_where(label_where, positions).reshape(-1)
    n = valid.shape[0]
    mesh = common.row_mesh(n, "pallas")
    shards = 1 if mesh is None else mesh.shape[common.DATA]
    # Each device's slots padded to whole blocks; the items to whole tiles.
    local, padded_items = _up(n // shards, bn), _up(items, bv)

    def pad_rows(x, value=0):
        return _pad_rows(x, shards, local, value)

    f32 = jnp.float32

    def tower(h, table, bias):
        # Masked slots' hidden states zeroed (O(N·D)): garbage there, even NaN,
        # cannot reach the statistics or the gradients.
        h = jnp.where(valid[:, None], h.reshape(n, -1).astype(f32), 0.0)
        width = _width(h.shape[1], d_multiple)
        bias = jnp.zeros((items,), f32) if bias is None else bias.astype(f32)
        return (
            pad_rows(_pad(h, (n, width))),
            _pad(table.astype(f32), (padded_items, width)),
            _pad(bias[None, :], (1, padded_items)),
        )

    h_t = tab_t = b_t = None
    if use_kl:
        h_t, tab_t, b_t = (None if x is None else jnp.asarray(x) for x in teacher)
        common.check_tower("teacher ", h_t, tab_t, b_t)
        if h_t.shape[:-1] != positions or tab_t.shape[0] != items:
            raise ValueError(
                f"teacher and student must share positions and catalogue: hidden states "
                f"{h_t.shape} and {h_s.shape}, tables {tab_t.shape} and {tab_s.shape}."
            )
        h_t, tab_t, b_t = jax.lax.stop_gradient(tower(h_t, tab_t, b_t))
    h_s, tab_s, b_s = tower(h_s, tab_s, b_s)
    flat = labels.reshape(n, -1).astype(jnp.int32)
    k = flat.shape[1]
    # A label outside the table at a counted slot makes the loss NaN: loud.
    # (In the kernel it would match no column: a finite, wrong loss.)
    bad = jnp.any(labelled[:, None] & ((flat < 0) | (flat >= items)))
    # Other slots' labels (masked, teacher-only: may be -1) point at item 1.
    flat = jnp.where(labelled[:, None], flat, 1)
    flat = pad_rows(_pad(flat, (n, pl.next_power_of_2(k)), -1), 1)
    num_seen, flat_seen = 0, None
    if seen is not None:
        seen = jnp.asarray(seen)
        if seen.shape[:-1] != positions or not jnp.issubdtype(seen.dtype, jnp.integer):
            raise ValueError(
                f"seen must be integer item ids of shape {positions} + (S,), got "
                f"{seen.shape} {seen.dtype}."
            )
        num_seen = seen.shape[-1]
        flat_seen = seen.reshape(n, num_seen).astype(jnp.int32)
        flat_seen = pad_rows(_pad(flat_seen, (n, pl.next_power_of_2(num_seen))))  # 0: no id
    spec = Spec(
        platform=where_run,
        block_rows=bn,
        block_items=bv,
        num_valid=num_valid,
        num_labels=k,
        num_seen=num_seen,
        use_kl=use_kl,
        unit_temperature=isinstance(temperature, numbers.Real) and temperature == 1,
        precision=precision,
        mesh=mesh,
    )
    total = _total(
        spec,
        h_s,
        tab_s,
        b_s,
        h_t,
        tab_t,
        b_t,
        flat,
        flat_seen,
        pad_rows(valid),
        pad_rows(labelled),
        jax.lax.stop_gradient(jnp.asarray(temperature, f32)),
        jnp.asarray(alpha, f32),
    )
    total = total + jnp.where(bad, jnp.nan, 0.0)
    dtype = common.compute_dtype(jnp.asarray(h_student))
    return total.astype(dtype), jnp.sum(valid, dtype=dtype)


_DEFAULTS = dict(
    platform=None,
    interpret=None,
    block_rows=None,
    block_items=None,
    precision=jax.lax.Precision.HIGHEST,
)


def pallas_cross_entropy_sum(
    hidden: ArrayLike,
    table: ArrayLike,
    bias: ArrayLike | None,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    *,
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
    **kernel,
) -> SumAndCount:
    """Softmax cross-entropy of ``hidden @ table.T + bias`` through the Pallas kernels, summed.

    Equal in value and gradient (``hidden``, ``table``, ``bias``) to
    ``losses.cross_entropy_sum`` on the full logits with column 0, the rows
    past `num_valid_rows` and each slot's `seen` ids at -inf; the ``[N, V]``
    logits and their gradient are never stored.

    Args:
      hidden: ``[..., D]`` hidden states.
      table: ``[R, D]`` item table (row 0: padding).
      bias: optional ``[R]`` output bias.
      labels: ``[...]`` target ids, or ``[..., K]``: K targets per slot,
        weight 1/K each (the 'hard' target's top-k).
      where: optional ``[...]`` mask of the valid slots.
      seen: optional ``[..., S]`` ids each slot leaves out (exclude_history;
        0 = none; never its label).
      num_valid_rows: the table rows that are items (V+1; None: all).
      **kernel: `platform` ('gpu', 'tpu', 'cpu'; None: jax's default
        backend), `interpret` (None: on the CPU only), `block_rows`,
        `block_items` (None: `TILES`), `precision` of the products.

    Returns:
      ``(sum, count)`` scalars.
    """
    return _run(
        h_student=hidden,
        table_s=table,
        bias_s=bias,
        teacher=None,
        labels=labels,
        where=where,
        label_where=None,
        temperature=1.0,
        alpha=1.0,
        seen=seen,
        num_valid_rows=num_valid_rows,
        **{**_DEFAULTS, **kernel},
    )


def pallas_distill_loss_sum(
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
    **kernel,
) -> SumAndCount:
    """``alpha·CE + (1 − alpha)·T²·KL`` from hidden states through the Pallas kernels, summed.

    Equal in value and gradient (``h_student``, ``table_s``, ``bias_s``,
    ``alpha``) to ``losses.distill_loss_sum`` on the full logits of both (column
    0, rows past `num_valid_rows` and the `seen` columns at -inf). The teacher
    gets no gradient; its logits are recomputed tile by tile like the student's.

    Args: as :func:`pallas_cross_entropy_sum` (one label per slot), and the
      teacher's ``h_teacher [..., D_t]``, ``table_t [R, D_t]``, ``bias_t``;
      ``label_where``, the valid slots that carry a label (the others,
      teacher-only, add their KL term alone); ``temperature`` T > 0 (no
      gradient) and ``alpha`` in [0, 1].

    Returns:
      ``(sum, count)`` scalars; the count is that of `where`.
    """
    common.check_temperature(temperature)
    common.check_alpha(alpha)
    labels = jnp.asarray(labels)
    h_s = jnp.asarray(h_student)
    common.check_labels(labels, h_s.shape[:-1], "the hidden states' leading shape")
    return _run(
        h_student=h_s,
        table_s=table_s,
        bias_s=bias_s,
        teacher=(h_teacher, table_t, bias_t),
        labels=labels,
        where=where,
        label_where=label_where,
        temperature=temperature,
        alpha=alpha,
        seen=seen,
        num_valid_rows=num_valid_rows,
        **{**_DEFAULTS, **kernel},
    )


def pallas_hard_label_distill_sum(
    h_student: ArrayLike,
    table_s: ArrayLike,
    bias_s: ArrayLike | None,
    h_teacher: ArrayLike,
    table_t: ArrayLike,
    bias_t: ArrayLike | None,
    where: ArrayLike | None = None,
    *,
    k: int = 1,
    chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
    seen: ArrayLike | None = None,
    num_valid_rows: int | None = None,
    **kernel,
) -> SumAndCount:
    """Cross-entropy against the teacher's top-k items (1/k each), summed.

    The teacher's top-k come from `chunked.chunked_top_k` (an XLA scan over
    item chunks of `chunk_size`), the student's cross-entropy to them from
    the Pallas kernels. Equal to ``losses.hard_label_distill_sum``.
    """
    top = chunked.chunked_top_k(
        h_teacher,
        table_t,
        bias_t,
        k,
        chunk_size=chunk_size,
        seen=seen,
        num_valid_rows=num_valid_rows,
    )
    return pallas_cross_entropy_sum(
        h_student,
        table_s,
        bias_s,
        top,
        where,
        seen=seen,
        num_valid_rows=num_valid_rows,
        **kernel,
    )


pallas_cross_entropy = common.mean_of(pallas_cross_entropy_sum)
pallas_distill_loss = common.mean_of(pallas_distill_loss_sum)
pallas_hard_label_distill = common.mean_of(pallas_hard_label_distill_sum)
