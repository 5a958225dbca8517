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
and Liger's fused linear losses, no ``[N, V]`` array is ever written to memory:

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

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.typing import ArrayLike

from distill_jax.losses import chunked, common
from distill_jax.losses.common import SumAndCount

__all__ = [
    "PLATFORMS",
    "TILES",
    "pallas_cross_entropy",
    "pallas_cross_entropy_sum",
    "pallas_distill_loss",
    "pallas_distill_loss_sum",
    "pallas_hard_label_distill",
    "pallas_hard_label_distill_sum",
]

# Where the kernels run: compiled by Triton, by Mosaic, or interpreted (CPU).
PLATFORMS = ("gpu", "tpu", "interpret")
# (slots per block, items per tile, the width D is padded to a multiple of).
# Interpret mode takes the GPU's layout, so the CPU tests run its padding.
TILES = {"gpu": (32, 128, 16), "tpu": (128, 256, 128), "interpret": (32, 128, 16)}
# Columns of the per-slot float array each kernel reads (`info`): the forward
# kernel reads 1/T only; the backward kernels the weights and the statistics.
_INV_T, _W_CE, _W_KL, _LSE_Z, _M_Z, _LOG_S_B, _M_T, _LOG_S_A = range(8)
# Columns of the forward kernel's statistics (`_forward`'s docstring).
STATS = ("m_z", "s_z", "s_b", "z_y", "m_t", "s_a", "cross")
_WIDTH = 8  # both arrays have 8 columns


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static settings of one loss (hashable: custom_vjp's nondiff argument)."""

    platform: str
    block_rows: int
    block_items: int
    num_valid: int  # columns from here on (a padded table's rows) are -inf
    num_labels: int  # K labels per slot (weight 1/K each)
    num_seen: int  # ids per slot left out (exclude_history); 0: none
    use_kl: bool  # distillation (a teacher); else cross-entropy
    unit_temperature: bool  # T == 1 as a Python number: softmax(z/T) is softmax(z)
    precision: jax.lax.Precision | None
    # The mesh whose 'data' axis splits the slots (`common.row_mesh`); None: one device.
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None


# --------------------------------------------------------------------------
# The kernels. Refs come in `_refs` order; per-slot scalars are [rows, 1]
# columns (2-D, as TPU wants; loaded through ref slices, as Triton wants).
# --------------------------------------------------------------------------


def _refs(spec: _Spec, refs):
    """(info, h_s, table_s, bias_s, labels, seen, h_t, table_t, bias_t), outputs."""
    refs = list(refs)
    head = refs[:5]
    del refs[:5]
    seen = refs.pop(0) if spec.num_seen else None
    teacher = (refs.pop(0), refs.pop(0), refs.pop(0)) if spec.use_kl else (None, None, None)
    return (*head, seen, *teacher), refs


def _dot(a, b, spec: _Spec, contract=(1, 1)):
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(
        a, b, dims, precision=spec.precision, preferred_element_type=jnp.float32
    )


def _keep(spec: _Spec, start, seen_cols):
    """Which columns of the tile at `start` count: [1, bv], or [bn, bv] with `seen`."""
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, spec.block_items), 1)
    keep = (cols >= 1) & (cols < spec.num_valid)
    for s in seen_cols:  # [bn, 1] each: the slot's s-th seen id
        keep = keep & (s != cols)
    return cols, keep


def _tile_logits(h, table_ref, bias_ref, start, keep, spec: _Spec, whole: bool):
    """``h @ E[tile].T + b[tile]``, uncounted columns at -inf.

    `whole`: the refs hold every item (the tile is sliced out), else the tile.
    """
    if whole:
        tile = pl.ds(start, spec.block_items)
        table, bias = table_ref[tile, :], bias_ref[:, tile]
    else:
        table, bias = table_ref[...], bias_ref[...]
    return jnp.where(keep, _dot(h, table, spec) + bias, -jnp.inf)


