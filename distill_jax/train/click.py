"""The click task on the one trainer: a click teacher distilled into a small click model.

`config.task = 'click'` runs these stages (`config.stages`, comma-separated,
in order) in the work directory, each resumable like the sequence stages:

* `logistic`: the baseline, a logistic model over the feature embeddings
  (`config.click.student` with no cross layer and no hidden layer);
* `teacher`: `config.click.teacher` (a DCN-v2 by default) on the labels;
* `student_kd`: `config.click.student` distilled from the teacher's logits
  with `losses.binary_distill` (`config.distill.temperature`, `alpha`); with
  `config.click.calibrate_teacher` the teacher's logits are Platt-scaled on
  the validation rows first, so the soft labels are calibrated probabilities;
* `student_scratch`: the same student on the labels alone;
* `report`: `report.json` and `report.md`, AUC, log loss and calibration per
  model on the test split and its cold slices, and the reliability diagrams.

Training runs through `loop.run_steps` (the loop of the sequence stages:
checkpoints, validation, the best parameters, early stopping); only the
batches, the loss and the validation differ. Validation picks the
parameters with the best AUC on the validation split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from distill_jax import losses
from distill_jax import sharding as sharding_lib
from distill_jax import workdir as workdir_lib
from distill_jax.data import builders
from distill_jax.data import clicks as clicks_lib
from distill_jax.data import dataset as dataset_lib
from distill_jax.evaluation import click_metrics, plots
from distill_jax.models.click import ClickModel
from distill_jax.train import loop, preemption
from distill_jax.train import state as state_lib
from distill_jax.train import steps as steps_lib

log = logging.getLogger(__name__)

STAGES = ("logistic", "teacher", "student_kd", "student_scratch", "report")
SELECT_METRIC = "auc"
LOG_METRICS = ("auc", "logloss", "ece")
EVAL_SLICES = ("test", "cold_users", "cold_items")


class ClickBatches:
    """Training batches of click rows, a pure function of (seed, step).

    Each epoch visits the rows in a seeded permutation; the last batch of an
    epoch is padded with rows whose `where` is False.
    """

    unit = "rows"

    def __init__(
        self, split: clicks_lib.ClickSplit, batch_size: int, seed: int, num_shards: int = 1
    ):
        if len(split) == 0:
            raise ValueError("No training rows: the click training split is empty.")
        if batch_size % num_shards:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of num_shards={num_shards} "
                "(the mesh's data axis)."
            )
        self.split, self.batch_size, self.seed, self.num_shards = (
            split,
            batch_size,
            seed,
            num_shards,
        )
        self.num_windows = len(split)
        self.steps_per_epoch = -(-len(split) // batch_size)
        self._epoch, self._order = -1, None

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return rows_batch(self.split, rows, self.batch_size)

    def source_repr(self) -> str:
        return (
            f"ClickBatches(rows={self.num_windows}, batch_size={self.batch_size}, "
            f"seed={self.seed}, num_shards={self.num_shards})"
        )


def rows_batch(split: clicks_lib.ClickSplit, rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The rows as a batch of `size` (padding rows: zeros, `where` False)."""
    n = len(rows)
    out = {
        "categorical": np.zeros((size, split.categorical.shape[1]), np.int32),
        "numeric": np.zeros((size, split.numeric.shape[1]), np.float32),
        "history": np.zeros((size, split.history.shape[1]), np.int32),
        "labels": np.zeros(size, np.float32),
        "where": np.zeros(size, bool),
    }
    out["categorical"][:n] = split.categorical[rows]
    out["history"][:n] = split.history[rows]
    out["numeric"][:n] = split.numeric[rows]
    out["labels"][:n] = split.labels[rows]
    out["where"][:n] = True
    return out


def build_model(
    mcfg: ml_collections.ConfigDict, data: clicks_lib.ClickData, vocab_shards: int = 1
) -> ClickModel:
    """The click model of a `config.click.teacher`/`student` subtree for `data`'s columns.

    `vocab_shards` > 1 pads the shared field table to a multiple of it, so any
    vocabulary size shards along the mesh's `model` axis.
    """
    rows = sum(data.vocab_sizes) + len(data.vocab_sizes)
    return ClickModel(
        table_rows=0 if vocab_shards <= 1 else -(-rows // vocab_shards) * vocab_shards,
        vocab_sizes=tuple(data.vocab_sizes),
        num_numeric=len(data.numeric_names),
        embed_dim=mcfg.embed_dim,
        num_cross=mcfg.num_cross,
        cross_rank=mcfg.cross_rank,
        mlp_dims=parse_dims(mcfg.mlp_dims),
        dropout_rate=float(mcfg.dropout),
        history_field=data.history_field,
    )


def parse_dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in str(text).replace(" ", "").split(",") if d)


