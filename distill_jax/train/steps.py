"""Jitted train steps: one builder for teacher training, distillation and baselines.

Every step also reports whether its loss and gradient were finite, and applies
no update when they were not (`make_train_step`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from distill_jax import losses
from distill_jax import sharding as sharding_lib
from distill_jax.train import ensemble as ensemble_lib

TASKS = ("train", "distill")


def hidden_at_targets(
    model: nn.Module,
    params,
    inputs,
    target_index,
    *,
    train: bool,
    rngs=None,
    table=None,
    users=None,
) -> jax.Array:
    """Hidden states `[N, D]` at the packed target slots only.

    Catalogue logits cost `V` per position, so they are computed only where a
    target sits (`target_index` indexes the flattened `B x S` positions), not
    at every padded window position. The result is 2-D so that the catalogue
    product is one plain matrix product (a batched 3-D einsum runs about half
    as fast on CPU). `table`: a model with side features reads its item rows
    from it (the step's `catalogue`), so inputs and outputs drop the same ids.
    `users`: the batch's user ids (`batch.get("users")`), for a model with
    user features.
    """
    extra = {} if table is None else {"table": table}
    if users is not None:
        extra["users"] = users
    hidden = model.apply({"params": params}, inputs, train=train, rngs=rngs, **extra)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return jnp.take(flat, target_index, axis=0)


def logits_at_targets(model: nn.Module, params, batch, *, train: bool, rngs=None):
    """Catalogue logits `[N, V + 1]` at the batch's packed target slots."""
    h = hidden_at_targets(
        model,
        params,
        batch["inputs"],
        batch["target_index"],
        train=train,
        rngs=rngs,
        users=batch.get("users"),
    )
    return model.apply({"params": params}, h, method=model.logits)


def history_columns(batch) -> jax.Array:
    """`[N, S]` item ids each target slot has already seen in its window.

    Slot `n` sits at row `target_index // S`, position `target_index % S` of
    `inputs [B, S]` (one user per row, causal inputs): its history is that
    row's items up to and including the position. Later positions, and the
    slot's own target wherever it occurs, become 0 (the padding column, which
    is -inf anyway), so the target is never excluded.
    """
    inputs, index = batch["inputs"], batch["target_index"]
    width = inputs.shape[1]
    rows, pos = index // width, index % width
    seen = jnp.take(inputs, rows, axis=0)
    keep = (jnp.arange(width)[None, :] <= pos[:, None]) & (seen != batch["targets"][:, None])
    return jnp.where(keep, seen, 0)


HIDDEN_LOSSES = losses.HIDDEN_LOSSES
# The learned projection of hidden-state matching: a top-level entry of the
# trained params beside the model's own (flax ignores it when the model is
# applied), stripped from the parameters the stage keeps (`model_params`).
HIDDEN_PROJECTION = "hidden_projection"


def model_params(params):
    """The model's own parameters: `params` without the hidden-matching projection."""
    if isinstance(params, dict) and HIDDEN_PROJECTION in params:
        return {k: v for k, v in params.items() if k != HIDDEN_PROJECTION}
    return params


def hidden_loss(h: jax.Array, projection: jax.Array, h_t: jax.Array, where, kind: str):
    """Mean over `where` rows: MSE (per dimension) or 1 − cosine of `h @ projection`, `h_t`."""
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"hidden loss {kind!r} is invalid; expected one of {HIDDEN_LOSSES}.")
    z = h.astype(jnp.float32) @ projection
    t = jax.lax.stop_gradient(h_t.astype(jnp.float32))
    if kind == "mse":
        per_row = jnp.mean(jnp.square(z - t), axis=-1)
    else:
        eps = 1e-8
        cos = jnp.sum(z * t, -1) / (
            jnp.maximum(jnp.linalg.norm(z, axis=-1), eps)
            * jnp.maximum(jnp.linalg.norm(t, axis=-1), eps)
        )
        per_row = 1.0 - cos
    return losses.masked_mean(per_row, where)


def _teacher_fields(teacher, teacher_params, batch) -> dict:
    """What the loss reads from the frozen teacher (or ensemble) at the batch's slots."""
    if isinstance(teacher, ensemble_lib.Ensemble):
        hidden = tuple(
            jax.lax.stop_gradient(
                hidden_at_targets(
                    m,
                    p,
                    batch["inputs"],
                    batch["target_index"],
                    train=False,
                    users=batch.get("users"),
                )
            )
            for m, p in zip(teacher.models, teacher_params, strict=True)
        )
        return dict(
            teacher_hidden=jnp.concatenate(hidden, axis=-1),
            teacher_logits=lambda: teacher.log_probs(teacher_params, hidden),
        )
    # The teacher is frozen: eval mode (no dropout), same inputs, no gradient.
    h_t = jax.lax.stop_gradient(
        hidden_at_targets(
            teacher,
            teacher_params,
            batch["inputs"],
            batch["target_index"],
            train=False,
            users=batch.get("users"),
        )
    )
    t_table, t_bias = jax.tree.map(jax.lax.stop_gradient, catalogue(teacher, teacher_params))
    return dict(
        teacher_hidden=h_t,
        teacher_table=t_table,
        teacher_bias=t_bias,
        teacher_logits=lambda: teacher.apply(
            {"params": teacher_params}, h_t, method=teacher.logits
        ),
    )