def _onehot(spec: _Spec, cols, ys):
    """Σ_k [y_k == col] / K: [bn, bv]."""
    hits = sum(jnp.where(cols == y, 1.0, 0.0) for y in ys)
    return hits if spec.num_labels == 1 else hits * (1.0 / spec.num_labels)


def _grad_tile(spec: _Spec, z, t, cols, keep, ys, info):
    """The logits' gradient on one tile from the forward statistics (`info` columns)."""
    inv_t, w_ce, w_kl, lse_z, m_z, log_s_b, m_t, log_s_a = info
    q = jnp.exp(z - lse_z)  # 0 on -inf columns
    grad = w_ce * (q - _onehot(spec, cols, ys))
    if spec.use_kl:
        q_t = q if spec.unit_temperature else jnp.exp((z - m_z) * inv_t - log_s_b)
        p = jnp.exp((t - m_t) * inv_t - log_s_a)
        grad = grad + w_kl * (q_t - p)
    # A select, not a product: slots without weight (masked, padding) may hold
    # non-finite statistics, and uncounted columns give nothing.
    active = (w_ce != 0) | (w_kl != 0)
    return jnp.where(keep & active, grad, 0.0)


def _row_columns(ref, rows, count):
    """The first `count` columns of `ref[rows]`, each [bn, 1]."""
    return [ref[rows, pl.ds(k, 1)] for k in range(count)]


def _forward_kernel(spec: _Spec, *refs):
    (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t), (out,) = _refs(spec, refs)
    bn, bv = spec.block_rows, spec.block_items
    every = slice(None)
    inv_t = info[every, pl.ds(_INV_T, 1)]
    ys = _row_columns(labels, every, spec.num_labels)
    seen_cols = _row_columns(seen, every, spec.num_seen) if seen is not None else []
    hs = h_s[...]
    ht = h_t[...] if spec.use_kl else None

    def body(j, carry):
        m_z, s_z, s_b, z_y, m_t, s_a, cross = carry
        start = pl.multiple_of(j * bv, bv)
        cols, keep = _keep(spec, start, seen_cols)
        z = _tile_logits(hs, tab_s, b_s, start, keep, spec, whole=True)
        new_m_z = jnp.maximum(m_z, jnp.max(z, axis=1, keepdims=True))
        # A slot whose columns so far are all -inf: shift by 0, not by -inf (NaN).
        shift = jnp.where(new_m_z == -jnp.inf, 0.0, new_m_z)
        s_z = s_z * jnp.exp(m_z - shift) + jnp.sum(jnp.exp(z - shift), axis=1, keepdims=True)
        if spec.use_kl and not spec.unit_temperature:
            s_b = s_b * jnp.exp((m_z - shift) * inv_t) + jnp.sum(
                jnp.exp((z - shift) * inv_t), axis=1, keepdims=True
            )
        # The label logits (-inf for a label on an uncounted column: CE = +inf).
        for y in ys:
            z_y = z_y + jnp.sum(jnp.where(cols == y, z, 0.0), axis=1, keepdims=True)
        if spec.use_kl:
            t = _tile_logits(ht, tab_t, b_t, start, keep, spec, whole=True)
            new_m_t = jnp.maximum(m_t, jnp.max(t, axis=1, keepdims=True))
            shift_t = jnp.where(new_m_t == -jnp.inf, 0.0, new_m_t)
            rescale = jnp.exp((m_t - shift_t) * inv_t)
            p = jnp.exp((t - shift_t) * inv_t)  # the teacher's unnormalised softmax
            s_a = s_a * rescale + jnp.sum(p, axis=1, keepdims=True)
            # Columns -inf for both: 0·(−inf + inf) is 0 by 0·log 0 = 0.
            term = jnp.where(p > 0, p * (t - z), 0.0)
            cross = cross * rescale + jnp.sum(term, axis=1, keepdims=True)
            m_t = new_m_t
        return new_m_z, s_z, s_b, z_y, m_t, s_a, cross

    neg_inf, zero = jnp.full((bn, 1), -jnp.inf), jnp.zeros((bn, 1))
    init = (neg_inf, zero, zero, zero, neg_inf, zero, zero)
    tiles = tab_s.shape[0] // bv
    stats = jax.lax.fori_loop(0, tiles, body, init)
    for c, x in enumerate(stats):
        out[every, pl.ds(c, 1)] = x
    out[every, pl.ds(len(stats), 1)] = zero


