"""The compress and export stages of the main job.

compress: for each variant of `config.compress.variants`, start from the
best parameters of `config.compress.source`, make the variant (with a short
fine-tuning on the source's loss where the method has one, resumable like
any stage, in `WORKDIR/compress/<variant>/`), and evaluate it with the same
evaluator as every other model. Each variant's `result.json` carries a
`compression` entry: what was done and what it gained.

export: `config.export.model` (a trained stage or a variant) as a
self-contained artefact in `WORKDIR/export/` (see `export.py`), checked
against the in-process model and timed beside it.
"""

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from distill_jax import compress, config_lib, models, teachers
from distill_jax import sharding as sharding_lib
from distill_jax import workdir as workdir_lib
from distill_jax.compress import export as export_lib
from distill_jax.compress import lowrank, prune, quantize
from distill_jax.data import dataset as dataset_lib
from distill_jax.evaluation import evaluator as evaluator_lib
from distill_jax.evaluation.evaluator import Evaluator, Scorer
from distill_jax.train import loop, preemption
from distill_jax.train import state as state_lib

log = logging.getLogger(__name__)

# The trained stages a compress source or an export may come from, and their teacher.
TEACHER_OF = {"teacher": None, "student_kd": "teacher", "student_scratch": None}


@dataclasses.dataclass
class _Source:
    """The trained student every variant starts from."""

    stage: str
    mcfg: ml_collections.ConfigDict  # its model config (scratch overrides applied)
    model: models.SequenceRecommender
    params: Any  # its best params, on the mesh
    # What its stage distilled from (teachers.DistillSource), or None.
    distill: Any = None


@dataclasses.dataclass
class Made:
    """A model ready to evaluate or export, and what compression did to it."""

    scorer: Scorer
    counts: tuple[int, int]  # (parameter scalars, bytes in memory)
    info: dict
    train_seconds: float = 0.0
    finished: bool = True
    curves: dict | None = None  # the fine-tuning's, as StageResult.curves


def _trained(config, stage: str, catalogue, mesh, workdir: str):
    if not workdir_lib.finished(workdir, stage):
        raise FileNotFoundError(
            f"needs a finished {stage!r} stage in {workdir_lib.stage_dir(workdir, stage)}; "
            f"add '{stage}' to config.stages before it."
        )
    key = "teacher" if stage == "teacher" else "student"
    model = workdir_lib.build(config, key, catalogue, stage, mesh)
    params, shardings = workdir_lib.load_best_params(
        model, config, mesh, workdir_lib.stage_dir(workdir, stage)
    )
    return model, params, shardings


def _source(config, split, mesh, workdir: str) -> _Source:
    stage = config.compress.source
    model, params, shardings = _trained(config, stage, split, mesh, workdir)
    distill = None
    if TEACHER_OF[stage] is not None:
        distill = teachers.distill_source(config, split, mesh, workdir, model, "compress")
        # The fine-tuning starts from the trained student, not from the teacher's tables.
        distill.teacher_tables = None
    mcfg = config_lib.stage_model_config(config, stage, "student")
    return _Source(stage, mcfg, model, params, distill)


def _finetune_config(config, src: _Source) -> ml_collections.ConfigDict:
    mcfg = src.mcfg.copy_and_resolve_references()
    c = config.compress
    mcfg.update(num_steps=c.finetune_steps, learning_rate=c.learning_rate)
    mcfg.warmup_steps = c.warmup_steps
    return mcfg


def _finetune(name, model, init_params, config, split, mesh, vdir, src, stop_at_step, **kw):
    distill = src.distill.kwargs() if src.distill is not None else {}
    if config.distill.hidden_weight > 0:
        # The fine-tuning keeps the source's loss without hidden matching: the
        # projection was not kept with the student it compresses.
        config = config.copy_and_resolve_references()
        config.distill.hidden_weight = 0.0
    return loop.train_stage(
        name=name,
        model=model,
        mcfg=_finetune_config(config, src),
        config=config,
        split=split,
        workdir=vdir,
        mesh=mesh,
        stop_at_step=stop_at_step,
        init_params=init_params,
        **distill,
        **kw,
    )


