"""Reading back a workdir's trained stages: their flags, directories and models."""

import os
from collections.abc import Sequence

import ml_collections
from absl import flags

from benchmarks import common
from distill_jax import pipeline

# The stages whose trained models the scripts read back, in report order.
STAGES = ("teacher", "student_kd", "student_scratch")


def define_trained_stage_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """The flags of a script that reads back a workdir's trained stages.

    `--config` (and overrides) as the workdir was trained with, `--workdir`
    (a main-job workdir: data and stages) and `--stage=NAME=DIR` (repeatable)
    for a finished stage that lives elsewhere, e.g. a search trial.
    """
    common.define_config(flag_values, argv)
    flags.DEFINE_string(
        "workdir",
        None,
        "A main-job workdir (data and stages).",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_multi_string(
        "stage",
        [],
        f"NAME=DIR of a finished stage, NAME one of {list(STAGES)}; repeatable.",
        flag_values=flag_values,
    )


def stage_dirs(workdir: str, extra: Sequence[str]) -> dict[str, str]:
    """The finished stages to read: `workdir`'s own, or `--stage=NAME=DIR` ones.

    Args:
      workdir: a main-job workdir; its stage NAME lives in `workdir/NAME`.
      extra: `NAME=DIR` items that replace a stage's directory.

    Returns:
      Stage name to directory, in `STAGES` order, for the stages whose
      directory holds a `result.json` (a finished stage).

    Raises:
      ValueError: an item that is not `NAME=DIR` with NAME in `STAGES`.
    """
    dirs = {s: os.path.join(workdir, s) for s in STAGES}
    for item in extra:
        name, sep, path = item.partition("=")
        if not sep or name not in STAGES:
            raise ValueError(f"--stage={item!r}: expected NAME=DIR with NAME one of {list(STAGES)}")
        dirs[name] = path
    return {s: d for s, d in dirs.items() if os.path.exists(os.path.join(d, "result.json"))}


def load_stage(config: ml_collections.ConfigDict, stage: str, stage_dir: str, num_items: int, mesh):
    """The model of a finished stage and its best parameters.

    Args:
      config: the config the stage was trained with.
      stage: a pipeline stage name (`teacher`, `student_kd`, ...).
      stage_dir: the stage's directory (holding its checkpoints).
      num_items: the catalogue size V of the data.
      mesh: the device mesh the parameters are placed on.

    Returns:
      `(model, params, shardings)`.
    """
    key = pipeline.STAGES[stage][0]
    model = pipeline.build(config, key, num_items)
    params, shardings = pipeline.load_best_params(model, config, mesh, stage_dir)
    return model, params, shardings