def _d_hidden_kernel(spec: _Spec, *refs):
    (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t), (d_h,) = _refs(spec, refs)
    bv = spec.block_items
    every = slice(None)
    columns = _row_columns(info, every, _WIDTH)
    ys = _row_columns(labels, every, spec.num_labels)
    seen_cols = _row_columns(seen, every, spec.num_seen) if seen is not None else []
    hs = h_s[...]
    ht = h_t[...] if spec.use_kl else None

    def body(j, acc):
        start = pl.multiple_of(j * bv, bv)
        cols, keep = _keep(spec, start, seen_cols)
        z = _tile_logits(hs, tab_s, b_s, start, keep, spec, whole=True)
        t = _tile_logits(ht, tab_t, b_t, start, keep, spec, whole=True) if spec.use_kl else None
        grad = _grad_tile(spec, z, t, cols, keep, ys, columns)
        return acc + _dot(grad, tab_s[pl.ds(start, bv), :], spec, contract=(1, 0))

    tiles = tab_s.shape[0] // bv
    d_h[...] = jax.lax.fori_loop(0, tiles, body, jnp.zeros(d_h.shape, jnp.float32))


def _d_table_kernel(spec: _Spec, *refs):
    (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t), (d_tab, d_b) = _refs(spec, refs)
    bn, bv = spec.block_rows, spec.block_items
    start = pl.program_id(0) * bv

    def body(i, acc):
        d_table, d_bias = acc
        rows = pl.ds(pl.multiple_of(i * bn, bn), bn)
        columns = _row_columns(info, rows, _WIDTH)
        ys = _row_columns(labels, rows, spec.num_labels)
        seen_cols = _row_columns(seen, rows, spec.num_seen) if seen is not None else []
        cols, keep = _keep(spec, start, seen_cols)
        hs = h_s[rows, :]
        z = _tile_logits(hs, tab_s, b_s, start, keep, spec, whole=False)
        t = None
        if spec.use_kl:
            t = _tile_logits(h_t[rows, :], tab_t, b_t, start, keep, spec, whole=False)
        grad = _grad_tile(spec, z, t, cols, keep, ys, columns)
        d_table = d_table + _dot(grad, hs, spec, contract=(0, 0))
        return d_table, d_bias + jnp.sum(grad, axis=0, keepdims=True)

    blocks = h_s.shape[0] // bn
    init = (jnp.zeros(d_tab.shape, jnp.float32), jnp.zeros(d_b.shape, jnp.float32))
    d_table, d_bias = jax.lax.fori_loop(0, blocks, body, init)
    d_tab[...] = d_table
    d_b[...] = d_bias


# --------------------------------------------------------------------------
# The pallas_calls.
# --------------------------------------------------------------------------


def _compiler_params(spec: _Spec, semantics: tuple[str, ...]):
    if spec.platform == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=4, num_stages=2)
    if spec.platform == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        return pl_tpu.CompilerParams(dimension_semantics=semantics)
    return None


def _call(spec: _Spec, kernel, grid, in_specs, out_specs, out_shape, args, name):
    return pl.pallas_call(
        functools.partial(kernel, spec),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=spec.platform == "interpret",
        compiler_params=_compiler_params(spec, ("parallel",)),
        name=name,
    )(*args)


def _operands(spec: _Spec, info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t):
    args = [info, h_s, tab_s, b_s, labels]
    args += [seen] if spec.num_seen else []
    args += [h_t, tab_t, b_t] if spec.use_kl else []
    return args