def _replicated_scorer(model, params, mesh, padding_invariant: bool = True) -> Scorer:
    # Quantized trees have no logical axis names: they are small and replicated.
    rep = sharding_lib.replicated(mesh)
    params = jax.device_put(params, rep)
    shardings = jax.tree.map(lambda _: rep, params)
    return evaluator_lib.model_scorer(model, params, shardings, padding_invariant)


def make_variant(
    variant: compress.Variant,
    config: ml_collections.ConfigDict,
    split,
    mesh,
    workdir: str,
    src: _Source,
    stop_at_step: int | None = None,
) -> Made:
    """Makes (or, once fine-tuned, restores) one variant of the source student."""
    c = config.compress
    name = f"{src.stage}_{variant.name}"
    vdir = os.path.join(workdir, "compress", variant.name)
    os.makedirs(vdir, exist_ok=True)
    steps = c.finetune_steps
    rules = sharding_lib.rules(config)
    info: dict[str, Any] = {"method": variant.kind, "source": src.stage, "finetune_steps": steps}
    train_seconds, finished, curves = 0.0, True, None

    if variant.kind == "pruned":
        target = variant.amount / 100.0
        which = prune.prunable(src.params, c.prune_item_table)
        if steps == 0:
            ones = jax.tree.map(lambda p: np.ones(p.shape, bool), src.params)
            masks = prune.magnitude_masks(src.params, ones, which, target, c.prune_scope)
            params = jax.tree.map(lambda p, m: p * m, src.params, masks)
        else:
            end = max(1, round(c.prune_end_fraction * steps))
            then = prune.prune_updates(
                which,
                target=target,
                end_step=end,
                update_every=c.prune_every_steps,
                scope=c.prune_scope,
            )
            res = _finetune(
                name,
                src.model,
                src.params,
                config,
                split,
                mesh,
                vdir,
                src,
                stop_at_step,
                then=then,
                select_from_step=end,
            )
            params, train_seconds, finished = res.params, res.train_seconds, res.finished
            curves = res.curves
        model = src.model
        if finished:
            info["sparsity"] = prune.sparsity_report(params, which)
            info.update(scope=c.prune_scope, item_table_pruned=c.prune_item_table)
        scorer = evaluator_lib.model_scorer(
            model, params, state_lib.param_shardings(model, mesh, rules)
        )
        counts = model.param_counts(params) if finished else (0, 0)
        if finished:
            info["nonzero_params"] = int(
                sum(np.count_nonzero(np.asarray(x)) for x in jax.tree.leaves(params))
            )
    elif variant.kind == "lowrank":
        mcfg = src.mcfg.copy_and_resolve_references()
        mcfg.item_rank = variant.amount
        model = models.build_model(
            mcfg,
            num_items=split.num_items,
            max_len=mcfg.max_len,
            key_prefix="student",
            vocab_shards=sharding_lib.vocab_shards(config, mesh),
            item_features=split.item_features,
            features_cfg=config.features,
        )
        shardings = state_lib.param_shardings(model, mesh, rules)
        factored, svd = lowrank.factorize(
            jax.device_get(src.params), variant.amount, split.num_items
        )
        params = jax.device_put(factored, shardings)
        info["svd"] = svd
        if steps:
            res = _finetune(name, model, params, config, split, mesh, vdir, src, stop_at_step)
            params, train_seconds, finished = res.params, res.train_seconds, res.finished
            curves = res.curves
        scorer = evaluator_lib.model_scorer(model, params, shardings)
        counts = model.param_counts(params) if finished else (0, 0)
    else:  # int8, int8_act, int8_qat
        params = src.params
        activations = variant.kind == "int8_act"
        if variant.kind == "int8_qat" and steps:
            qat = quantize.qat_model(src.model)
            res = _finetune(name, qat, params, config, split, mesh, vdir, src, stop_at_step)
            params, train_seconds, finished = res.params, res.train_seconds, res.finished
            curves = res.curves
        scorer, counts = None, (0, 0)
        if finished:
            qmodel, qparams = quantize.ptq(src.model, params, activations)
            # Per-token int8 activations of attention take scales over the
            # whole window, padding included: evaluated on full windows.
            scorer = _replicated_scorer(qmodel, qparams, mesh, not activations)
            counts = (src.model.param_counts(src.params)[0], quantize.param_bytes(qparams))
            info.update(
                weights="int8, one float32 scale per output channel (item table: per item)",
                activations="int8, one scale per token" if activations else "float32",
            )
    return Made(scorer, counts, info, train_seconds, finished, curves)


