"""Jitted train steps: one builder for teacher training, distillation and baselines."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from distill_jax import catalogue_losses, losses, vocab_parallel
from distill_jax import sharding as sharding_lib

TASKS = ("train", "distill")
# How the catalogue loss is computed (config.loss.impl):
#   'plain': full [N, V+1] logits, then losses.py (one device, or XLA's own
#     partitioning of vocab-sharded logits);
#   'vocab_parallel': logits stay sharded along 'model'; max, logsumexp and KL
#     terms are reduced across shards with shard_map (never gathered);
#   'chunked': logits never exist for the whole catalogue; a scan over item
#     chunks with an online logsumexp (memory grows with the chunk, not V);
#   'cpu_kernel': distillation from hidden states: XLA's catalogue products,
#     and between them (softmaxes, KL, the logits' gradient and its column
#     sums) the fused C++ kernel of distill_jax/kernels (CPU only);
#     cross-entropy training (task 'train') is the same as 'plain'.
LOSS_IMPLS = ("plain", "vocab_parallel", "chunked", "cpu_kernel")


def hidden_at_targets(
    model: nn.Module, params, inputs, target_index, *, train: bool, rngs=None
) -> jax.Array:
    """Hidden states `[N, D]` at the packed target slots only.

    Catalogue logits cost `V` per position, so they are computed only where a
    target sits (`target_index` indexes the flattened `B x S` positions), not
    at every padded window position. The result is 2-D so that the catalogue
    product is one plain matrix product (a batched 3-D einsum runs about half
    as fast on CPU).
    """
    hidden = model.apply({"params": params}, inputs, train=train, rngs=rngs)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return jnp.take(flat, target_index, axis=0)


def logits_at_targets(model: nn.Module, params, batch, *, train: bool, rngs=None):
    """Catalogue logits `[N, V + 1]` at the batch's packed target slots."""
    h = hidden_at_targets(
        model, params, batch["inputs"], batch["target_index"], train=train, rngs=rngs
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


def exclude_columns(logits: jax.Array, columns: jax.Array) -> jax.Array:
    """`logits [N, V+1]` with `columns [N, K]` of each row set to -inf."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, columns].set(-jnp.inf)


def _table(params):
    return params["item_embedding"], params["output_bias"]


def make_loss_fn(
    model: nn.Module,
    task: str,
    teacher: nn.Module | None,
    distill_cfg: ml_collections.ConfigDict | None,
    loss_cfg: ml_collections.ConfigDict | None = None,
    exclude_history: bool = False,
):
    """loss(params, teacher_params, batch, dropout_rng) -> scalar loss.

    `loss_cfg` is `config.loss` (`impl` in LOSS_IMPLS, `chunk_size`); None
    means 'plain'. `exclude_history` is the trained model's
    `config.<model>.exclude_history` ('plain' loss, causal models only).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
    if task == "distill" and teacher is None:
        raise ValueError("task='distill' needs a teacher model.")
    impl = "plain" if loss_cfg is None else loss_cfg.impl
    if impl not in LOSS_IMPLS:
        raise ValueError(f"config.loss.impl={impl!r} is invalid; expected one of {LOSS_IMPLS}.")
    if exclude_history and impl != "plain":
        raise ValueError(
            "exclude_history=True (config.<model>.exclude_history) needs "
            f"config.loss.impl='plain', got {impl!r}."
        )
    if exclude_history and not model.is_causal:
        raise ValueError(
            "exclude_history=True (config.<model>.exclude_history) needs a causal "
            f"(next-item) model; {type(model).__name__} is bidirectional."
        )

    if impl != "plain" and task == "distill" and distill_cfg.mode != "soft":
        raise ValueError(
            f"config.loss.impl={impl!r} supports config.distill.mode='soft' only, "
            f"got {distill_cfg.mode!r}; use config.loss.impl='plain'."
        )
    if (
        impl not in ("plain", "cpu_kernel")
        and task == "distill"
        and distill_cfg.get("last_item_slot", False)
    ):
        raise ValueError(
            f"config.loss.impl={impl!r} does not support config.distill.last_item_slot=True "
            "(teacher-only slots); use config.loss.impl='plain'."
        )
    if impl == "cpu_kernel" and task == "distill" and jax.default_backend() != "cpu":
        # Checked here, not in config_lib: the backend must not be touched
        # before jax.distributed is initialised.
        raise ValueError(
            f"config.loss.impl='cpu_kernel' runs on the CPU backend only, not "
            f"{jax.default_backend()!r}; use config.loss.impl='plain'."
        )
    if impl == "cpu_kernel" and task == "distill" and distill_cfg.mode == "soft":
        return _kernel_loss_fn(model, teacher, distill_cfg)
    if impl == "chunked":
        return _chunked_loss_fn(model, task, teacher, distill_cfg, loss_cfg.chunk_size)
    if impl == "vocab_parallel":
        return _vocab_parallel_loss_fn(model, task, teacher, distill_cfg)

    def loss_fn(params, teacher_params, batch, dropout_rng):
        logits = logits_at_targets(model, params, batch, train=True, rngs={"dropout": dropout_rng})
        where = batch["where"]
        # exclude_history: every softmax of the loss leaves out the items the
        # slot has already seen (never its target), as evaluation does.
        seen = history_columns(batch) if exclude_history else None
        if seen is not None:
            logits = exclude_columns(logits, seen)
        if task == "train":
            return losses.cross_entropy(logits, batch["targets"], where=where)
        # The teacher is frozen: eval mode (no dropout), same inputs, no gradient.
        t_logits = jax.lax.stop_gradient(
            logits_at_targets(teacher, teacher_params, batch, train=False)
        )
        if seen is not None:
            t_logits = exclude_columns(t_logits, seen)
        # Teacher-only slots (config.distill.last_item_slot) are in
        # `kd_where` but not in `where`: they have no label.
        kd_where = batch.get("kd_where", where)
        if distill_cfg.mode == "hard":
            return losses.hard_label_distill(logits, t_logits, k=distill_cfg.hard_k, where=kd_where)
        return losses.distill_loss(
            logits,
            t_logits,
            batch["targets"],
            temperature=distill_cfg.temperature,
            alpha=distill_cfg.alpha,
            where=kd_where,
            label_where=where if "kd_where" in batch else None,
        )

    return loss_fn


def _student_hidden(model, params, batch, dropout_rng):
    # The student trains: dropout on, gradients flow.
    return hidden_at_targets(
        model,
        params,
        batch["inputs"],
        batch["target_index"],
        train=True,
        rngs={"dropout": dropout_rng},
    )


def _teacher_hidden(teacher, teacher_params, batch):
    # The teacher is frozen: eval mode (no dropout), same inputs, no gradient.
    return jax.lax.stop_gradient(
        hidden_at_targets(
            teacher, teacher_params, batch["inputs"], batch["target_index"], train=False
        )
    )


def _kernel_loss_fn(model, teacher, distill_cfg):
    def loss_fn(params, teacher_params, batch, dropout_rng):
        h = _student_hidden(model, params, batch, dropout_rng)
        t_table, t_bias = jax.tree.map(jax.lax.stop_gradient, _table(teacher_params))
        # Teacher-only slots (config.distill.last_item_slot) are in
        # `kd_where` but not in `where`: they have no label.
        where = batch["where"]
        return catalogue_losses.kernel_distill_loss(
            h,
            *_table(params),
            _teacher_hidden(teacher, teacher_params, batch),
            t_table,
            t_bias,
            batch["targets"],
            batch.get("kd_where", where),
            where if "kd_where" in batch else None,
            temperature=distill_cfg.temperature,
            alpha=distill_cfg.alpha,
        )

    return loss_fn


def _chunked_loss_fn(model, task, teacher, distill_cfg, chunk_size):
    def loss_fn(params, teacher_params, batch, dropout_rng):
        h = _student_hidden(model, params, batch, dropout_rng)
        table, bias = _table(params)
        if task == "train":
            return catalogue_losses.chunked_cross_entropy(
                h, table, bias, batch["targets"], batch["where"], chunk_size=chunk_size
            )
        t_table, t_bias = jax.tree.map(jax.lax.stop_gradient, _table(teacher_params))
        return catalogue_losses.chunked_distill_loss(
            h,
            table,
            bias,
            _teacher_hidden(teacher, teacher_params, batch),
            t_table,
            t_bias,
            batch["targets"],
            batch["where"],
            temperature=distill_cfg.temperature,
            alpha=distill_cfg.alpha,
            chunk_size=chunk_size,
        )

    return loss_fn


def _vocab_parallel_loss_fn(model, task, teacher, distill_cfg):
    def loss_fn(params, teacher_params, batch, dropout_rng):
        h = _student_hidden(model, params, batch, dropout_rng)
        logits = vocab_parallel.vocab_parallel_logits(h, *_table(params))
        if task == "train":
            return vocab_parallel.vocab_parallel_cross_entropy(
                logits, batch["targets"], where=batch["where"]
            )
        t_logits = jax.lax.stop_gradient(
            vocab_parallel.vocab_parallel_logits(
                _teacher_hidden(teacher, teacher_params, batch), *_table(teacher_params)
            )
        )
        return vocab_parallel.vocab_parallel_distill_loss(
            logits,
            t_logits,
            batch["targets"],
            temperature=distill_cfg.temperature,
            alpha=distill_cfg.alpha,
            where=batch["where"],
        )

    return loss_fn


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
):
    """Builds `step(state, teacher_params, batch, rng) -> (state, metrics)`, jitted.

    The state is donated (updated in place); the teacher's parameters keep
    their own sharding and receive no gradient. `teacher_params` is ignored
    (pass None) for task='train'.
    """
    if loss_cfg is not None and loss_cfg.impl == "cpu_kernel" and task == "distill":
        if mesh.size != 1:
            # The kernel is one custom call over whole arrays: on a sharded
            # batch XLA would gather every operand to every device.
            raise ValueError(
                f"config.loss.impl='cpu_kernel' runs on one device, but the mesh has "
                f"{dict(mesh.shape)}; set config.mesh.data=config.mesh.model=1 or use "
                "config.loss.impl='plain'."
            )
    loss_fn = make_loss_fn(model, task, teacher, distill_cfg, loss_cfg, exclude_history)

    def step(state, teacher_params, batch, rng):
        dropout_rng = jax.random.fold_in(rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, teacher_params, batch, dropout_rng)
        new_state = state.apply_gradients(grads=grads)
        metrics = {
            "loss": loss,
            "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
        }
        return new_state, metrics

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
    return run
