"""Optimiser and train state, created already sharded on the mesh."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from distill_jax import sharding as sharding_lib


class TrainState(train_state.TrainState):
    """flax's TrainState: step, params, opt_state (apply_fn and tx are static)."""


def make_optimizer(
    mcfg: ml_collections.ConfigDict, then: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 1% of the peak rate.

    `then` is chained after it: it sees AdamW's updates (e.g. the pruning
    transformation of ``compress.prune``, which keeps cut weights at zero).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=mcfg.learning_rate,
        warmup_steps=mcfg.warmup_steps,
        decay_steps=mcfg.num_steps,
        end_value=mcfg.learning_rate * 0.01,
    )
    # Decay matrices only: shrinking LayerNorm scales and biases only hurts.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=mcfg.weight_decay, mask=decay_mask)
    parts = [adamw] if then is None else [adamw, then]
    if mcfg.grad_clip_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(mcfg.grad_clip_norm))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _dummy_inputs(model: nn.Module) -> tuple[jax.Array, ...]:
    if hasattr(model, "vocab_sizes"):  # a click model: (categorical, numeric) rows
        return (
            jnp.zeros((1, len(model.vocab_sizes)), jnp.int32),
            jnp.zeros((1, model.num_numeric), jnp.float32),
            jnp.zeros((1, 1), jnp.int32),
        )
    return (jnp.ones((1, model.max_len), jnp.int32),)


def init_params_fn(model: nn.Module):
    """A function rng -> boxed params (logical axis names kept)."""

    def init(rng):
        return model.init({"params": rng, "dropout": rng}, *_dummy_inputs(model), train=False)[
            "params"
        ]

    return init


def param_shardings(model: nn.Module, mesh, rule_pairs) -> Any:
    """The NamedShardings of the model's (unboxed) params under the rules."""
    abstract = jax.eval_shape(init_params_fn(model), jax.random.key(0))
    return sharding_lib.logical_shardings(abstract, mesh, rule_pairs)


def create_state(
    model: nn.Module,
    mcfg: ml_collections.ConfigDict,
    mesh,
    rule_pairs,
    rng: jax.Array,
    then: optax.GradientTransformation | None = None,
    extra_params: dict | None = None,
) -> tuple[TrainState, Any]:
    """Initialises the train state directly in its sharded layout.

    `then` is chained after the optimiser (see :func:`make_optimizer`).
    `extra_params` maps top-level names to `rng -> params` functions for
    parameters trained beside the model's own but not part of it (the
    projection of hidden-state matching); they are replicated.

    Returns:
      (state, shardings): the state and the NamedSharding of each of its leaves.
    """
    tx = make_optimizer(mcfg, then)
    init = init_params_fn(model)

    def init_state(rng):
        params = init(rng)
        if extra_params:
            params = dict(params)
            for i, (name, fn) in enumerate(sorted(extra_params.items())):
                params[name] = fn(jax.random.fold_in(rng, 1000 + i))
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    abstract = jax.eval_shape(init_state, rng)
    shardings = sharding_lib.logical_shardings(abstract, mesh, rule_pairs)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(rng)
    return state, shardings


def abstract_params(model: nn.Module) -> Any:
    """Shapes and dtypes of the model's unboxed params (nothing allocated)."""
    return nn.unbox(jax.eval_shape(init_params_fn(model), jax.random.key(0)))