def _evaluate(evaluator: Evaluator, made: Made, data, config, t_scorer, name: str) -> dict:
    t0 = time.time()
    metrics, deciles = evaluator.evaluate_splits(made.scorer, data.eval_splits, name)
    out = {
        "metrics": metrics,
        "popularity_deciles": deciles,
        "eval_seconds": time.time() - t0,
        "cost": workdir_lib.cost(evaluator, made.scorer, made.counts, config),
    }
    if t_scorer is not None and t_scorer.causal == made.scorer.causal:
        out["agreement_with_teacher"] = {"test": evaluator.agreement(t_scorer, made.scorer, "test")}
    return out


def run_compress(
    config: ml_collections.ConfigDict,
    data: dataset_lib.Dataset,
    mesh,
    workdir: str,
    stop_at_step: int | None = None,
) -> dict[str, dict] | None:
    """Every configured variant's result (report name -> result), or None if stopped."""
    variants = compress.parse_variants(config.compress.variants)
    results: dict[str, dict] = {}
    pending = []
    for v in variants:
        path = os.path.join(workdir, "compress", v.name, "result.json")
        if os.path.exists(path):
            log.info("[compress] %s finished earlier; skipping (%s)", v.name, path)
            results[f"{config.compress.source}_{v.name}"] = workdir_lib.read_json(path)
        else:
            pending.append(v)
    if not pending:
        return results
    src = _source(config, data.split, mesh, workdir)
    evaluator = Evaluator(data.split, config, mesh)
    t_scorer = teachers.teacher_scorer(
        config, data.split, mesh, workdir, src.model, distilled=src.distill is not None
    )
    src_counts = src.model.param_counts(src.params)
    for v in pending:
        name = f"{src.stage}_{v.name}"
        preemption.stage_boundary(f"compress variant {v.name}")
        log.info("[compress] %s", name)
        made = make_variant(v, config, data.split, mesh, workdir, src, stop_at_step)
        if not made.finished:
            return None
        made.info["bytes_vs_source"] = made.counts[1] / src_counts[1]
        result = {
            "model": config.student.name,
            "params": made.counts[0],
            "param_bytes": made.counts[1],
            "train_seconds": made.train_seconds,
            "curves": made.curves,
            "teacher": TEACHER_OF[src.stage],
            "compression": made.info,
            **_evaluate(evaluator, made, data, config, t_scorer, name),
        }
        workdir_lib.write_json(os.path.join(workdir, "compress", v.name, "result.json"), result)
        log.info("[compress] %s test %s", name, workdir_lib.brief(result["metrics"]["test"]))
        results[name] = result
    return results


def result_path(config, workdir: str, name: str) -> str:
    """Where the result.json of a trained stage or a variant (its report name) lives."""
    if name in config_lib.TRAINED_STAGES:
        return os.path.join(workdir_lib.stage_dir(workdir, name), "result.json")
    return os.path.join(
        workdir, "compress", name.removeprefix(config.compress.source + "_"), "result.json"
    )


