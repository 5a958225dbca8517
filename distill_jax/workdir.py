"""The main job's workdir: one directory per stage, its result, its best parameters.

`WORKDIR/<stage>/result.json` marks a finished stage (a re-run skips it);
`WORKDIR/<stage>/checkpoints/` holds its state and best parameters. The
training stages (`pipeline.py`) and the compress and export stages
(`distill_jax.compress.stage`) read each other's work through these helpers.
"""

import json
import os
from typing import Any

import ml_collections

from distill_jax import config_lib, distributed, models
from distill_jax import sharding as sharding_lib
from distill_jax.evaluation.evaluator import Evaluator
from distill_jax.train import state as state_lib
from distill_jax.train.checkpoint import StageCheckpointer


def write_json(path: str, obj: Any) -> None:
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
    """The best parameters a finished stage saved, laid out by the sharding rules."""
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    abstract = state_lib.abstract_params(model)
    ckpt = StageCheckpointer(stage_dir)
    try:
        params, _ = ckpt.restore_best(abstract, shardings)
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
