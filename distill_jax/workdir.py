"""The main job's workdir: one directory per stage, its result, its best parameters.

`WORKDIR/<stage>/result.json` marks a finished stage (a re-run skips it);
`WORKDIR/<stage>/checkpoints/` holds its state and best parameters. The
training stages (`pipeline.py`) and the compress and export stages
(`distill_jax.compress.stage`) read each other's work through these helpers.
"""

import json
import os
import shutil
import time
from typing import Any

import ml_collections

from distill_jax import config_lib, distributed, faults, models
from distill_jax import sharding as sharding_lib
from distill_jax.evaluation.evaluator import Evaluator
from distill_jax.train import state as state_lib
from distill_jax.train.checkpoint import StageCheckpointer


def write_json(path: str, obj: Any, wait: bool = True) -> None:
    """Process 0 writes atomically (temp file + rename): readers never see half a file.

    Every process calls this: the others wait until the file exists, because
    they read it next (a later stage's `_finished` check) and would otherwise
    take a different branch from process 0 and hang in a collective. With
    `wait=False` they do not: for a file no process of the run reads back.
    """
    if distributed.is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)  # insertion order: steps stay in run order
        os.replace(tmp, path)
    if wait:
        distributed.barrier(f"distill_jax_wrote_{path}")


CONFIG_FILE = "config.json"
# Keys a resumed run may change: they cannot change its parameters or metrics
# (what runs next, how often to log or save, where caches and coordinators
# are, how many rows an evaluation batch holds, whether a run that met a NaN
# step stops there or skips it: no step's update depends on it).
FREE_KEYS = (
    "stages",
    "train.on_nonfinite",
    "log_every_steps",
    "checkpoint.every_steps",
    "eval.batch_size",
    "eval.latency_batch_sizes",
    "eval.latency_repeats",
    "data.cache_dir",
    "data.download",
    "distributed.",
    "compile_cache.",
)
_REPLACED = "replaced-"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE_KEYS)


def config_changes(stored: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) of the keys that differ and may change the result.

    Keys the stored config lacks (added by a later version, at their
    defaults) and `FREE_KEYS` are not compared.
    """
    a, b = _flat(stored), _flat(current)
    return [(k, a[k], b.get(k)) for k in sorted(a) if not _free(k) and a[k] != b.get(k)]


def check_config(config: ml_collections.ConfigDict, workdir: str, fresh: bool = False) -> None:
    """Refuses to resume work in `workdir` done with another config, unless `fresh`.

    The first run writes `WORKDIR/config.json`; a later run compares its
    config with it and raises `faults.ConfigChangedError` naming every key
    that differs (`FREE_KEYS` may). With `fresh` the work there is moved to
    `WORKDIR/replaced-<UTC time>/` (nothing is deleted) and the run starts over.
    """
    current = json.loads(config.to_json_best_effort())
    path = os.path.join(workdir, CONFIG_FILE)
    stored = os.path.exists(path)
    # Every process looks before any writes: they all take the same branch
    # below (a process that saw process 0's fresh file would skip the write's
    # barrier and leave the others waiting in it).
    distributed.barrier(f"distill_jax_config_seen_{workdir}")
    if fresh:
        _move_aside(workdir)
    elif stored:
        changes = config_changes(read_json(path)["config"], current)
        if changes:
            shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in changes[:12])
            more = f" and {len(changes) - 12} more" if len(changes) > 12 else ""
            raise faults.ConfigChangedError(
                f"{workdir} holds work of another config: {shown}{more} (stored in {path}). "
                "Resume with the stored config, use another --workdir, or pass --fresh to move "
                f"that work to {workdir}/{_REPLACED}<time>/ and start over."
            )
    if not stored or fresh:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, {"config": current})


def _move_aside(workdir: str) -> None:
    """Moves everything in `workdir` (but earlier replaced work) into a replaced-<time> folder."""
    if distributed.is_main_process() and os.path.isdir(workdir):
        names = [n for n in sorted(os.listdir(workdir)) if not n.startswith(_REPLACED)]
        if names:
            target = os.path.join(
                workdir, _REPLACED + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            )
            os.makedirs(target)
            for n in names:
                shutil.move(os.path.join(workdir, n), os.path.join(target, n))
    distributed.barrier(f"distill_jax_fresh_{workdir}")


def build(config: ml_collections.ConfigDict, key: str, catalogue, stage: str = "", mesh=None):
    """The model of `stage` (config subtree `key`; see config_lib.stage_model_config).

    `catalogue` is the data's split (its size, and the item features a model
    with `use_features` reads) or just the number of items V.
    With a `mesh`, the item table is padded to the number of pieces the sharding
    rules split the catalogue into, so that any catalogue size divides.
    """
    mcfg = config_lib.stage_model_config(config, stage, key)
    return models.build_model(
        mcfg,
        num_items=models.catalogue_size(catalogue),
        max_len=mcfg.max_len,
        key_prefix=key,
        vocab_shards=1 if mesh is None else sharding_lib.vocab_shards(config, mesh),
        item_features=getattr(catalogue, "item_features", None),
        features_cfg=config.features,
    )


def load_best_params(model, config, mesh, stage_dir: str):
    """The best parameters a finished stage saved, laid out by the sharding rules.

    If its newest checkpoint is damaged, an older one serves only when it holds
    the parameters of the step the stage's result.json names as its best.
    """
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    abstract = state_lib.abstract_params(model)
    result = os.path.join(stage_dir, "result.json")
    best_step = read_json(result).get("best_step") if os.path.exists(result) else None
    ckpt = StageCheckpointer(stage_dir)
    try:
        params, _ = ckpt.restore_best(abstract, shardings, best_step=best_step)
    finally:
        ckpt.close()
    return params, shardings


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def finished(workdir: str, stage: str) -> bool:
    return os.path.exists(os.path.join(stage_dir(workdir, stage), "result.json"))


def cost(evaluator: Evaluator, scorer, counts: tuple[int, int], config) -> dict:
    return {
        "params": counts[0],
        "param_bytes": counts[1],
        "flops_per_sequence": scorer.flops_per_sequence,
        "latency_top10": {
            f"batch_{b}": evaluator.latency(scorer, b, config.eval.latency_repeats)
            for b in config.eval.latency_batch_sizes
        },
    }


def brief(m: dict) -> str:
    return " ".join(
        f"{k}={m[k]:.4f}"
        for k in ("hr@10", "ndcg@10", "mrr", "coverage@10", "tail_ndcg@10")
        if k in m
    )


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)