def scorer_for(config, data, mesh, workdir: str, name: str) -> tuple[Scorer, dict]:
    """The scorer of a trained stage or a made variant (its report name), and its result."""
    if name in config_lib.TRAINED_STAGES:
        model, params, shardings = _trained(config, name, data.split, mesh, workdir)
        return evaluator_lib.model_scorer(model, params, shardings), workdir_lib.read_json(
            os.path.join(workdir_lib.stage_dir(workdir, name), "result.json")
        )
    prefix = config.compress.source + "_"
    variant = {v.name: v for v in compress.parse_variants(config.compress.variants)}[
        name[len(prefix) :]
    ]
    result_path = os.path.join(workdir, "compress", variant.name, "result.json")
    if not os.path.exists(result_path):
        raise FileNotFoundError(
            f"{name!r} needs the compress stage to have made it "
            f"({result_path} is missing); add 'compress' to config.stages before 'export'."
        )
    src = _source(config, data.split, mesh, workdir)
    made = make_variant(variant, config, data.split, mesh, workdir, src)
    return made.scorer, workdir_lib.read_json(result_path)


def export_model(config, data, mesh, workdir: str, name: str, out_dir: str) -> dict:
    """Writes the artefact of `name` (a trained stage or a variant) to `out_dir`; measures it.

    Returns what it measured: bytes on disk, the share of test users whose
    top-K is the same as in process, and the artefact's latency beside the
    in-process model's.
    """
    scorer, made_result = scorer_for(config, data, mesh, workdir, name)
    # The artefact's files are each written whole (temp + rename); its result.json last.
    preemption.stop_point("during stage export")
    popular = np.argsort(-evaluator_lib.popularity_counts(data.split)[1:], kind="stable") + 1
    provenance = {
        "model": name,
        "config": config.to_dict(),
        "data": {k: v for k, v in data.info.items() if k != "steps"},
        "commit": export_lib.git_commit(),
        "metrics": made_result.get("metrics", {}).get("test", {}),
    }
    manifest = export_lib.write_artifact(
        out_dir,
        scorer,
        num_items=data.split.num_items,
        top_k=config.export.top_k,
        exclude_history=config.eval.exclude_history,
        item_id_to_original=data.item_id_to_original,
        popular_items=popular[: config.export.popular_items],
        provenance=provenance,
        user_id_to_original=data.user_id_to_original,
    )
    preemption.stop_point("during stage export")
    histories, _ = data.split.eval_examples("test")
    users = data.split.user_ids("test")
    return {
        "model": name,
        "directory": out_dir,
        "bytes_on_disk": manifest["bytes_on_disk"],
        "param_bytes": made_result.get("param_bytes"),
        "same_top_k": export_lib.compare(
            out_dir, scorer, histories, data.split.num_items, config, users
        ),
        "latency_top_k": export_lib.latency(
            out_dir, scorer, histories, data.split.num_items, config, users
        ),
    }


def run_export(
    config: ml_collections.ConfigDict, data: dataset_lib.Dataset, mesh, workdir: str
) -> dict:
    """Writes `WORKDIR/export/` (once) and returns what it measured."""
    out_dir = os.path.join(workdir, "export")
    result_path = os.path.join(out_dir, "result.json")
    if os.path.exists(result_path):
        log.info("[export] finished earlier; skipping (%s)", result_path)
        return workdir_lib.read_json(result_path)
    result = export_model(config, data, mesh, workdir, config.export.model, out_dir)
    workdir_lib.write_json(result_path, result)
    check = result["same_top_k"]
    log.info(
        "[export] %s -> %s (%d bytes); same top-%d as in process on %.1f%% of %d test users",
        config.export.model,
        out_dir,
        result["bytes_on_disk"]["total"],
        config.export.top_k,
        100 * check["identical_share"],
        check["users"],
    )
    return result
