"""Several teachers as one: their softmaxes averaged in probability space.

`config.distill.method='ensemble'` distils from

    p_ens(i) = Σ_m w_m · softmax(z_m)(i)

over the teachers m named by `config.distill.ensemble_teachers`, with the
weights of `config.distill.ensemble_weights` (normalised to sum 1; equal when
empty). The loss sees `log p_ens` as the teacher's logits (a log-probability
vector is a valid set of logits), so the soft target's temperature, alpha,
history exclusion and teacher-only slots apply unchanged: at temperature T
the KL uses softmax(log p_ens / T).

A teacher is a stage of this workdir (`teacher`, or `teacher_<n>`: the
teacher's config trained with seed `config.seed + n`) or the directory of a
finished teacher stage of another workdir, whose model config is read from
its checkpoint. Every teacher must read the same catalogue and window as the
student, and be next-item (causal) exactly when the student is.

The `ensemble` stage of the main job evaluates the ensemble as a model of its
own (`WORKDIR/ensemble/result.json`): its parameters are the sum of its
teachers'.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distill_jax import config_checks, models
from distill_jax import sharding as sharding_lib
from distill_jax import workdir as workdir_lib
from distill_jax.config_distill import parse_weights
from distill_jax.evaluation.evaluator import Scorer, model_flops_per_sequence
from distill_jax.train.checkpoint import StageCheckpointer

EXTRA_TEACHER = config_checks.EXTRA_TEACHER


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
    """Frozen teachers averaged in probability space (the `model` of an ensemble Teacher).

    Attributes:
      models: the teachers' modules.
      weights: their weights, summing to 1.
      names: where each came from (a stage name or a directory), for logs.
    """

    models: tuple[nn.Module, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    @property
    def is_causal(self) -> bool:
        return self.models[0].is_causal

    @property
    def num_items(self) -> int:
        return self.models[0].num_items

    @property
    def max_len(self) -> int:
        return self.models[0].max_len

    @property
    def hidden_dim(self) -> int:
        """Width of the concatenated hidden states (what hidden matching projects onto)."""
        return sum(m.embed_dim for m in self.models)

    def log_probs(self, params: tuple, hidden: tuple[jax.Array, ...]) -> jax.Array:
        """``[N, R]`` log p_ens from each teacher's hidden states ``[N, D_m]``."""
        parts = []
        for m, p, h, w in zip(self.models, params, hidden, self.weights, strict=True):
            z = m.apply({"params": p}, h, method=m.logits).astype(jnp.float32)
            parts.append(jax.nn.log_softmax(z, axis=-1) + np.log(w))
        return jax.nn.logsumexp(jnp.stack(parts), axis=0)


def members(config: ml_collections.ConfigDict) -> list[str]:
    """The teachers named by `config.distill.ensemble_teachers`, in order."""
    return [m.strip() for m in config.distill.ensemble_teachers.split(",") if m.strip()]


def is_stage(member: str) -> bool:
    """Whether `member` names a stage of this workdir (else: a stage directory)."""
    return member == "teacher" or EXTRA_TEACHER.match(member) is not None


def seed_offset(stage: str) -> int:
    """n of 'teacher_<n>' (0 for 'teacher')."""
    match = EXTRA_TEACHER.match(stage)
    return int(match.group(1)) if match else 0


def _member_config(directory: str) -> ml_collections.ConfigDict:
    """The whole config a finished stage directory was trained with (from its checkpoint)."""
    if not os.path.exists(os.path.join(directory, "result.json")):
        raise FileNotFoundError(
            f"config.distill.ensemble_teachers: {directory} is not a finished stage "
            "(no result.json); train it first or name a stage of this workdir."
        )
    ckpt = StageCheckpointer(directory)
    try:
        meta = ckpt.restore_meta()
    finally:
        ckpt.close()
    return ml_collections.ConfigDict(meta["config"])


# What a key missing from a stored model config meant when it was stored.
_ABSENT = {"use_features": False}