def _row_block_specs(spec: _Spec, args):
    """Per-slot arrays in blocks of slots; tables and biases whole (read tile by tile)."""
    bn = spec.block_rows

    def one(x, per_row):
        if per_row:
            return pl.BlockSpec((bn, x.shape[1]), lambda i: (i, 0))
        return pl.BlockSpec(x.shape, lambda i: (0, 0))

    per_row = [True, True, False, False, True] + [True] * bool(spec.num_seen)
    per_row += [True, False, False] if spec.use_kl else []
    return [one(x, r) for x, r in zip(args, per_row, strict=True)]


def _forward(spec: _Spec, *arrays):
    """``[Np, 8]`` per-slot statistics over the counted columns: `STATS`, then a zero.

    ``m_z = max z``, ``s_z = Σ e^(z−m_z)``, ``s_b = Σ e^((z−m_z)/T)`` (0 at
    unit temperature or without a teacher), ``z_y = Σ_k z[y_k]``,
    ``m_t = max t``, ``s_a = Σ e^((t−m_t)/T)``, ``cross = Σ e^((t−m_t)/T)·(t − z)``.
    """
    args = _operands(spec, *arrays)
    rows = args[1].shape[0]
    return _call(
        spec,
        _forward_kernel,
        (rows // spec.block_rows,),
        _row_block_specs(spec, args),
        pl.BlockSpec((spec.block_rows, _WIDTH), lambda i: (i, 0)),
        jax.ShapeDtypeStruct((rows, _WIDTH), jnp.float32),
        args,
        "distill_jax_pallas_forward",
    )


def _backward(spec: _Spec, *arrays):
    """(d_hidden [Np, Dp], d_table [Vp, Dp], d_bias [1, Vp]) from the backward `info`."""
    args = _operands(spec, *arrays)
    rows, width = args[1].shape
    items = args[2].shape[0]
    bn, bv = spec.block_rows, spec.block_items
    d_h = _call(
        spec,
        _d_hidden_kernel,
        (rows // bn,),
        _row_block_specs(spec, args),
        pl.BlockSpec((bn, width), lambda i: (i, 0)),
        jax.ShapeDtypeStruct((rows, width), jnp.float32),
        args,
        "distill_jax_pallas_d_hidden",
    )

    # Over tiles of items: the tables' and biases' tiles, every slot's arrays whole.
    def one(x, tiled):
        if not tiled:
            return pl.BlockSpec(x.shape, lambda j: (0, 0))
        if x.shape[0] == 1:  # a bias [1, Vp]
            return pl.BlockSpec((1, bv), lambda j: (0, j))
        return pl.BlockSpec((bv, x.shape[1]), lambda j: (j, 0))

    tiled = [False, False, True, True, False] + [False] * bool(spec.num_seen)
    tiled += [False, True, True] if spec.use_kl else []
    d_table, d_bias = _call(
        spec,
        _d_table_kernel,
        (items // bv,),
        [one(x, t) for x, t in zip(args, tiled, strict=True)],
        (pl.BlockSpec((bv, width), lambda j: (j, 0)), pl.BlockSpec((1, bv), lambda j: (0, j))),
        (
            jax.ShapeDtypeStruct((items, width), jnp.float32),
            jax.ShapeDtypeStruct((1, items), jnp.float32),
        ),
        args,
        "distill_jax_pallas_d_table",
    )
    return d_h, d_table, d_bias


# --------------------------------------------------------------------------
# The loss: a custom_vjp over padded float32 arrays.
# --------------------------------------------------------------------------


def _row_terms(spec: _Spec, stats, temp):
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


def _totals(spec: _Spec, ce, kl, valid, labelled, temp, alpha):
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


def _on_rows(spec: _Spec, kernels, info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t, summed):
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
    info = jnp.zeros((rows, _WIDTH), jnp.float32).at[:, _INV_T].set(1 / temp)
    arrays = (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t)
    (stats,) = _on_rows(spec, _forward, *arrays, summed=0)
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
    info = jnp.stack([inv_t, w_ce, w_kl, *row_stats], axis=1).astype(jnp.float32)
    arrays = (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t)
    # d_table and d_bias are sums over the slots: summed across 'data'.
    d_h, d_table, d_bias = _on_rows(spec, _backward, *arrays, summed=2)
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
    spec = _Spec(
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