def make_loss_fn(
    model: ClickModel,
    teacher: ClickModel | None,
    distill_cfg,
    calibration: tuple[float, float] = (1.0, 0.0),
) -> Any:
    """loss(params, teacher_params, batch, rng): BCE, or binary distillation from the teacher.

    `calibration` (a, b) maps the teacher's logit t to ``a * t + b`` before it
    becomes a soft label (`platt_scaling`); (1, 0) leaves it as it is.
    """
    scale, shift = calibration

    def loss_fn(params, teacher_params, batch, rng):
        logits = model.apply(
            {"params": params},
            *inputs(batch),
            train=True,
            rngs={"dropout": rng},
        )
        if teacher is None:
            per_row = optax.sigmoid_binary_cross_entropy(logits, batch["labels"])
            return losses.masked_mean(per_row, batch["where"])
        t_logits = teacher.apply({"params": teacher_params}, *inputs(batch), train=False)
        return losses.binary_distill(
            logits,
            jax.lax.stop_gradient(scale * t_logits + shift),
            batch["labels"],
            temperature=distill_cfg.temperature,
            alpha=distill_cfg.alpha,
            where=batch["where"],
        )

    return loss_fn


def inputs(batch: dict) -> tuple:
    """A click model's inputs from a batch: (categorical, numeric, history)."""
    return batch["categorical"], batch["numeric"], batch["history"]


