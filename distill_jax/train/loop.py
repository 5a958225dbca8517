"""The one trainer: teacher training, distillation and the no-teacher baseline.

`run_steps` is the loop every task and stage shares, and the place where a
run meets faults from outside the code:
* SIGTERM (a preemption notice, SLURM): the loop writes a checkpoint at the
  next step boundary and raises `faults.Preempted` (the main job exits 75); the
  same command resumes from it to exactly the result of an uninterrupted run.
* A damaged newest checkpoint: the one before it is used (train/checkpoint.py).
* A NaN or Inf loss or gradient: the step applies no update; with
  `config.train.on_nonfinite='stop'` the loop raises `faults.NonFiniteError`
  naming the step, with 'skip' it goes on and counts the step.
* A full or read-only disk: the save raises `faults.WorkdirError`.
"""

import dataclasses
import json
import logging
import math
import os
import time
import zlib
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections

from distill_jax import faults
from distill_jax import sharding as sharding_lib
from distill_jax.data import loader
from distill_jax.data.pipeline import TrainBatches
from distill_jax.data.types import LeaveOneOut
from distill_jax.evaluation.evaluator import Evaluator, model_scorer
from distill_jax.progress import Progress
from distill_jax.train import ensemble as ensemble_lib
from distill_jax.train import preemption, teacher_init
from distill_jax.train import state as state_lib
from distill_jax.train import steps as steps_lib
from distill_jax.train.checkpoint import StageCheckpointer

log = logging.getLogger(__name__)
SELECT_METRIC = "ndcg@10"
LOG_METRICS = ("hr@10", "ndcg@10", "mrr", "coverage@10")


@dataclasses.dataclass
class Teacher:
    """A frozen teacher: its module, its (sharded) params and their shardings.

    For the 'ensemble' method `model` is an `ensemble.Ensemble` and `params`
    and `shardings` are tuples, one entry per teacher.
    """

    model: Any
    params: Any
    shardings: Any

    @property
    def hidden_dim(self) -> int:
        """Width of the hidden state hidden-state matching projects onto."""
        m = self.model
        return m.hidden_dim if isinstance(m, ensemble_lib.Ensemble) else m.embed_dim

    def tables_params(self) -> Any:
        """The params `config.distill.init_from_teacher` reads (an ensemble's first teacher)."""
        return self.params[0] if isinstance(self.model, ensemble_lib.Ensemble) else self.params


@dataclasses.dataclass
class StageResult:
    params: Any  # The best parameters by validation NDCG@10; None if not finished.
    best_step: int
    best_valid: dict
    steps_run: int
    train_seconds: float
    stopped_early: bool
    finished: bool
    # {"train": [[step, loss], ...], "valid": [[step, ndcg@10], ...]}: the report's curves.
    curves: dict | None = None
    # Steps whose loss or gradient was NaN/Inf, skipped (config.train.on_nonfinite='skip').
    skipped_steps: int = 0


class _Writer:
    """TensorBoard events on process 0 only; a no-op elsewhere.

    Each stage writes `WORKDIR/<stage>/tb/`: scalars `train/*` (loss, grad
    norm, steps/s) and `valid/*` (every ranking metric) against the step, the
    stage's config as text (`config`, once per run of the stage), and at the
    end its hyperparameters with the best validation metrics (TensorBoard's
    HPARAMS tab compares stages and runs side by side).
    """

    def __init__(self, logdir: str):
        self._w = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(logdir)

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self._w is not None:
            for k, v in values.items():
                self._w.add_scalar(f"{prefix}/{k}", float(v), step)
            self._w.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self._w is not None:
            self._w.add_text(tag, text, step)
            self._w.flush()

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self._w is not None:
            # Written into this stage's own run (name='.'), not a sub-run.
            self._w.add_hparams(hparams, metrics, name=".")
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def _hparams(name: str, mcfg: ml_collections.ConfigDict, config) -> dict:
    """The stage's hyperparameters for TensorBoard: scalars and strings only."""
    out = {"stage": name, "seed": config.seed}
    for k, v in mcfg.items():
        if isinstance(v, bool | int | float | str):
            out[f"model.{k}"] = v
    if name.startswith("student_kd"):
        for k, v in config.distill.items():
            if isinstance(v, bool | int | float | str):
                out[f"distill.{k}"] = v
    return out


