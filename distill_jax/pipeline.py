"""The main job: teacher -> student_kd -> student_scratch -> report.

Each stage works in `WORKDIR/<stage>/`; it resumes from its checkpoint and,
once finished, writes `result.json`, so a re-run skips it. The report stage
writes `WORKDIR/report.json` and `WORKDIR/report.md`.
"""

import json
import logging
import os
import time
from typing import Any

import ml_collections

from distill_jax import config_lib, distributed, models
from distill_jax import sharding as sharding_lib
from distill_jax.data import dataset as dataset_lib
from distill_jax.evaluation import evaluator as evaluator_lib
from distill_jax.evaluation.evaluator import Evaluator
from distill_jax.train import loop
from distill_jax.train import state as state_lib
from distill_jax.train.checkpoint import StageCheckpointer

log = logging.getLogger(__name__)

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


def _write_json(path: str, obj: Any) -> None:
    """Process 0 writes atomically (temp file + rename): readers never see half a file.

    Every process calls this: the others wait until the file exists, because
    they read it next (a later stage's `_finished` check) and would otherwise
    take a different branch from process 0 and hang in a collective.
    """
    if distributed.is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)  # insertion order: steps stay in run order
        os.replace(tmp, path)
    distributed.barrier(f"distill_jax_wrote_{path}")


def build(config: ml_collections.ConfigDict, key: str, num_items: int, stage: str = "", mesh=None):
    """The model of `stage` (config subtree `key`; see config_lib.stage_model_config).

    With a `mesh`, the item table is padded to the number of pieces the sharding
    rules split the catalogue into, so that any catalogue size divides.
    """
    mcfg = config_lib.stage_model_config(config, stage, key)
    return models.build_model(
        mcfg,
        num_items=num_items,
        max_len=mcfg.max_len,
        key_prefix=key,
        vocab_shards=1 if mesh is None else sharding_lib.vocab_shards(config, mesh),
    )


def load_best_params(model, config, mesh, stage_dir: str):
    """The best parameters a finished stage saved, laid out by the sharding rules."""
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    abstract = state_lib.abstract_params(model)
    ckpt = StageCheckpointer(stage_dir)
    try:
        params, _ = ckpt.restore_best(abstract, shardings)
    finally:
        ckpt.close()
    return params, shardings


def _stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def _finished(workdir: str, stage: str) -> bool:
    return os.path.exists(os.path.join(_stage_dir(workdir, stage), "result.json"))


def _cost(evaluator: Evaluator, scorer, counts: tuple[int, int], config) -> dict:
    return {
        "params": counts[0],
        "param_bytes": counts[1],
        "flops_per_sequence": scorer.flops_per_sequence,
        "latency_top10": {
            f"batch_{b}": evaluator.latency(scorer, b, config.eval.latency_repeats)
            for b in config.eval.latency_batch_sizes
        },
    }


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
    stage_dir = _stage_dir(workdir, stage)
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
        metrics = {s: evaluator.evaluate(scorer, s) for s in data.eval_splits}
        result = {
            "model": "popularity",
            "params": 0,
            "metrics": metrics,
            "train_seconds": 0.0,
            "eval_seconds": time.time() - t0,
            "teacher": None,
            "cost": _cost(evaluator, scorer, (0, 0), config),
        }
        _write_json(result_path, result)
        log.info("[%s] test %s", stage, _brief(metrics["test"]))
        return result
    key, teacher_stage = STAGES[stage]
    mcfg = config_lib.stage_model_config(config, stage, key)
    model = build(config, key, split.num_items, stage, mesh)
    teacher = t_scorer = None
    # The scratch student is compared with the teacher too, when there is one.
    t_stage = teacher_stage or ("teacher" if stage != "teacher" else None)
    if t_stage is not None and _finished(workdir, t_stage):
        t_model = build(config, STAGES[t_stage][0], split.num_items, mesh=mesh)
        t_params, t_shardings = load_best_params(
            t_model, config, mesh, _stage_dir(workdir, t_stage)
        )
        teacher = loop.Teacher(model=t_model, params=t_params, shardings=t_shardings)
        t_scorer = evaluator_lib.model_scorer(t_model, t_params, t_shardings)
    elif teacher_stage is not None:
        raise FileNotFoundError(
            f"Stage {stage!r} needs a finished {teacher_stage!r} stage in "
            f"{_stage_dir(workdir, teacher_stage)}; add '{teacher_stage}' to config.stages "
            f"before '{stage}'."
        )
    res = loop.train_stage(
        name=stage,
        model=model,
        mcfg=mcfg,
        config=config,
        split=split,
        workdir=stage_dir,
        mesh=mesh,
        teacher=teacher if teacher_stage else None,
        stop_at_step=stop_at_step,
    )
    if not res.finished:
        return None
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    scorer = evaluator_lib.model_scorer(model, res.params, shardings)
    t0 = time.time()
    metrics = {s: evaluator.evaluate(scorer, s) for s in data.eval_splits}
    # The item table's padding rows (a sharded catalogue) are not parameters.
    counts = model.param_counts(res.params)
    result = {
        "model": mcfg.name,
        "params": counts[0],
        "param_bytes": counts[1],
        "metrics": metrics,
        "train_seconds": res.train_seconds,
        "eval_seconds": time.time() - t0,
        "best_step": res.best_step,
        "steps_run": res.steps_run,
        "stopped_early": res.stopped_early,
        "teacher": teacher_stage,
        "cost": _cost(evaluator, scorer, counts, config),
    }
    if t_scorer is not None and t_scorer.causal == scorer.causal:
        result["agreement_with_teacher"] = {"test": evaluator.agreement(t_scorer, scorer, "test")}
    _write_json(result_path, result)
    log.info("[%s] test %s", stage, _brief(metrics["test"]))
    return result


