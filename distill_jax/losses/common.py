"""What every catalogue loss shares: argument checks, masks, (sum, count) reductions.

Conventions of every loss in this package:

* Catalogue logits have shape ``[..., V]``; columns masked to ``-inf`` (the
  padding column 0 always is) have probability 0 for teacher and student and
  produce neither NaN values nor NaN gradients.
* ``where`` is an optional boolean mask over positions. A masked position may
  hold anything, even NaN, an all ``-inf`` row or label -1: it is zeroed (or
  discarded by a select) so it cannot poison values or gradients.
* ``foo(...)`` returns the mean over valid positions, exactly ``0.0`` when
  nothing is valid; ``foo_sum(...)`` returns ``(sum, count)`` so that metrics
  can be accumulated exactly across batches, shards and uneven masks.
* Arithmetic runs in at least float32: bfloat16 inputs are upcast inside the
  loss; gradients come back in the input dtype.
* The teacher never receives a gradient (``jax.lax.stop_gradient`` inside).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

SumAndCount = tuple[jax.Array, jax.Array]


# --------------------------------------------------------------------------
# Argument checks. Shapes are static under jit, so they are always checked;
# hyper-parameters only when they are Python numbers (a traced value cannot be
# inspected without a host sync).
# --------------------------------------------------------------------------


def check_temperature(temperature: float | ArrayLike) -> None:
    # inf would turn T²·KL into inf·0 = NaN; `not T > 0` also catches NaN.
    if isinstance(temperature, numbers.Real) and not (0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    check_scalar("temperature", temperature)


def check_alpha(alpha: float | ArrayLike) -> None:
    if isinstance(alpha, numbers.Real) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    check_scalar("alpha", alpha)


def check_scalar(name: str, value: float | ArrayLike) -> None:
    if not isinstance(value, numbers.Real) and jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}."
        )


def check_catalogue(name: str, logits: jax.Array) -> None:
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {logits.shape}.")


def check_labels(
    labels: jax.Array, positions: tuple[int, ...], of: str = "logits.shape[:-1]"
) -> None:
    if labels.shape != positions:
        raise ValueError(f"labels must have shape {positions} ({of}), got {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer item ids, got dtype {labels.dtype}.")


def prepare_where(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
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


def rows_where(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array:
    """``where`` as a bool array of ``shape``, all True when None."""
    valid = prepare_where(where, shape)
    return jnp.ones(shape, jnp.bool_) if valid is None else valid


def check_tower(prefix: str, h: jax.Array, table: jax.Array, bias: jax.Array | None) -> None:
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


def compute_dtype(x: jax.Array) -> jnp.dtype:
    # Upcast bf16/f16 to f32; keep f64 when x64 is enabled.
    return jnp.promote_types(x.dtype, jnp.float32)


def sanitize(logits: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Upcasts and zeroes masked positions so garbage there cannot make NaNs."""
    logits = logits.astype(compute_dtype(logits))
    if valid is None:
        return logits
    # Zeros, not -inf: an all -inf row has an undefined softmax (NaN).
    return jnp.where(valid[..., None], logits, 0)


def xlogy_guarded(p: jax.Array, log_ratio: jax.Array) -> jax.Array:
    """``p * log_ratio`` with ``0 * anything = 0``.

    Columns that are -inf for teacher and student give ``0 * (-inf + inf)``;
    the value is 0 by the convention 0·log 0 = 0. ``jnp.where`` (not a
    multiplication by a mask) keeps the NaN out of the backward pass too,
    because d(p·r)/dr = p is 0 there. A NaN ``p`` (a teacher row holding NaN
    or +inf) stays NaN: it must show in the loss, not count as 0.
    """
    return jnp.where(p == 0, 0, p * log_ratio)


def nan_outside(values: jax.Array, labels: jax.Array, num_items: int) -> jax.Array:
    """``values`` with NaN where a label is outside ``[0, num_items)``.

    A gather would otherwise read a negative label as a column from the end
    (-1 as the last item): a finite, wrong loss instead of a loud one.
    """
    return jnp.where((labels >= 0) & (labels < num_items), values, jnp.nan)