def train_batches(
    model: nn.Module,
    mcfg: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    split: LeaveOneOut,
    mesh,
    distilling: bool = False,
    soft_labels: Any = None,
) -> TrainBatches:
    """The step-indexed training batches of a stage (`train_stage`'s; the arguments as there).

    Public so a benchmark can count what a stage trains on (`steps_per_epoch`,
    `slot_counts`) without running it.
    """
    return TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=mcfg.max_len,
        batch_size=mcfg.batch_size,
        causal=model.is_causal,
        mask_prob=mcfg.mask_prob,
        mask_last_prob=mcfg.mask_last_prob,
        seed=config.seed,
        length_buckets=config.data.length_buckets,
        fixed_shapes=config.data.fixed_shapes,
        num_shards=mesh.shape["data"],
        last_item_slot=distilling and config.distill.last_item_slot,
        soft_labels=soft_labels,
        users=split.user_ids(),
    )


def train_stage(
    *,
    name: str,
    model: nn.Module,
    mcfg: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    split: LeaveOneOut,
    workdir: str,
    mesh,
    teacher: Teacher | None = None,
    stop_at_step: int | None = None,
    init_params: Any = None,
    then: Any = None,
    select_from_step: int = 0,
    soft_labels: Any = None,
    teacher_tables: Any = None,
) -> StageResult:
    """Trains `model` (with `teacher`: by distillation), resuming from `workdir`.

    Args:
      name: the stage's name, for logs.
      model: the model being trained.
      mcfg: its config subtree (`config.teacher` or `config.student`).
      config: the whole config (seed, distill, eval, checkpoint, sharding).
      split: the data.
      workdir: the stage's directory (checkpoints, TensorBoard events).
      mesh: the device mesh.
      teacher: a frozen teacher, for distillation; None trains on labels only.
      stop_at_step: stop (as if pre-empted) after saving the checkpoint of this
        step; a later call resumes. For job schedulers with time limits, and tests.
      init_params: start from these (unboxed) parameters instead of a random
        (or teacher-projected) initialisation: fine-tuning a compressed model.
      then: an optax transformation chained after the optimiser (pruning).
      select_from_step: evaluations before this step are logged but never
        chosen as the best, nor counted towards early stopping (e.g. before a
        pruning schedule reaches its target sparsity).
      soft_labels: the 'cached' method: a `data.soft_labels.SoftLabels` (the
        teacher's stored outputs); the stage distils with no teacher.
      teacher_tables: the teacher's params, for `config.distill.init_from_teacher`
        when no `teacher` is given (the 'cached' method); then released.

    Returns:
      The best parameters and how the stage went.
    """
    rule_pairs = sharding_lib.rules(config)
    sharding_lib.check_batch_size(mcfg.batch_size, mesh, "batch_size of the model config")
    distilling = teacher is not None or soft_labels is not None
    batches = train_batches(model, mcfg, config, split, mesh, distilling, soft_labels)
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(jax.random.fold_in(rng, zlib.crc32(name.encode())))
    extra = None
    if distilling and config.distill.hidden_weight > 0:
        d_t = teacher.hidden_dim if teacher is not None else soft_labels.hidden_dim
        shape = (model.embed_dim, d_t)
        extra = {
            steps_lib.HIDDEN_PROJECTION: lambda r: {
                "kernel": jax.nn.initializers.lecun_normal()(r, shape, jnp.float32)
            }
        }
    state, shardings = state_lib.create_state(
        model, mcfg, mesh, rule_pairs, init_rng, then, extra_params=extra
    )
    # The model's own params (the state's without a hidden-matching projection).
    model_shardings = steps_lib.model_params(shardings.params)
    if init_params is not None:
        if extra:  # a fresh projection beside the given model params
            init_params = {**init_params, **{k: state.params[k] for k in extra}}
        # A copy: the state's buffers are donated to the train step, and the
        # caller's params (a compress source) are used again after this stage.
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(
            jax.device_put(init_params, shardings.params)
        )
        state = state.replace(
            params=params,
            opt_state=jax.jit(state.tx.init, out_shardings=shardings.opt_state)(params),
        )
    elif distilling and config.distill.init_from_teacher != "none":
        tables = teacher.tables_params() if teacher is not None else teacher_tables
        if tables is None:
            raise ValueError(
                f"config.distill.init_from_teacher={config.distill.init_from_teacher!r} needs "
                "the teacher's params (teacher_tables) for this stage."
            )
        state = state.replace(
            params=teacher_init.initial_params(
                config.distill.init_from_teacher,
                state.params,
                tables,
                shardings.params,
                mesh,
                num_items=model.num_items,
            )
        )
        del tables, teacher_tables
        log.info(
            "[%s] tables initialised from the teacher (%s)", name, config.distill.init_from_teacher
        )
    step_fn = steps_lib.make_train_step(
        model,
        task="distill" if distilling else "train",
        mesh=mesh,
        state_shardings=shardings,
        teacher=teacher.model if teacher else None,
        teacher_shardings=teacher.shardings if teacher else None,
        distill_cfg=config.distill,
        loss_cfg=config.loss,
        exclude_history=mcfg.exclude_history,
        vocab_shards=sharding_lib.vocab_shards(config, mesh),
    )
    evaluator = Evaluator(split, config, mesh)
    # One scorer for the whole stage, so validation compiles once.
    scorer = model_scorer(model, None, shardings.params)

    def validate(params) -> dict:
        scorer.params = params
        return evaluator.evaluate(scorer, "valid")

    return run_steps(
        name=name,
        mcfg=mcfg,
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=state,
        shardings=shardings,
        model_shardings=model_shardings,
        step_fn=step_fn,
        batches=batches,
        step_rng=step_rng,
        teacher_params=teacher.params if teacher else None,
        validate=validate,
        select_metric=SELECT_METRIC,
        log_metrics=LOG_METRICS,
        stop_at_step=stop_at_step,
        select_from_step=select_from_step,
    )


