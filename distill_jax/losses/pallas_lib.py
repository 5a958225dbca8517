"""The Pallas kernels of the pallas form (`pallas_kernel.py`): one forward, two backward.

Each kernel takes the slots' and the catalogue's arrays already padded to
whole blocks (`Spec.block_rows` slots, `Spec.block_items` items, the widths
to `TILES`' multiple) and loops over tiles of items (forward, ``d_hidden``)
or blocks of slots (``d_table``), recomputing each tile's logits:

* `forward`: per block of slots, the online logsumexp statistics `STATS`;
* `backward`: ``d_hidden = G @ E_s`` per block of slots, and
  ``d_table = G.T @ h_s``, ``d_bias = Σ_rows G`` per tile of items, with
  ``G`` the logits' gradient formed per tile from the forward statistics.

Written for Triton (GPU: every loaded block a power of two, per-slot scalars
read as ``[rows, 1]`` ref slices, no state across programs) and Mosaic (TPU:
2-D values, 'parallel' grids), and run by Pallas' interpreter on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["INFO", "INV_T", "PLATFORMS", "STATS", "TILES", "WIDTH", "Spec", "backward", "forward"]

# Where the kernels run: compiled by Triton, by Mosaic, or interpreted (CPU).
PLATFORMS = ("gpu", "tpu", "interpret")
# (slots per block, items per tile, the width D is padded to a multiple of).
# Interpret mode takes the GPU's layout, so the CPU tests run its padding.
TILES = {"gpu": (32, 128, 16), "tpu": (128, 256, 128), "interpret": (32, 128, 16)}
# Columns of the per-slot float array each kernel reads (`info`): the forward
# kernel reads 1/T only; the backward kernels all (`_grad_tile`).
INFO = ("inv_t", "w_ce", "w_kl", "lse_z", "m_z", "log_s_b", "m_t", "log_s_a")
INV_T = INFO.index("inv_t")
# Columns of the forward kernel's statistics (`forward`'s docstring).
STATS = ("m_z", "s_z", "s_b", "z_y", "m_t", "s_a", "cross")
WIDTH = 8  # both arrays have 8 columns


@dataclasses.dataclass(frozen=True)
class Spec:
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


def _refs(spec: Spec, refs):
    """(info, h_s, table_s, bias_s, labels, seen, h_t, table_t, bias_t), outputs."""
    refs = list(refs)
    head = refs[:5]
    del refs[:5]
    seen = refs.pop(0) if spec.num_seen else None
    teacher = (refs.pop(0), refs.pop(0), refs.pop(0)) if spec.use_kl else (None, None, None)
    return (*head, seen, *teacher), refs


def _dot(a, b, spec: Spec, contract=(1, 1)):
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(
        a, b, dims, precision=spec.precision, preferred_element_type=jnp.float32
    )


def _keep(spec: Spec, start, seen_cols):
    """Which columns of the tile at `start` count: [1, bv], or [bn, bv] with `seen`."""
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, spec.block_items), 1)
    keep = (cols >= 1) & (cols < spec.num_valid)
    for s in seen_cols:  # [bn, 1] each: the slot's s-th seen id
        keep = keep & (s != cols)
    return cols, keep


def _tile_logits(h, table_ref, bias_ref, start, keep, spec: Spec, whole: bool):
    """``h @ E[tile].T + b[tile]``, uncounted columns at -inf.

    `whole`: the refs hold every item (the tile is sliced out), else the tile.
    """
    if whole:
        tile = pl.ds(start, spec.block_items)
        table, bias = table_ref[tile, :], bias_ref[:, tile]
    else:
        table, bias = table_ref[...], bias_ref[...]
    return jnp.where(keep, _dot(h, table, spec) + bias, -jnp.inf)


def _onehot(spec: Spec, cols, ys):
    """Σ_k [y_k == col] / K: [bn, bv]."""
    hits = sum(jnp.where(cols == y, 1.0, 0.0) for y in ys)
    return hits if spec.num_labels == 1 else hits * (1.0 / spec.num_labels)


def _grad_tile(spec: Spec, z, t, cols, keep, ys, info):
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


def _forward_kernel(spec: Spec, *refs):
    (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t), (out,) = _refs(spec, refs)
    bn, bv = spec.block_rows, spec.block_items
    every = slice(None)
    inv_t = info[every, pl.ds(INV_T, 1)]
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


def _d_hidden_kernel(spec: Spec, *refs):
    (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t), (d_h,) = _refs(spec, refs)
    bv = spec.block_items
    every = slice(None)
    columns = _row_columns(info, every, WIDTH)
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


def _d_table_kernel(spec: Spec, *refs):
    (info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t), (d_tab, d_b) = _refs(spec, refs)
    bn, bv = spec.block_rows, spec.block_items
    start = pl.program_id(0) * bv

    def body(i, acc):
        d_table, d_bias = acc
        rows = pl.ds(pl.multiple_of(i * bn, bn), bn)
        columns = _row_columns(info, rows, WIDTH)
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


def _compiler_params(spec: Spec, semantics: tuple[str, ...]):
    if spec.platform == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=4, num_stages=2)
    if spec.platform == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        return pl_tpu.CompilerParams(dimension_semantics=semantics)
    return None


def _call(spec: Spec, kernel, grid, in_specs, out_specs, out_shape, args, name):
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


def _operands(spec: Spec, info, h_s, tab_s, b_s, labels, seen, h_t, tab_t, b_t):
    args = [info, h_s, tab_s, b_s, labels]
    args += [seen] if spec.num_seen else []
    args += [h_t, tab_t, b_t] if spec.use_kl else []
    return args


def _row_block_specs(spec: Spec, args):
    """Per-slot arrays in blocks of slots; tables and biases whole (read tile by tile)."""
    bn = spec.block_rows

    def one(x, per_row):
        if per_row:
            return pl.BlockSpec((bn, x.shape[1]), lambda i: (i, 0))
        return pl.BlockSpec(x.shape, lambda i: (0, 0))

    per_row = [True, True, False, False, True] + [True] * bool(spec.num_seen)
    per_row += [True, False, False] if spec.use_kl else []
    return [one(x, r) for x, r in zip(args, per_row, strict=True)]


def forward(spec: Spec, *arrays):
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
        pl.BlockSpec((spec.block_rows, WIDTH), lambda i: (i, 0)),
        jax.ShapeDtypeStruct((rows, WIDTH), jnp.float32),
        args,
        "distill_jax_pallas_forward",
    )


def backward(spec: Spec, *arrays):
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