def nan_rows(values: jax.Array, logits: jax.Array) -> jax.Array:
    """``values [...]`` with NaN where the row of ``logits [..., V]`` holds NaN or +inf.

    For losses that only rank a row (top-k): a garbage row must show in the
    loss rather than pick arbitrary items. -inf (an excluded column) is fine.
    """
    top = jnp.max(logits, axis=-1)  # NaN if any entry is
    return jnp.where(jnp.isnan(top) | (top == jnp.inf), jnp.nan, values)


# --------------------------------------------------------------------------
# Kernels that are one call over whole arrays (cpu_kernel, pallas) on a mesh:
# each device takes its block of rows (split along 'data'; the item table
# whole on each) under shard_map, and sums over rows (the table's and bias's
# gradients) are summed across 'data'. Without shard_map XLA would gather
# every operand onto every device.
# --------------------------------------------------------------------------

# The mesh axis that splits rows (positions) across devices.
DATA = "data"


def row_mesh(rows: int, form: str):
    """The mesh `form` splits its rows over (set by jax.set_mesh), or None on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    if DATA not in mesh.axis_names:
        raise ValueError(
            f"the {form} form splits rows along mesh axis 'data', but the mesh has "
            f"axes {mesh.axis_names}."
        )
    if rows % mesh.shape[DATA]:
        raise ValueError(
            f"the {form} form splits its {rows} rows (positions) along mesh axis "
            f"'data' of size {mesh.shape[DATA]}; expected a multiple of it."
        )
    return mesh


def on_rows(mesh, fn, rows, shared, outputs: int, summed: int):
    """``fn(rows, shared)``: on each device's rows under shard_map when `mesh` is given.

    `rows` (a tuple of ``[N, ...]`` arrays, None allowed) is split along
    'data', `shared` is whole on every device; of the `outputs` arrays `fn`
    returns, the last `summed` are sums over rows (summed across 'data'), the
    others per-row (split like `rows`).
    """
    if mesh is None:
        return fn(rows, shared)

    def local(rows, shared):
        out = fn(rows, shared)
        cut = outputs - summed
        return (*out[:cut], *(jax.lax.psum(x, DATA) for x in out[cut:]))

    out_specs = (P(DATA),) * (outputs - summed) + (P(),) * summed
    # check_vma=False: a kernel's (custom call's) outputs carry no varying-axes
    # annotation; the specs above say what each is.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(DATA), P()), out_specs=out_specs, check_vma=False
    )(rows, shared)


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
    values = values.astype(compute_dtype(values))
    valid = prepare_where(where, values.shape)
    if valid is None:
        return jnp.sum(values), jnp.asarray(values.size, values.dtype)
    total = jnp.sum(jnp.where(valid, values, 0))
    return total, jnp.sum(valid, dtype=values.dtype)


def mean(sum_and_count: SumAndCount) -> jax.Array:
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
    return mean(masked_sum_and_count(values, where))


def weighted_total(ce_total: jax.Array, kd_total: jax.Array, alpha: jax.Array) -> jax.Array:
    """``alpha·ce_total + (1 − alpha)·kd_total``, a term with weight 0 dropped outright.

    Dropping (not multiplying by 0) keeps e.g. pure KD (alpha=0) from turning
    into NaN through 0·inf from a label on a -inf column.
    """
    return jnp.where(alpha == 0, 0, alpha * ce_total) + jnp.where(
        alpha == 1, 0, (1 - alpha) * kd_total
    )


def mean_of(sum_fn: Callable[..., SumAndCount]) -> Callable[..., jax.Array]:
    """The mean form of a ``foo_sum`` loss: same arguments, exactly 0.0 when nothing is valid."""

    @functools.wraps(sum_fn)
    def mean_fn(*args, **kwargs) -> jax.Array:
        return mean(sum_fn(*args, **kwargs))

    mean_fn.__name__ = mean_fn.__qualname__ = sum_fn.__name__.removesuffix("_sum")
    mean_fn.__doc__ = (
        f"Mean over valid positions of :func:`{sum_fn.__name__}` (same arguments); "
        "exactly 0.0, with zero gradients, when no position is valid."
    )
    return mean_fn