def run_steps(
    *,
    name: str,
    mcfg: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh,
    state,
    shardings,
    model_shardings,
    step_fn,
    batches,
    step_rng,
    teacher_params,
    validate,
    select_metric: str,
    log_metrics: tuple[str, ...],
    stop_at_step: int | None = None,
    select_from_step: int = 0,
) -> StageResult:
    """The training loop every task shares: steps, validation, the best params, checkpoints.

    `batches` is step-indexed (`batch(step)`; a `TrainBatches` or a click
    task's batches), `step_fn(state, teacher_params, batch, rng)` the jitted
    step, `validate(params) -> metrics` scores the validation split; the
    stage keeps the parameters with the best `select_metric` (higher is
    better), stops early after `config.eval.patience` evaluations without a
    gain, and resumes from its latest checkpoint in `workdir`.

    Raises:
      faults.Preempted: a SIGTERM came; the step it stopped at is checkpointed.
      faults.NonFiniteError: a step's loss or gradient was NaN/Inf and
        `config.train.on_nonfinite` is 'stop'; the last checkpoint stays as it was.
      faults.CheckpointDamagedError: the stage has checkpoints and none can be read.
      faults.WorkdirError: a checkpoint could not be written (no space, no permission).
    """
    ckpt = StageCheckpointer(workdir)
    meta = {
        "best_metric": -1.0,
        "best_step": -1,
        "best_valid": {},
        "bad_evals": 0,
        "train_seconds": 0.0,
        "finished": False,
        "stopped_early": False,
        "skipped_steps": 0,
        "curves": {"train": [], "valid": []},
    }
    # A grain iterator over the step-indexed batches: batches are prepared on
    # a background thread while the step runs; its position is checkpointed.
    # Each process keeps only its own rows (and their packed target slots):
    # grain shards every global batch by jax process, and the local arrays
    # become global ones without another copy of the rest.
    data_iter = iter(
        loader.iter_dataset(
            batches, mcfg.num_steps, shard_options=grain.sharding.ShardByJaxProcess()
        )
    )
    # The best parameters so far live beside the state (a copy: the state's
    # buffers are donated to the next step) and go into every checkpoint.
    copy_params = jax.jit(
        lambda p: jax.tree.map(jnp.copy, steps_lib.model_params(p)), out_shardings=model_shardings
    )
    best_params = copy_params(state.params)
    if ckpt.latest_step() is not None:
        state, best_params, meta = ckpt.restore(
            state, shardings, data_iter, best_params, model_shardings
        )
        log.info("[%s] resumed from step %d in %s", name, int(state.step), workdir)
    # Checkpoints of older runs lack these.
    meta.setdefault("curves", {"train": [], "valid": []})
    meta.setdefault("skipped_steps", 0)
    writer = _Writer(os.path.join(workdir, "tb"))
    writer.text("config", _config_text(name, mcfg, config), step=int(state.step))
    num_steps = mcfg.num_steps
    step = int(state.step)
    t_start = time.time()
    seconds_before = meta["train_seconds"]
    log.info(
        "[%s] %d training %s, %d steps/epoch, %d steps",
        name,
        batches.num_windows,
        getattr(batches, "unit", "windows"),
        batches.steps_per_epoch,
        num_steps,
    )
    bar = Progress(f"[{name}]", num_steps, initial=step, logger=log)
    # (step, metrics) of the steps whose finiteness flag is still on the device.
    # They are read together at the next log line, validation or save (one
    # transfer), not after every step, so that the host never waits for a step
    # before queueing the next one. A non-finite step has already left the
    # params untouched (steps.make_train_step), so reading late risks nothing:
    # every save reads first, and NaN never reaches a checkpoint.
    unread: list[tuple[int, dict]] = []

    def read_metrics() -> dict[str, float]:
        """Fetches the unread steps' metrics, acts on the non-finite ones; the newest's values."""
        got = jax.device_get([m for _, m in unread])
        at = [s for s, _ in unread]
        unread.clear()
        for s, m in zip(at, got, strict=True):
            if not bool(m["finite"]):
                _nonfinite(name, s, m, config.train.on_nonfinite, meta, ckpt)
        return {k: float(v) for k, v in got[-1].items() if k != "finite"} if got else {}

    def save(step):
        read_metrics()
        meta["train_seconds"] = seconds_before + time.time() - t_start
        meta["config"] = json.loads(config.to_json_best_effort())
        ckpt.save(step, state, best_params, meta, data_iter)

    # SIGTERM: checkpoint at the next step boundary, then faults.Preempted (exit 75). The
    # handler is the run's (pipeline.run installs it), or this loop's own when called alone.
    term = preemption.loop_started()
    try:
        while step < num_steps and not meta["finished"]:
            batch = sharding_lib.put_local_batch(next(data_iter), mesh)
            state, metrics = step_fn(state, teacher_params, batch, step_rng)
            faults.kill_point("train_step")
            step += 1
            unread.append((step, metrics))
            if step % config.log_every_steps == 0 or step == num_steps:
                m = read_metrics()
                bar.update(loss=m["loss"])
                rate, eta = bar.rate()
                if not bar.is_bar:
                    log.info(
                        "[%s] step %d/%d loss %.4f grad_norm %.3f | %.1f steps/s, ETA %.0fs",
                        name,
                        step,
                        num_steps,
                        m["loss"],
                        m["grad_norm"],
                        rate,
                        eta,
                    )
                m.update(steps_per_second=rate, skipped_steps=meta["skipped_steps"])
                writer.scalars(step, m, "train")
                if math.isfinite(m["loss"]):  # a skipped step's NaN stays out of the curve
                    meta["curves"]["train"].append([step, m["loss"]])
            else:
                bar.update()
            if step % config.eval.every_steps == 0 or step == num_steps:
                read_metrics()  # a 'stop' on a NaN step comes before the evaluation
                valid = validate(state.params)
                writer.scalars(step, valid, "valid")
                meta["curves"]["valid"].append([step, valid[select_metric]])
                selectable = step >= select_from_step
                improved = selectable and valid[select_metric] > meta["best_metric"]
                if improved:
                    meta.update(
                        best_metric=valid[select_metric],
                        best_step=step,
                        best_valid=valid,
                        bad_evals=0,
                    )
                    best_params = copy_params(state.params)
                elif selectable:
                    meta["bad_evals"] += 1
                bar.note(
                    "[%s] step %d valid %s%s",
                    name,
                    step,
                    " ".join(f"{k}={valid[k]:.4f}" for k in log_metrics if k in valid),
                    " (best)" if improved else "",
                )
                patience = config.eval.patience
                if patience and meta["bad_evals"] >= patience and step < num_steps:
                    bar.note(
                        "[%s] early stop at step %d: no improvement in %d evaluations",
                        name,
                        step,
                        patience,
                    )
                    meta["finished"] = meta["stopped_early"] = True
            if step == num_steps:
                meta["finished"] = True
            saved = meta["finished"] or step % config.checkpoint.every_steps == 0
            if saved:
                save(step)
            if term.requested(step):
                if not saved:
                    save(step)
                raise faults.Preempted(_preempted(name, step, num_steps, ckpt))
            if stop_at_step is not None and step >= stop_at_step and not meta["finished"]:
                if not saved:
                    save(step)
                bar.note("[%s] stopping at step %d as asked; re-run to resume", name, step)
                break
        if meta["finished"]:
            best = {f"best_valid/{k}": float(v) for k, v in meta["best_valid"].items()}
            writer.hparams(_hparams(name, mcfg, config), {**best, "best_step": meta["best_step"]})
        if term.signalled:  # after the last step's check; that step's checkpoint is written
            raise faults.Preempted(_preempted(name, step, num_steps, ckpt))
    finally:
        preemption.loop_ended(term)
        bar.close()
        writer.close()
        ckpt.close()
    return StageResult(
        params=best_params if meta["finished"] else None,
        finished=bool(meta["finished"]),
        best_step=meta["best_step"],
        best_valid=meta["best_valid"],
        steps_run=step,
        train_seconds=float(meta["train_seconds"]),
        stopped_early=bool(meta["stopped_early"]),
        curves=meta["curves"],
        skipped_steps=int(meta["skipped_steps"]),
    )