def _brief(m: dict) -> str:
    return " ".join(
        f"{k}={m[k]:.4f}"
        for k in ("hr@10", "ndcg@10", "mrr", "coverage@10", "tail_ndcg@10")
        if k in m
    )


def _report_md(report: dict) -> str:
    d = report["dataset"]
    cols = ["hr@10", "ndcg@10", "mrr", "coverage@10", "gini@10", "tail_ndcg@10"]
    lines = [
        "# distill_jax report",
        "",
        f"Data: {d['name']}: {d['users']} users, {d['items']} items, "
        f"{d['interactions']} interactions. Leave-one-out test split, full ranking over "
        f"every item, history excluded: {report['config']['eval']['exclude_history']}. "
        "tail = targets outside the head items that make "
        f"{report['config']['eval']['tail_share']:.0%} of training interactions.",
        "",
        "| model | arch | params | "
        + " | ".join(cols)
        + " | valid ndcg@10 | top-10 ms (b=1 / b=256) | train s |",
        "|---|---|---:|" + "---:|" * len(cols) + "---:|---:|---:|",
    ]
    for name, r in report["models"].items():
        test = r["metrics"]["test"]
        lat = r.get("cost", {}).get("latency_top10", {})
        lat_s = " / ".join(f"{v['p50_ms']:.2f}" for v in lat.values()) or "-"
        lines.append(
            f"| {name} | {r['model']} | {r['params']:,} | "
            + " | ".join(f"{test[c]:.4f}" for c in cols)
            + f" | {r['metrics']['valid']['ndcg@10']:.4f} | {lat_s} | {r['train_seconds']:.1f} |"
        )
    t, kd, sc = (report["models"].get(k) for k in ("teacher", "student_kd", "student_scratch"))
    if t and kd and sc:
        tn, kn, sn = (r["metrics"]["test"]["ndcg@10"] for r in (t, kd, sc))
        lines += [
            "",
            f"Student/teacher parameters: {kd['params'] / t['params']:.3f}. "
            f"student_kd NDCG@10 = {kn / tn if tn else float('nan'):.2f} x teacher, "
            f"{kn / sn if sn else float('nan'):.2f} x student_scratch.",
        ]
    agree = {
        n: r["agreement_with_teacher"]["test"]
        for n, r in report["models"].items()
        if "agreement_with_teacher" in r
    }
    if agree:
        lines += [
            "",
            "Agreement with the teacher on the test inputs: "
            + "; ".join(
                f"{n}: top-10 overlap {a['top10_overlap']:.3f}, KL {a['kl']:.3f}"
                for n, a in agree.items()
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def run(
    config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None
) -> dict | None:
    """Runs the configured stages in `workdir`; returns the report (if written)."""
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
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
    report = None
    for stage in config_lib.stages(config):
        if stage == "report":
            report = {
                "config": json.loads(config.to_json_best_effort()),
                "dataset": data.info,
                "models": results,
            }
            _write_json(os.path.join(workdir, "report.json"), report)
            if distributed.is_main_process():
                with open(os.path.join(workdir, "report.md"), "w") as f:
                    f.write(_report_md(report))
            log.info("report written to %s", os.path.join(workdir, "report.md"))
            continue
        result = run_stage(stage, config, data, mesh, workdir, stop_at_step)
        if result is None:
            log.info("stopped during stage %s; re-run to resume", stage)
            return None
        results[stage] = result
    return report
