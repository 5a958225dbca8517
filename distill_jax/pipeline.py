"""The main job: teacher -> student_kd -> student_scratch -> compress -> export -> report.

With `config.distill.method='ensemble'` the extra teachers (`teacher_<n>`)
train before an `ensemble` stage that evaluates them as one model; with
'cached' a `soft_labels` stage stores the teacher's outputs before student_kd.

Each stage works in `WORKDIR/<stage>/`; it resumes from its checkpoint and,
once finished, writes `result.json`, so a re-run skips it. A SIGTERM stops
the run where nothing is lost (train/preemption.py: a training step's
boundary after a checkpoint, else between stages or evaluation batches) with
`faults.Preempted`; the same command resumes. The report stage
writes `WORKDIR/report.json`, `report.md`, `report.html` and `plots/*.png`
(distill_jax/evaluation/report.py). `WORKDIR/stage_seconds.json` holds the
wall seconds this run spent on each stage (`STAGE_SECONDS`).
"""

import contextlib
import json
import logging
import os
import time

import ml_collections

from distill_jax import config_lib, distributed, teachers
from distill_jax import sharding as sharding_lib
from distill_jax import workdir as workdir_lib
from distill_jax.compress import stage as compress_stage
from distill_jax.data import dataset as dataset_lib
from distill_jax.evaluation import evaluator as evaluator_lib
from distill_jax.evaluation import report as report_lib
from distill_jax.evaluation.evaluator import Evaluator
from distill_jax.train import ensemble as ensemble_lib
from distill_jax.train import loop, preemption
from distill_jax.train import state as state_lib

log = logging.getLogger(__name__)
# Benchmarks and tests build models and read finished stages through these.
build = workdir_lib.build
load_best_params = workdir_lib.load_best_params

# Wall seconds of this run per stage, "data" (preparing or reading back the
# dataset) first, rewritten as each stage ends: a stage finished earlier and
# skipped counts the reading of its result, and a resumed run starts the file anew
# (benchmarks/pipeline_time.py reads it).
STAGE_SECONDS = "stage_seconds.json"

# stage -> (its model's config subtree, its teacher's stage or None)
STAGES = {
    "teacher": ("teacher", None),
    "student_kd": ("student", "teacher"),
    "student_scratch": ("student", None),
}


def _check_catalogue(config: ml_collections.ConfigDict, num_items: int) -> None:
    for key in config_lib.MODEL_KEYS:
        n = config[key].num_items
        if n not in (-1, num_items):
            raise config_lib.ConfigError(
                f"config.{key}.num_items={n} is invalid: the data has {num_items} items "
                "(use -1 to take the size from the data)."
            )


def _teacher_name(config: ml_collections.ConfigDict) -> str:
    """What the distilled student learnt from, as the report names it."""
    method = config.distill.method
    if method == "ensemble":
        return "ensemble"
    return "soft_labels" if method == "cached" else "teacher"


def run_stage(
    stage: str,
    config: ml_collections.ConfigDict,
    data: dataset_lib.Dataset,
    mesh,
    workdir: str,
    stop_at_step: int | None = None,
) -> dict | None:
    """Runs (or resumes, or skips if finished) one stage.

    Returns:
      The stage's result dict, or None if it stopped before finishing.
    """
    stage_dir = workdir_lib.stage_dir(workdir, stage)
    result_path = os.path.join(stage_dir, "result.json")
    if os.path.exists(result_path):
        log.info("[%s] finished earlier; skipping (%s)", stage, result_path)
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(stage_dir, exist_ok=True)
    split = data.split
    evaluator = Evaluator(split, config, mesh)
    if stage == "popularity":
        scorer = evaluator_lib.popularity_scorer(split, mesh, config.teacher.max_len)
        t0 = time.time()
        metrics, deciles = evaluator.evaluate_splits(scorer, data.eval_splits, stage)
        result = {
            "model": "popularity",
            "params": 0,
            "metrics": metrics,
            "popularity_deciles": deciles,
            "train_seconds": 0.0,
            "eval_seconds": time.time() - t0,
            "teacher": None,
            "cost": workdir_lib.cost(evaluator, scorer, (0, 0), config),
        }
        workdir_lib.write_json(result_path, result)
        log.info("[%s] test %s", stage, workdir_lib.brief(metrics["test"]))
        return result
    key, teacher_stage = STAGES["teacher" if ensemble_lib.is_stage(stage) else stage]
    mcfg = config_lib.stage_model_config(config, stage, key)
    model = workdir_lib.build(config, key, split, stage, mesh)
    source = teachers.DistillSource()
    if teacher_stage is not None:
        source = teachers.distill_source(config, split, mesh, workdir, model, stage)
    res = loop.train_stage(
        name=stage,
        model=model,
        mcfg=mcfg,
        # An extra teacher 'teacher_<n>' trains with seed config.seed + n.
        config=ensemble_lib.stage_config(config, stage),
        split=split,
        workdir=stage_dir,
        mesh=mesh,
        stop_at_step=stop_at_step,
        **source.kwargs(),
    )
    del source  # the teacher's params are not needed for the evaluation
    if not res.finished:
        return None
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    scorer = evaluator_lib.model_scorer(model, res.params, shardings)
    t0 = time.time()
    metrics, deciles = evaluator.evaluate_splits(scorer, data.eval_splits, stage)
    # The item table's padding rows (a sharded catalogue) are not parameters.
    counts = model.param_counts(res.params)
    result = {
        "model": mcfg.name,
        "params": counts[0],
        "param_bytes": counts[1],
        "metrics": metrics,
        "popularity_deciles": deciles,
        "curves": res.curves,
        "train_seconds": res.train_seconds,
        "eval_seconds": time.time() - t0,
        "best_step": res.best_step,
        "steps_run": res.steps_run,
        "stopped_early": res.stopped_early,
        "teacher": teacher_stage and _teacher_name(config),
        "cost": workdir_lib.cost(evaluator, scorer, counts, config),
    }
    t_scorer = None
    if key == "student":
        t_scorer = teachers.teacher_scorer(
            config, split, mesh, workdir, model, distilled=teacher_stage is not None
        )
    if t_scorer is not None and t_scorer.causal == scorer.causal:
        result["agreement_with_teacher"] = {"test": evaluator.agreement(t_scorer, scorer, "test")}
    workdir_lib.write_json(result_path, result)
    log.info("[%s] test %s", stage, workdir_lib.brief(metrics["test"]))
    return result