def _stored_model_config(like: ml_collections.ConfigDict, stored) -> ml_collections.ConfigDict:
    """A teacher's model config as stored in its checkpoint, on top of `like`.

    Keys the stored config lacks (a stage trained by an earlier version, before
    the key existed) keep `like`'s values, which were the defaults then, except
    those in `_ABSENT`: a teacher stored before side features existed read
    none, whatever `like` (config.teacher) says now.
    """
    out = like.copy_and_resolve_references()
    for key, value in _ABSENT.items():
        if key in out and key not in stored:
            out[key] = value
    for key, value in stored.items():
        if key in out:
            out[key] = (
                type(out[key])(value) if isinstance(out[key], bool | int | float | str) else value
            )
    return out


def load(config: ml_collections.ConfigDict, workdir: str, catalogue, mesh, student):
    """The ensemble's modules, its teachers' best params and their shardings.

    `catalogue`: the split (or V), as for `workdir.build`.

    Returns:
      (Ensemble, params tuple, shardings tuple).
    """
    names = members(config)
    mods, params, shardings = [], [], []
    for name in names:
        if is_stage(name):
            directory = workdir_lib.stage_dir(workdir, name)
            if not workdir_lib.finished(workdir, name):
                raise FileNotFoundError(
                    f"config.distill.ensemble_teachers names {name!r}, which has not finished "
                    f"in {directory}; add it to config.stages before the stage that uses it."
                )
            mcfg = config.teacher
        else:
            directory = os.path.abspath(os.path.expanduser(name))
            mcfg = _stored_model_config(config.teacher, _member_config(directory).teacher)
        model = models.build_model(
            mcfg,
            num_items=models.catalogue_size(catalogue),
            max_len=mcfg.max_len,
            key_prefix=f"ensemble teacher {name}",
            vocab_shards=sharding_lib.vocab_shards(config, mesh),
            item_features=getattr(catalogue, "item_features", None),
            features_cfg=config.features,
        )
        where = f"config.distill.ensemble_teachers: teacher {name!r}"
        if mcfg.max_len != student.max_len:
            raise config_checks.ConfigError(
                f"{where} has max_len={mcfg.max_len}; the student's is {student.max_len}."
            )
        if model.is_causal != student.is_causal:
            raise config_checks.ConfigError(
                f"{where} is {mcfg.name!r} and the student {type(student).__name__}: an "
                "ensemble's teachers must score the student's windows (all next-item models "
                "or all masked-item models)."
            )
        p, s = workdir_lib.load_best_params(model, config, mesh, directory)
        mods.append(model)
        params.append(p)
        shardings.append(s)
    ens = Ensemble(tuple(mods), parse_weights(config, len(names)), tuple(names))
    return ens, tuple(params), tuple(shardings)


def scorer(ensemble: Ensemble, params: tuple, shardings: tuple) -> Scorer:
    """The ensemble as a Scorer: log p_ens at the last window position."""
    columns = ensemble.num_items + 1

    def score_fn(params, inputs, users=None):
        extra = {} if users is None else {"users": users}
        hidden = tuple(
            m.apply({"params": p}, inputs, train=False, **extra)[:, -1]
            for m, p in zip(ensemble.models, params, strict=True)
        )
        scores = ensemble.log_probs(params, hidden)
        return scores if scores.shape[-1] == columns else scores[:, :columns]

    return Scorer(
        score_fn,
        params,
        shardings,
        ensemble.max_len,
        ensemble.is_causal,
        float(sum(model_flops_per_sequence(m) for m in ensemble.models)),
    )


def param_counts(ensemble: Ensemble, params: tuple) -> tuple[int, int]:
    counts = [m.param_counts(p) for m, p in zip(ensemble.models, params, strict=True)]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def stage_config(config: ml_collections.ConfigDict, stage: str) -> Any:
    """The config an extra teacher stage 'teacher_<n>' trains with: seed + n."""
    n = seed_offset(stage)
    if n == 0:
        return config
    out = config.copy_and_resolve_references()
    out.seed = config.seed + n
    return out