def _nonfinite(name: str, step: int, m: dict, policy: str, meta: dict, ckpt) -> None:
    """A step whose loss or gradient was NaN/Inf (its update was not applied): stop or count it."""
    what = f"[{name}] step {step}: loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}"
    if policy == "stop":
        last = ckpt.latest_step()
        kept = (
            f"the last good checkpoint, step {last} in {ckpt.path}, is kept and a re-run resumes "
            "from it (and meets this step again: training is deterministic)"
            if last is not None
            else "no checkpoint was written before it, so a re-run starts the stage over"
        )
        raise faults.NonFiniteError(
            f"{what} is not finite, so its update was not applied and the run stopped "
            f"(config.train.on_nonfinite='stop'); {kept}. Lower the learning rate, check the "
            "data, or set config.train.on_nonfinite='skip' to skip such steps."
        )
    meta["skipped_steps"] += 1
    log.warning(
        "%s is not finite: update skipped (config.train.on_nonfinite='skip'; %d skipped so far)",
        what,
        meta["skipped_steps"],
    )


def _preempted(name: str, step: int, num_steps: int, ckpt) -> str:
    return (
        f"[{name}] stopped at step {step}/{num_steps} on a termination signal (SIGTERM) after "
        f"writing its checkpoint in {ckpt.path}; re-run the same command to resume."
    )


def _config_text(name: str, mcfg: ml_collections.ConfigDict, config) -> str:
    """The stage's model config and the whole config, as Markdown for TensorBoard's TEXT tab."""
    return (
        f"**{name}**: model config\n\n```\n{mcfg.to_json_best_effort(indent=2)}\n```\n\n"
        f"whole config\n\n```\n{config.to_json_best_effort(indent=2)}\n```"
    )