def run_ensemble(config, data: dataset_lib.Dataset, mesh, workdir: str) -> dict:
    """The ensemble stage: the teachers of distill.ensemble_teachers evaluated as one model."""
    stage_dir = workdir_lib.stage_dir(workdir, "ensemble")
    result_path = os.path.join(stage_dir, "result.json")
    if os.path.exists(result_path):
        log.info("[ensemble] finished earlier; skipping (%s)", result_path)
        return workdir_lib.read_json(result_path)
    os.makedirs(stage_dir, exist_ok=True)
    split = data.split
    student = workdir_lib.build(config, "student", split, "student_kd", mesh)
    t = teachers.ensemble_teacher(config, split, mesh, workdir, student)
    scorer = ensemble_lib.scorer(t.model, t.params, t.shardings)
    evaluator = Evaluator(split, config, mesh)
    t0 = time.time()
    metrics, deciles = evaluator.evaluate_splits(scorer, data.eval_splits, "ensemble")
    counts = ensemble_lib.param_counts(t.model, t.params)
    result = {
        "model": "ensemble",
        "params": counts[0],
        "param_bytes": counts[1],
        "members": list(t.model.names),
        "weights": list(t.model.weights),
        "metrics": metrics,
        "popularity_deciles": deciles,
        "train_seconds": 0.0,
        "eval_seconds": time.time() - t0,
        "teacher": None,
        "cost": workdir_lib.cost(evaluator, scorer, counts, config),
    }
    workdir_lib.write_json(result_path, result)
    log.info("[ensemble] test %s", workdir_lib.brief(metrics["test"]))
    return result


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    stop_at_step: int | None = None,
    fresh: bool = False,
) -> dict | None:
    """Runs the configured stages in `workdir`; returns the report (if written).

    A workdir holding work of another config is refused (`workdir.check_config`);
    `fresh` moves that work aside and starts over.
    """
    config_lib.validate(config)
    # One SIGTERM handler for the whole run: the training loops checkpoint and stop at a
    # step boundary, and everywhere else the run stops at the next preemption.stop_point.
    with preemption.handling():
        workdir_lib.check_config(config, workdir, fresh)
        if config.task == "click":
            from distill_jax.train import click  # the click task's stages

            return click.run(config, workdir, stop_at_step)
        return _run(config, workdir, stop_at_step)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str, workdir: str):
    """Adds the wall seconds of the block to `seconds[name]` and rewrites STAGE_SECONDS.

    An exception (a preemption, an error) leaves the file as it was.
    """
    t0 = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    # No process reads it back: no barrier (a collective) between the stages.
    workdir_lib.write_json(os.path.join(workdir, STAGE_SECONDS), seconds, wait=False)


def _run(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None) -> dict | None:
    os.makedirs(workdir, exist_ok=True)
    seconds: dict[str, float] = {}
    with _timed(seconds, "data", workdir):
        data = dataset_lib.load(config, workdir)
    _check_catalogue(config, data.split.num_items)
    mesh = sharding_lib.make_mesh(config.mesh)
    log.info(
        "data %s: %d users, %d items, %d interactions; mesh %s",
        data.info["name"],
        data.info["users"],
        data.info["items"],
        data.info["interactions"],
        dict(mesh.shape),
    )
    results = {}
    report = exported = soft_labels = None
    for stage in config_lib.stages(config):
        with _timed(seconds, stage, workdir):
            preemption.stage_boundary(f"stage {stage}")
            if stage == "report":
                report = {
                    "config": json.loads(config.to_json_best_effort()),
                    "dataset": data.info,
                    "models": results,
                    "export": exported,
                    "soft_labels": soft_labels,
                }
                workdir_lib.write_json(os.path.join(workdir, "report.json"), report)
                if distributed.is_main_process():
                    written = report_lib.write(report, workdir)
                    log.info("report written: %s", ", ".join(written.values()))
                continue
            if stage == "compress":
                variants = compress_stage.run_compress(config, data, mesh, workdir, stop_at_step)
                if variants is None:
                    log.info("stopped during stage compress; re-run to resume")
                    return None
                results.update(variants)
                continue
            if stage == "export":
                exported = compress_stage.run_export(config, data, mesh, workdir)
                continue
            if stage == "soft_labels":
                soft_labels = teachers.write_soft_labels(config, data, mesh, workdir)
                continue
            if stage == "ensemble":
                results[stage] = run_ensemble(config, data, mesh, workdir)
                continue
            result = run_stage(stage, config, data, mesh, workdir, stop_at_step)
            if result is None:
                log.info("stopped during stage %s; re-run to resume", stage)
                return None
            results[stage] = result
    return report
