"""Full-ranking recommendation metrics: target ranks, HR@K, NDCG@K and MRR.

Pure functions of arrays (jax.numpy only: no flax, no config), batched and
jit-compatible. Conventions:

* Item ids: 0 is padding, ``1..V`` are items. Scores are ``[B, V+1]``; column 0
  is never a candidate (it may hold anything, usually ``-inf``).
* Ranks are computed without sorting: one comparison against the target's
  score and a masked sum, O(B·V), so the ``[B, V+1]`` scores may be sharded
  along either axis.
* Ties count against the model (a candidate scoring exactly the target's score
  is ranked above it), so a model that scores everything alike gets the worst
  rank rather than a lucky one.
* Metrics are returned as ``(sum, count)`` pairs over valid rows, so they stay
  exact when accumulated across batches, shards and uneven masks; divide only
  at the end with :func:`finalize`.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "SumAndCount",
    "accumulate",
    "finalize",
    "ranking_metrics",
    "target_ranks",
]

SumAndCount = tuple[jax.Array, jax.Array]


def _check_int_array(name: str, x: jax.Array, shape: tuple[int, ...] | None, ndim: int) -> None:
    if x.ndim != ndim or (shape is not None and x.shape != shape):
        expected = shape if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"{name} must have shape {expected}, got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer item ids, got dtype {x.dtype}.")


def target_ranks(
    scores: ArrayLike,
    targets: ArrayLike,
    history: ArrayLike | None = None,
    *,
    exclude_history: bool = True,
) -> jax.Array:
    """1-based rank of each user's target item among the candidate items.

    The candidates of a row are the items ``1..V``, minus the items of its
    ``history`` when ``exclude_history`` is set. The target itself is always a
    candidate, even if it also appears in the history (a user may come back to
    an item). The rank is 1 plus the number of *other* candidates whose score
    is ``>=`` the target's: ties count against the model, so a constant model
    gets rank = number of candidates.

    Args:
      scores: ``[B, V+1]`` float scores (``-inf``/``+inf`` allowed, NaN not).
        Column 0 (padding) is ignored whatever it holds.
      targets: ``[B]`` integer target ids in ``1..V``. A row whose target is
        outside that range (for example a batch-filling row with target 0)
        gets the worst rank, 1 + its number of candidates, so it can never
        count as a hit; mask such rows with ``where`` in :func:`ranking_metrics`.
      history: optional ``[B, H]`` integer ids of items the user interacted
        with before the target; 0 is padding, duplicates are fine, ids outside
        ``1..V`` are ignored.
      exclude_history: whether to remove the history items from the
        candidates. Without ``history`` nothing is removed.

    Returns:
      ``[B]`` int32 ranks, each in ``1..V`` for a valid target.
    """
    scores, targets = jnp.asarray(scores), jnp.asarray(targets)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape [B, V+1] with V >= 1, got {scores.shape}.")
    batch, num_cols = scores.shape
    _check_int_array("targets", targets, (batch,), 1)

    if history is not None and exclude_history:
        history = jnp.asarray(history)
        _check_int_array("history", history, None, 2)
        if history.shape[0] != batch:
            raise ValueError(
                f"history must have shape [B, H] with B={batch} (scores.shape[0]), "
                f"got {history.shape}."
            )
    else:
        history = None
    return _target_ranks(scores, targets, history)


# Jitted here as well, so eager calls compile once per shape instead of once
# per operation; inside a caller's jit it simply inlines.
@jax.jit
def _target_ranks(scores: jax.Array, targets: jax.Array, history: jax.Array | None) -> jax.Array:
    num_cols = scores.shape[1]
    targets = targets.astype(jnp.int32)
    cols = jnp.arange(num_cols, dtype=jnp.int32)
    valid_target = (targets >= 1) & (targets < num_cols)
    # An out-of-range target reads -inf, which every candidate ties or beats.
    target_score = jnp.take_along_axis(scores, jnp.clip(targets, 0, num_cols - 1)[:, None], axis=1)
    target_score = jnp.where(valid_target[:, None], target_score, -jnp.inf)
    # "Other" candidates: never the padding column, never the target itself.
    candidate = (cols != 0)[None, :] & (cols[None, :] != targets[:, None])

    if history is not None:
        history = history.astype(jnp.int32)
        # Negative ids would wrap around in the scatter; send them out of range
        # so mode="drop" ignores them, like ids above V.
        history = jnp.where(history < 0, num_cols, history)
        # A per-row scatter into a [V+1] bool row: O(B·(V+H)) memory, where a
        # one-hot compare would need [B, H, V+1] (~600 MB at B=256, H=200,
        # V=12k). Duplicates are harmless (set, not add); vmap makes the batch
        # an explicit scatter batch dimension, which shards cleanly on 'data'.
        seen = jax.vmap(
            lambda row: jnp.zeros((num_cols,), jnp.bool_).at[row].set(True, mode="drop")
        )(history)
        candidate = candidate & ~seen

    ahead = candidate & (scores >= target_score)
    return 1 + jnp.sum(ahead, axis=1, dtype=jnp.int32)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"ks must be integers >= 1, got {ks!r}.")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a cutoff, got {ks!r}.")
    return tuple(int(k) for k in ks)


def ranking_metrics(
    ranks: ArrayLike,
    *,
    ks: Sequence[int] = (5, 10, 20),
    where: ArrayLike | None = None,
) -> dict[str, SumAndCount]:
    """HR@K, NDCG@K and MRR of a batch of ranks, as ``(sum, count)`` pairs.

    With one relevant item per row, HR@K is ``rank <= K``, NDCG@K is
    ``1 / log2(rank + 1)`` if ``rank <= K`` else 0, and MRR is ``1 / rank``.

    Args:
      ranks: ``[B]`` 1-based ranks, as from :func:`target_ranks`.
      ks: the cutoffs K, distinct Python integers >= 1.
      where: optional ``[B]`` boolean mask of valid rows; None means all
        valid. Masked rows may hold any rank (even 0) and contribute nothing.

    Returns:
      ``{"hr@K": (sum, count), "ndcg@K": (sum, count), ..., "mrr": (sum,
      count)}``: float32 scalars, sums over the valid rows and the number of
      valid rows. Combine batches with :func:`accumulate`, then divide with
      :func:`finalize`.
    """
    ks = _check_ks(ks)
    ranks = jnp.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must have shape [B], got {ranks.shape}.")
    if where is None:
        valid = jnp.ones(ranks.shape, jnp.bool_)
    else:
        valid = jnp.asarray(where)
        if valid.shape != ranks.shape:
            raise ValueError(
                f"where must have shape {ranks.shape} (one flag per row), got {valid.shape}."
            )
        if valid.dtype != jnp.bool_ and not jnp.issubdtype(valid.dtype, jnp.integer):
            raise TypeError(f"where must be a boolean (or 0/1 integer) mask, got {valid.dtype}.")
        valid = valid.astype(jnp.bool_)
    return _ranking_metrics(ranks, valid, ks)


@functools.partial(jax.jit, static_argnums=2)
def _ranking_metrics(
    ranks: jax.Array, valid: jax.Array, ks: tuple[int, ...]
) -> dict[str, SumAndCount]:
    # Rank 1 in masked rows keeps 1/rank and 1/log2 finite there; jnp.where
    # below drops them anyway.
    rank = jnp.where(valid, ranks, 1).astype(jnp.float32)
    count = jnp.sum(valid, dtype=jnp.float32)
    reciprocal_log = 1.0 / jnp.log2(rank + 1.0)

    out: dict[str, SumAndCount] = {}
    for k in ks:
        hit = valid & (rank <= k)
        out[f"hr@{k}"] = (jnp.sum(hit, dtype=jnp.float32), count)
        out[f"ndcg@{k}"] = (jnp.sum(jnp.where(hit, reciprocal_log, 0.0)), count)
    out["mrr"] = (jnp.sum(jnp.where(valid, 1.0 / rank, 0.0)), count)
    return out


def _is_sum_and_count(x: Any) -> bool:
    return (
        isinstance(x, tuple)
        and len(x) == 2
        and not any(isinstance(v, tuple | list | Mapping) for v in x)
    )


def accumulate(total: Any | None, new: Any) -> Any:
    """Adds two pytrees of ``(sum, count)`` pairs leaf by leaf.

    Works on jax arrays (inside or outside jit), NumPy arrays and Python
    numbers alike.

    Args:
      total: the running total, or None before the first batch.
      new: a pytree of the same structure, e.g. from :func:`ranking_metrics`.

    Returns:
      The element-wise sum; ``new`` itself when ``total`` is None.
    """
    if total is None:
        return new
    if jax.tree.structure(total) != jax.tree.structure(new):
        raise ValueError(
            "accumulate: total and new must have the same structure (same metric keys and "
            f"ks), got {jax.tree.structure(total)} and {jax.tree.structure(new)}."
        )
    return jax.tree.map(operator.add, total, new)


def finalize(total: Any) -> Any:
    """Turns every ``(sum, count)`` pair into the Python float ``sum / count``.

    Args:
      total: a pytree (usually a flat dict) whose leaves are ``(sum, count)``
        pairs of scalars, e.g. accumulated :func:`ranking_metrics`.

    Returns:
      The same structure with a float in place of each pair: ``sum / count``,
      or exactly ``0.0`` where count is 0. For a :func:`ranking_metrics` dict,
      a ``dict[str, float]``. Forces a device-to-host copy.
    """

    def mean(pair: Any) -> float:
        if not _is_sum_and_count(pair):
            raise ValueError(f"finalize expects (sum, count) pairs as leaves, got {pair!r}.")
        total_sum, count = (float(np.asarray(v)) for v in pair)
        if not math.isfinite(count) or count < 0:
            raise ValueError(f"finalize: count must be finite and >= 0, got {count}.")
        return total_sum / count if count > 0 else 0.0

    return jax.tree.map(mean, total, is_leaf=_is_sum_and_count)


def seen_mask(history: ArrayLike, num_cols: int) -> jax.Array:
    """bool [B, num_cols]: True at the item ids listed in each row of `history`.

    Ids outside 1..num_cols-1 (padding 0, negatives, too large) mark nothing
    except column 0, which is never a candidate anyway.
    """
    history = jnp.asarray(history).astype(jnp.int32)
    history = jnp.where(history < 0, num_cols, history)
    return jax.vmap(lambda row: jnp.zeros((num_cols,), jnp.bool_).at[row].set(True, mode="drop"))(
        history
    )


def top_k_items(
    scores: ArrayLike, history: ArrayLike | None, k: int, *, exclude_history: bool = True
) -> jax.Array:
    """int32 [B, k]: each row's k best candidate items (never column 0).

    With `exclude_history`, items of the row's history are not candidates, as
    in `target_ranks`; what a user would be shown.
    """
    scores = jnp.asarray(scores, jnp.float32)
    blocked = jnp.zeros(scores.shape, jnp.bool_).at[:, 0].set(True)
    if history is not None and exclude_history:
        blocked = blocked | seen_mask(history, scores.shape[1])
    return jax.lax.top_k(jnp.where(blocked, -jnp.inf, scores), k)[1].astype(jnp.int32)


def exposure_stats(counts: np.ndarray, k: int, num_items: int) -> dict[str, float]:
    """Catalogue coverage@k and exposure Gini@k from per-item top-k counts.

    Args:
      counts: [V+1] how often each item appeared in users' top-k lists.
      k: the list length (for the keys).
      num_items: V.

    Returns:
      `coverage@k`: share of the V items in at least one top-k list;
      `gini@k`: Gini coefficient of the exposure counts over all V items
      (0 = every item shown equally often, near 1 = a few items take all).
    """
    c = np.sort(np.asarray(counts, np.float64)[1 : num_items + 1])
    total = c.sum()
    coverage = float(np.count_nonzero(c)) / num_items
    if total == 0:
        return {f"coverage@{k}": coverage, f"gini@{k}": 0.0}
    n = num_items
    gini = float(np.sum((2 * np.arange(1, n + 1) - n - 1) * c) / (n * total))
    return {f"coverage@{k}": coverage, f"gini@{k}": gini}