def catalogue(model: nn.Module, params, *, train: bool = False, rng=None):
    """The model's item table and output bias: its parameters, or ids fused with side features.

    `rng` draws the id dropout of a model with side features in training.
    """
    if getattr(model, "item_features", None) is None:
        return model.item_table(params)
    rngs = None if rng is None else {"id_dropout": rng}
    return model.apply({"params": params}, train=train, rngs=rngs, method=model.catalogue)


def make_loss_fn(
    model: nn.Module,
    task: str,
    teacher: "nn.Module | ensemble_lib.Ensemble | None",
    distill_cfg: ml_collections.ConfigDict | None,
    loss_cfg: ml_collections.ConfigDict | None = None,
    exclude_history: bool = False,
    form: str | None = None,
):
    """loss(params, teacher_params, batch, dropout_rng) -> scalar loss.

    The target is 'label' for task='train' and `config.distill.method` for
    'distill'; the form is `form`, else `config.loss.form` (`loss_cfg`; None:
    'dense'), 'auto' resolved for one device on this backend (`loss_form`;
    the train step resolves it for its mesh).
    `exclude_history` is the trained model's `config.<model>.exclude_history`.
    The pair and its options were checked by config validation
    (`config_lib`, from the table in `distill_jax.losses`).

    `teacher` is a model, an `ensemble.Ensemble` (then `teacher_params` is a
    tuple, one per teacher), or None for the 'cached' method, whose teacher
    outputs come in the batch (`cache_ids`, `cache_log_p`, `cache_rest`, and
    `cache_hidden` with hidden matching). With `config.distill.hidden_weight
    > 0`, `params[HIDDEN_PROJECTION]["kernel"]` maps the student's hidden
    states onto the teacher's.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
    target = "label" if task == "train" else distill_cfg.method
    if task == "distill" and teacher is None and target != "cached":
        raise ValueError(f"task='distill' with method {target!r} needs a teacher model.")
    if form is None:
        where = losses.auto.here()
        form = loss_form(model, task, distill_cfg, loss_cfg, exclude_history, where)
    settings = {"chunk_size": 8192 if loss_cfg is None else loss_cfg.chunk_size}
    hidden_weight = 0.0
    if task == "distill":
        settings.update(
            temperature=distill_cfg.temperature,
            alpha=distill_cfg.alpha,
            k=distill_cfg.hard_k,
            ranking_k=distill_cfg.ranking_k,
            ranking_loss=distill_cfg.ranking_loss,
            ranking_lambda=distill_cfg.ranking_lambda,
        )
        hidden_weight = float(distill_cfg.hidden_weight)

    featured = getattr(model, "item_features", None) is not None

    def loss_fn(params, teacher_params, batch, dropout_rng):
        # One table for the step: with side features, the same ids dropped on
        # the input and the output side (id dropout draws from its own key).
        table, bias = catalogue(
            model, params, train=True, rng=jax.random.fold_in(dropout_rng, 1) if featured else None
        )
        # The student trains: dropout on, gradients flow.
        h = hidden_at_targets(
            model,
            params,
            batch["inputs"],
            batch["target_index"],
            train=True,
            rngs={"dropout": dropout_rng},
            table=table if featured else None,
            users=batch.get("users"),
        )
        fields = {}
        if task == "distill":
            if teacher is not None:
                fields = _teacher_fields(teacher, teacher_params, batch)
            else:
                fields = dict(
                    cached=(batch["cache_ids"], batch["cache_log_p"], batch["cache_rest"]),
                    teacher_hidden=batch.get("cache_hidden"),
                )
            # Teacher-only slots (config.distill.last_item_slot) are in
            # `kd_where` but not in `where`: they have no label.
            fields["kd_where"] = batch.get("kd_where")
        inputs = losses.LossInputs(
            hidden=h,
            table=table,
            bias=bias,
            logits=lambda: model.apply(
                {"params": params},
                h,
                *((table, bias) if featured else ()),
                method=model.logits,
            ),
            labels=batch["targets"],
            where=batch["where"],
            num_valid_rows=model.num_items + 1,
            # exclude_history: every softmax of the loss leaves out the items the
            # slot has already seen (never its target), as evaluation does.
            seen=history_columns(batch) if exclude_history else None,
            **fields,
        )
        loss = losses.compute(target, form, inputs, settings)
        if hidden_weight > 0:
            loss = loss + hidden_weight * hidden_loss(
                h,
                params[HIDDEN_PROJECTION]["kernel"],
                inputs.teacher_hidden,
                inputs.teacher_where,
                distill_cfg.hidden_loss,
            )
        return loss

    return loss_fn


def loss_form(
    model: nn.Module,
    task: str,
    distill_cfg: ml_collections.ConfigDict | None,
    loss_cfg: ml_collections.ConfigDict | None,
    exclude_history: bool,
    where: losses.auto.Where,
) -> str:
    """The form of the stage's loss `where` it runs: `config.loss.form`, 'auto' resolved.

    A model that scores the catalogue its own way (`plain_logits` False: a
    quantization-aware copy) keeps 'auto' to the forms that call its `logits`.

    Resolved here, at the step's build, not in config_lib: the backend and the
    devices must not be touched before jax.distributed is initialised.
    """
    form = "dense" if loss_cfg is None else loss_cfg.form
    target = "label" if task == "train" else distill_cfg.method
    return losses.resolve_form(
        form,
        target,
        dataclasses.replace(where, width=int(getattr(model, "embed_dim", 0) or 0)),
        exclude_history=exclude_history,
        # (Read for 'auto' alone: a named form's options were validated.)
        teacher_only_slots=form == losses.AUTO
        and task == "distill"
        and bool(distill_cfg.last_item_slot),
        model_logits=not model.plain_logits,
    )


def make_train_step(
    model: nn.Module,
    *,
    task: str,
    mesh,
    state_shardings: Any,
    teacher: nn.Module | None = None,
    teacher_shardings: Any = None,
    distill_cfg: ml_collections.ConfigDict | None = None,
    loss_cfg: ml_collections.ConfigDict | None = None,
    exclude_history: bool = False,
    loss_fn=None,
    vocab_shards: int | None = None,
):
    """Builds `step(state, teacher_params, batch, rng) -> (state, metrics)`, jitted.

    The state is donated (updated in place); the teacher's parameters keep
    their own sharding and receive no gradient. `metrics` holds the `loss`,
    the global `grad_norm` and `finite` (a bool: both are finite). A
    non-finite step applies no update: params and optimiser state come back
    unchanged, only `state.step` counts it; the loop decides whether to stop
    (`config.train.on_nonfinite`). `teacher_params` is ignored
    (pass None) for task='train'. `loss_fn(params, teacher_params, batch,
    rng)`: another task's loss (the click task's); None builds the sequence
    models' loss from `task` and the configs, in the form `loss_form` gives
    (`config.loss.form`, 'auto' resolved for this backend and mesh; the step's
    `loss_form` attribute). `vocab_shards`: how many pieces the item table is
    split into (`sharding.vocab_shards`); None: the mesh's 'model' axis, as
    the default rules have it.
    """
    form = None
    if loss_fn is None:
        shards = mesh.shape["model"] if vocab_shards is None else vocab_shards
        where = losses.auto.here(mesh.size, shards)
        form = loss_form(model, task, distill_cfg, loss_cfg, exclude_history, where)
        loss_fn = make_loss_fn(
            model, task, teacher, distill_cfg, loss_cfg, exclude_history, form=form
        )

    def step(state, teacher_params, batch, rng):
        dropout_rng = jax.random.fold_in(rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, teacher_params, batch, dropout_rng)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        # NaN or Inf anywhere in the gradient makes its norm non-finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves params and optimiser state as they were (NaN
        # never reaches them, nor a checkpoint); the step count moves on with the
        # data. A select, not lax.cond (as optax.apply_if_finite uses): it fuses
        # into the optimiser's elementwise update, where a GPU conditional would
        # copy its predicate to the host and wait for it every step.
        new = state.apply_gradients(grads=grads)
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
        new_state = new.replace(
            params=keep(new.params, state.params),
            opt_state=keep(new.opt_state, state.opt_state),
        )
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    batch_s = sharding_lib.batch_sharding(mesh)
    rep = sharding_lib.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, teacher_shardings, batch_s, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )

    def run(state, teacher_params, batch, rng):
        with jax.set_mesh(mesh):
            return jitted(state, teacher_params, batch, rng)

    run.jitted = jitted  # For lowering/inspection (benchmarks/throughput.py --profile).
    run.loss_form = form  # The loss form it runs (None: a given loss_fn).
    return run
