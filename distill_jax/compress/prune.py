"""Magnitude pruning with a gradual schedule, as an optax transformation.

The sparsity grows from 0 to its target along the cubic schedule of Zhu &
Gupta (2017), ``s_t = s_f * (1 - (1 - t / T)^3)``, while the student is
fine-tuned with the distillation loss, so it recovers from each cut. Every
``update_every`` steps the weights with the smallest L1 magnitude are cut:
over all prunable matrices at once (``scope='global'``) or within each
(``scope='layer'``). A cut weight never comes back: the masks only shrink,
and :func:`prune_updates` rewrites each update so that the new parameters
are the old ones plus the update, times the mask, which leaves a cut weight
exactly zero whatever the optimiser before it (momentum, weight decay) does.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCOPES = ("global", "layer")


def prunable(params: Any, include_item_table: bool) -> Any:
    """A pytree of bools like `params`: True for the weights that may be pruned.

    The dense layers' kernels are prunable, and the item table (its factor,
    for a low-rank table) when `include_item_table`. Biases (also the 2-D
    per-head ones), LayerNorm and the small position table are not.
    """

    def pick(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name == "item_embedding":
            return include_item_table
        return name == "kernel" and leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(pick, params)


def sparsity_at(step: jax.Array, target: float, end_step: int) -> jax.Array:
    """The cubic schedule: 0 at step 0, `target` from `end_step` on."""
    progress = jnp.clip(step / max(end_step, 1), 0.0, 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def _cut(magnitudes: jax.Array, alive: jax.Array, sparsity: jax.Array) -> jax.Array:
    """The mask keeping all but the round(sparsity * n) smallest of `magnitudes`.

    Already cut entries (not `alive`) count among the smallest; ties are broken
    by position, so exactly that many entries are cut.
    """
    n = magnitudes.size
    num_cut = jnp.round(sparsity * n).astype(jnp.int32)
    order = jnp.argsort(jnp.where(alive, magnitudes, -1.0).ravel(), stable=True)
    rank = jnp.empty((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return (rank >= num_cut).reshape(magnitudes.shape) & alive


def magnitude_masks(params: Any, masks: Any, which: Any, sparsity: jax.Array, scope: str) -> Any:
    """New masks: `masks` with the smallest-magnitude weights cut to `sparsity`."""
    if scope not in SCOPES:
        raise ValueError(f"config.compress.prune_scope={scope!r}: expected one of {SCOPES}")
    leaves, treedef = jax.tree.flatten(params)
    mask_leaves = treedef.flatten_up_to(masks)
    picked = treedef.flatten_up_to(which)
    out = list(mask_leaves)
    idx = [i for i, p in enumerate(picked) if p]
    if not idx:
        return masks
    if scope == "layer":
        for i in idx:
            out[i] = _cut(jnp.abs(leaves[i]), mask_leaves[i], sparsity)
    else:
        flat = jnp.concatenate([jnp.abs(leaves[i]).ravel() for i in idx])
        alive = jnp.concatenate([mask_leaves[i].ravel() for i in idx])
        kept = _cut(flat, alive, sparsity)
        start = 0
        for i in idx:
            size = leaves[i].size
            out[i] = kept[start : start + size].reshape(leaves[i].shape)
            start += size
    return treedef.unflatten(out)


class PruneState(NamedTuple):
    count: jax.Array  # updates applied so far
    masks: Any  # bool arrays like the params (all True where not prunable)


def prune_updates(
    which: Any, *, target: float, end_step: int, update_every: int, scope: str
) -> optax.GradientTransformation:
    """Chained after the optimiser: updates that keep cut weights at exactly zero.

    Args:
      which: :func:`prunable`'s pytree of bools.
      target: the final sparsity of the prunable weights, in [0, 1).
      end_step: the step at which the schedule reaches `target`.
      update_every: the masks are recomputed every this many steps (and at `end_step`).
      scope: 'global' (one threshold over all prunable weights) or 'layer'.
    """

    def init(params):
        masks = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)
        return PruneState(jnp.zeros((), jnp.int32), masks)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("prune_updates needs the params (optax.apply_updates passes them).")
        count = state.count + 1
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        due = (count % update_every == 0) | (count == end_step)
        due = due & (count <= end_step)
        masks = jax.lax.cond(
            due,
            lambda: magnitude_masks(
                new, state.masks, which, sparsity_at(count, target, end_step), scope
            ),
            lambda: state.masks,
        )
        updates = jax.tree.map(
            lambda p, n, m: jnp.where(m, n, jnp.zeros_like(n)) - p, params, new, masks
        )
        return updates, PruneState(count, masks)

    return optax.GradientTransformation(init, update)


def sparsity_report(params: Any, which: Any) -> dict:
    """Share of exact zeros per prunable parameter, and over all of them."""
    report, zeros, total = {}, 0, 0
    for (path, leaf), pick in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(which), strict=True
    ):
        if not pick:
            continue
        values = np.asarray(jax.device_get(leaf))
        z = int(np.count_nonzero(values == 0))
        report[jax.tree_util.keystr(path, simple=True, separator="/")] = z / values.size
        zeros, total = zeros + z, total + values.size
    return {"per_parameter": report, "prunable": zeros / max(total, 1), "prunable_weights": total}