def predict(model: ClickModel, params, split: clicks_lib.ClickSplit, batch_size: int, mesh):
    """Click probabilities `[R]` of every row of `split`."""
    fn = jax.jit(lambda p, b: jax.nn.sigmoid(model.apply({"params": p}, *inputs(b), train=False)))
    out = []
    with jax.set_mesh(mesh):
        for start in range(0, len(split), batch_size):
            rows = np.arange(start, min(start + batch_size, len(split)))
            b = sharding_lib.put_batch(rows_batch(split, rows, batch_size), mesh)
            b = {k: b[k] for k in ("categorical", "numeric", "history")}
            out.append(np.asarray(jax.device_get(fn(params, b)))[: len(rows)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def platt_scaling(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(a, b) of Platt scaling: ``sigmoid(a * logit + b)`` fit to `labels` by log loss.

    A logistic regression (scikit-learn, unregularised) on the one feature
    logit(p); used on the validation rows to calibrate a teacher before its
    probabilities become a student's soft labels.
    """
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("Platt scaling needs clicks and non-clicks in the validation rows")
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    logit = np.log(p) - np.log1p(-p)
    fit = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000).fit(logit[:, None], labels)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def evaluate(model, params, data: clicks_lib.ClickData, name: str, batch_size: int, mesh) -> dict:
    split = data.slice(name)
    return click_metrics.click_metrics(
        predict(model, params, split, batch_size, mesh), split.labels
    )


def _model_cfg(config, stage: str) -> ml_collections.ConfigDict:
    c = config.click
    if stage == "teacher":
        return c.teacher
    mcfg = c.student.copy_and_resolve_references()
    if stage == "logistic":
        mcfg.update(num_cross=0, mlp_dims="")
        if c.logistic_learning_rate > 0:
            mcfg.learning_rate = c.logistic_learning_rate
        if c.logistic_weight_decay >= 0:
            mcfg.weight_decay = c.logistic_weight_decay
    if stage == "student_scratch" and c.scratch_learning_rate > 0:
        mcfg.learning_rate = c.scratch_learning_rate
    return mcfg


def run_stage(
    config, data: clicks_lib.ClickData, mesh, workdir: str, stage: str, stop_at_step=None
):
    """Trains (or reads back) one click stage; its result, or None when stopped early."""
    stage_dir = workdir_lib.stage_dir(workdir, stage)
    result_path = os.path.join(stage_dir, "result.json")
    if os.path.exists(result_path):
        log.info("[%s] finished earlier; skipping (%s)", stage, result_path)
        return workdir_lib.read_json(result_path)
    mcfg = _model_cfg(config, stage)
    shards = sharding_lib.vocab_shards(config, mesh)
    model = build_model(mcfg, data, shards)
    teacher = teacher_params = teacher_shardings = None
    calibration = (1.0, 0.0)
    if stage == "student_kd":
        if not workdir_lib.finished(workdir, "teacher"):
            raise ValueError(
                f"stage 'student_kd' distils from the 'teacher' stage, which has not finished in "
                f"{workdir}; put 'teacher' before it in config.stages."
            )
        teacher = build_model(config.click.teacher, data, shards)
        teacher_params, teacher_shardings = workdir_lib.load_best_params(
            teacher, config, mesh, workdir_lib.stage_dir(workdir, "teacher")
        )
        if config.click.calibrate_teacher:
            valid = data.splits["valid"]
            calibration = platt_scaling(
                predict(teacher, teacher_params, valid, config.eval.batch_size, mesh), valid.labels
            )
            log.info(
                "[%s] the teacher's logits calibrated on the validation rows: %.4f * t + %.4f",
                stage,
                *calibration,
            )
    sharding_lib.check_batch_size(mcfg.batch_size, mesh, f"click.{stage}.batch_size")
    rng = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(stage.encode()))
    init_rng, step_rng = jax.random.split(rng)
    state, shardings = state_lib.create_state(
        model, mcfg, mesh, sharding_lib.rules(config), init_rng
    )
    step_fn = steps_lib.make_train_step(
        model,
        task="distill" if teacher is not None else "train",
        mesh=mesh,
        state_shardings=shardings,
        teacher_shardings=teacher_shardings,
        loss_fn=make_loss_fn(model, teacher, config.distill, calibration),
    )
    batches = ClickBatches(
        data.splits["train"], mcfg.batch_size, config.seed, num_shards=mesh.shape["data"]
    )
    eval_batch = config.eval.batch_size
    res = loop.run_steps(
        name=stage,
        mcfg=mcfg,
        config=config,
        workdir=stage_dir,
        mesh=mesh,
        state=state,
        shardings=shardings,
        model_shardings=shardings.params,
        step_fn=step_fn,
        batches=batches,
        step_rng=step_rng,
        teacher_params=teacher_params,
        validate=lambda p: _scalars(evaluate(model, p, data, "valid", eval_batch, mesh)),
        select_metric=SELECT_METRIC,
        log_metrics=LOG_METRICS,
        stop_at_step=stop_at_step,
    )
    if not res.finished:
        return None
    metrics = {"valid": res.best_valid}
    for name in EVAL_SLICES:
        metrics[name] = evaluate(model, res.params, data, name, eval_batch, mesh)
    t = metrics["test"]
    log.info(
        "[%s] test auc=%s logloss=%.4f ece=%.4f", stage, _fmt(t["auc"]), t["logloss"], t["ece"]
    )
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(res.params))
    if model.table_rows:  # padding rows of a sharded table are never looked up
        params -= (model.table_rows - sum(model.vocab_sizes) - len(model.vocab_sizes)) * (
            model.embed_dim
        )
    result = {
        "model": model_name(mcfg),
        "params": int(params),
        "metrics": metrics,
        "best_step": res.best_step,
        "train_seconds": res.train_seconds,
        "curves": res.curves,
    }
    if teacher is not None:
        result["teacher_calibration"] = list(calibration)
    workdir_lib.write_json(result_path, result)
    return result


def model_name(mcfg) -> str:
    if mcfg.num_cross:
        return f"dcn-v2 ({mcfg.num_cross} cross)"
    return "mlp" if parse_dims(mcfg.mlp_dims) else "logistic"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _scalars(m: dict) -> dict:
    """The validation metrics as scalars (an undefined AUC counts as 0.5, chance)."""
    out = {k: v for k, v in m.items() if isinstance(v, int | float)}
    out["auc"] = 0.5 if m.get("auc") is None else m["auc"]
    return out


def load(config: ml_collections.ConfigDict, workdir: str) -> clicks_lib.ClickData:
    """The click rows of `config.data` as `config.click` says, built once as a TFDS data set.

    The data set (`WORKDIR/data/click_rows/...`, or under `data.cache_dir`) is
    keyed by a fingerprint of the source files, the reading options, the
    click settings and the seed (which samples the non-clicks); every run
    reads the rows back from it, fresh or not.
    """
    cfg, c = config.data, config.click
    path, files, options = dataset_lib.source_files(cfg)
    settings = {
        f"click.{k}": v for k, v in c.items() if not isinstance(v, ml_collections.ConfigDict)
    }
    fp = builders.fingerprint(
        files, cache_format=clicks_lib.FORMAT, seed=config.seed, **options, **settings
    )
    name = f"{cfg.source}_{path.stem or path.name}".replace("-", "_").lower()
    data_dir = cfg.cache_dir or os.path.join(workdir, "data")
    data = clicks_lib.read(name, data_dir, fp)
    if data is None:
        if jax.process_index() == 0:
            clicks_lib.write(_build(config, path), name, data_dir, fp)
        dataset_lib.sync("distill_jax_click_rows_built")
        data = clicks_lib.read(name, data_dir, fp)
    else:
        log.info("click data: %s is current; the raw files are not read", name)
    return data


def _build(config: ml_collections.ConfigDict, path) -> clicks_lib.ClickData:
    c = config.click
    if config.data.source == "click_table":
        return clicks_lib.from_table(
            str(path),
            label_col=c.label_col,
            time_col=c.time_col,
            user_col=c.user_col,
            item_col=c.item_col,
            categorical={s.strip() for s in c.categorical.split(",") if s.strip()},
            delimiter=config.data.delimiter,
            train_fraction=c.train_fraction,
            valid_fraction=c.valid_fraction,
            history=c.history,
        )
    raw = dataset_lib.raw_interactions(config.data, path)
    return clicks_lib.build(
        raw,
        click_threshold=c.click_threshold if c.click_threshold > 0 else None,
        negatives=c.negatives,
        train_fraction=c.train_fraction,
        valid_fraction=c.valid_fraction,
        categorical={s.strip() for s in c.categorical.split(",") if s.strip()},
        drop_features={s.strip() for s in c.drop_features.split(",") if s.strip()},
        history=c.history,
        seed=config.seed,
    )


def stages(config) -> list[str]:
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    for s in names:
        if s not in STAGES:
            raise ValueError(
                f"config.stages has {s!r}, not a stage of config.task='click'; expected a "
                f"comma-separated subset of {STAGES}"
            )
    return names


def run(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None):
    """Runs the click stages in `workdir`; returns the report (if written)."""
    order = stages(config)
    os.makedirs(workdir, exist_ok=True)
    data = load(config, workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    log.info(
        "click data %s: %s; %d categorical fields, %d numeric columns; mesh %s",
        data.name,
        json.dumps(data.counts),
        len(data.fields),
        len(data.numeric_names),
        dict(mesh.shape),
    )
    results, report = {}, None
    for stage in order:
        preemption.stage_boundary(f"stage {stage}")
        if stage == "report":
            report = {
                "task": "click",
                "config": json.loads(config.to_json_best_effort()),
                "dataset": {
                    "name": data.name,
                    "counts": data.counts,
                    "fields": list(data.fields),
                    "vocab_sizes": list(data.vocab_sizes),
                    "numeric": list(data.numeric_names),
                },
                "models": results,
            }
            workdir_lib.write_json(os.path.join(workdir, "report.json"), report)
            figures = plots.write_all([report], os.path.join(workdir, "plots"), plots.CLICK_FIGURES)
            with open(os.path.join(workdir, "report.md"), "w") as f:
                f.write(markdown(report, figures))
            log.info(
                "report written: %s",
                ", ".join([os.path.join(workdir, "report.md"), *figures.values()]),
            )
            continue
        result = run_stage(config, data, mesh, workdir, stage, stop_at_step)
        if result is None:
            log.info("stopped during stage %s; re-run to resume", stage)
            return None
        results[stage] = result
    return report


def markdown(report: dict, figures: dict[str, str] | None = None) -> str:
    """report.md of the click task: AUC, log loss and ECE per model and slice, and the figures."""
    d = report["dataset"]
    lines = [
        "# distill_jax click report",
        "",
        f"Data: {d['name']}: rows per split {json.dumps(d['counts'])}; "
        f"{len(d['fields'])} categorical fields, {len(d['numeric'])} numeric columns. "
        "Split by time; vocabularies and standardisation from the training rows.",
        "",
    ]
    header = ["model", "arch", "params"]
    for s in EVAL_SLICES:
        header += [f"{s} {m}" for m in LOG_METRICS]
    lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for name, r in report["models"].items():
        cells = [name, r["model"], f"{r['params']:,}"]
        for s in EVAL_SLICES:
            m = r["metrics"].get(s, {})
            cells += [_fmt(m.get(k)) for k in LOG_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    for name, path in (figures or {}).items():
        lines += ["", f"![{name}](plots/{os.path.basename(path)})"]
    return "\n".join(lines) + "\n"
