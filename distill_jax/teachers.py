"""What a distilled student learns from, by `config.distill.method`.

* 'soft', 'hard', 'ranking': the finished `teacher` stage, in memory;
* 'ensemble': the teachers of `config.distill.ensemble_teachers`
  (`train/ensemble.py`), in memory;
* 'cached': the soft labels the `soft_labels` stage stored
  (`data/soft_labels.py`); no teacher in memory while the student trains
  (its params are read once for `config.distill.init_from_teacher`).

The main job's student_kd stage and the compress stage's fine-tuning of it
both go through `distill_source`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from distill_jax import workdir as workdir_lib
from distill_jax.data import soft_labels as soft_labels_lib
from distill_jax.evaluation import evaluator as evaluator_lib
from distill_jax.train import ensemble as ensemble_lib
from distill_jax.train import loop

TEACHER_STAGE = "teacher"


@dataclasses.dataclass
class DistillSource:
    """`loop.train_stage`'s teacher, soft_labels and teacher_tables arguments."""

    teacher: loop.Teacher | None = None
    soft_labels: soft_labels_lib.SoftLabels | None = None
    teacher_tables: Any = None

    def kwargs(self) -> dict:
        # Not dataclasses.asdict: it would deep-copy the teacher's params.
        return {
            "teacher": self.teacher,
            "soft_labels": self.soft_labels,
            "teacher_tables": self.teacher_tables,
        }


def _need(workdir: str, stage: str, user: str) -> str:
    directory = workdir_lib.stage_dir(workdir, stage)
    if not workdir_lib.finished(workdir, stage):
        raise FileNotFoundError(
            f"Stage {user!r} needs a finished {stage!r} stage in {directory}; add '{stage}' "
            f"to config.stages before '{user}'."
        )
    return directory


def single_teacher(config, catalogue, mesh, workdir: str, user: str) -> loop.Teacher:
    """The finished 'teacher' stage, loaded (`catalogue`: as for `workdir.build`)."""
    directory = _need(workdir, TEACHER_STAGE, user)
    model = workdir_lib.build(config, "teacher", catalogue, mesh=mesh)
    params, shardings = workdir_lib.load_best_params(model, config, mesh, directory)
    return loop.Teacher(model=model, params=params, shardings=shardings)


def ensemble_teacher(config, catalogue, mesh, workdir: str, student) -> loop.Teacher:
    ens, params, shardings = ensemble_lib.load(config, workdir, catalogue, mesh, student)
    return loop.Teacher(model=ens, params=params, shardings=shardings)


def soft_labels_fingerprint(config: ml_collections.ConfigDict, split, workdir: str) -> str:
    directory = _need(workdir, TEACHER_STAGE, "soft_labels")
    return soft_labels_lib.fingerprint(config, split.train, directory)


def distill_source(
    config: ml_collections.ConfigDict, split, mesh, workdir: str, student, user: str
) -> DistillSource:
    """What stage `user` (a distilled student of model `student`) learns from."""
    method = config.distill.method
    if method == "ensemble":
        return DistillSource(teacher=ensemble_teacher(config, split, mesh, workdir, student))
    if method != "cached":
        return DistillSource(teacher=single_teacher(config, split, mesh, workdir, user))
    fp = soft_labels_fingerprint(config, split, workdir)
    labels = soft_labels_lib.SoftLabels(soft_labels_lib.directory(workdir), fp)
    tables = None
    if config.distill.init_from_teacher != "none":
        tables = single_teacher(config, split, mesh, workdir, user).params
    return DistillSource(soft_labels=labels, teacher_tables=tables)


def teacher_scorer(config, split, mesh, workdir: str, student, distilled: bool):
    """The scorer a student's agreement is measured against, or None.

    The distilled student's with the 'ensemble' method: the ensemble; every
    other student's: the 'teacher' stage, when it has finished.
    """
    if distilled and config.distill.method == "ensemble":
        t = ensemble_teacher(config, split, mesh, workdir, student)
        return ensemble_lib.scorer(t.model, t.params, t.shardings)
    if not workdir_lib.finished(workdir, TEACHER_STAGE):
        return None
    t = single_teacher(config, split, mesh, workdir, "agreement")
    return evaluator_lib.model_scorer(t.model, t.params, t.shardings)


def write_soft_labels(config, data, mesh, workdir: str) -> dict:
    """The soft_labels stage: the teacher over every training window, stored once."""
    from distill_jax.data.pipeline import TrainBatches

    split = data.split
    teacher = single_teacher(config, split, mesh, workdir, "soft_labels")
    student = workdir_lib.build(config, "student", split, "student_kd", mesh)
    if not student.is_causal:
        raise ValueError(
            f"config.distill.method='cached' needs a next-item student, not "
            f"student.name={config.student.name!r}: a masked-item student draws new "
            "masked slots every epoch, so there is no fixed set of slots to label once."
        )
    mcfg = config.student
    batches = TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=mcfg.max_len,
        batch_size=mcfg.batch_size,
        causal=True,
        mask_prob=mcfg.mask_prob,
        seed=config.seed,
        length_buckets=False,
        last_item_slot=config.distill.last_item_slot,
        users=split.user_ids(),
    )
    fp = soft_labels_fingerprint(config, split, workdir)
    root = soft_labels_lib.directory(workdir)
    os.makedirs(root, exist_ok=True)
    result_path = os.path.join(root, "result.json")
    if os.path.exists(result_path):
        done = workdir_lib.read_json(result_path)
        if done.get("fingerprint") == fp and soft_labels_lib.is_current(root, fp):
            return done
    summary = soft_labels_lib.write(config, batches, teacher.model, teacher.params, fp, root, mesh)
    workdir_lib.write_json(result_path, summary)
    return summary
