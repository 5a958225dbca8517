"""Wall time of the distill stage per method against the scratch student's, on a quiet machine.

  LD_PRELOAD=... python -m benchmarks.stage_time --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \
      --from_workdir=/tmp/methods_beauty/seed_0/cached --steps=400 --workdir=/tmp/stage_time

`--from_workdir` holds a finished `teacher` stage (and `soft_labels`, for
'cached'); both are linked into a fresh WORKDIR/<method>/ per method, which
then trains its student stage for `--steps` steps with one validation pass at
the end on `--valid_users` users (so the figure is the training steps). Run
from the repository root with nothing else on the machine: the figures are
seconds. Prints one JSON line per method and each one's seconds per step
against the scratch stage's, in the order given (`scratch` first).
"""

import copy
import json
import os
import shutil
import sys
from collections.abc import Sequence

from absl import flags

from benchmarks import common
from benchmarks.methods import link_stage, parse_method
from distill_jax import pipeline
from distill_jax import workdir as workdir_lib


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    common.define_config(flag_values, argv)
    flags.DEFINE_string(
        "methods",
        "scratch,soft,cached",
        "scratch and distillation methods.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("steps", 400, "Training steps per stage.", flag_values=flag_values)
    flags.DEFINE_integer(
        "valid_users", 512, "Users of the one validation pass.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "from_workdir",
        None,
        "A workdir with finished teacher (and soft_labels).",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "workdir", None, "Where the timed stages run.", required=True, flag_values=flag_values
    )


def main(argv: Sequence[str]) -> None:
    args = common.parse_flags(argv, define_flags, __doc__)
    common.log_progress()
    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        config = copy.deepcopy(args.config)
        for m in (config.student,):
            m.num_steps = args.steps
            m.warmup_steps = min(m.warmup_steps, args.steps // 10)
        config.eval.every_steps = config.checkpoint.every_steps = args.steps
        config.eval.max_valid_users = args.valid_users
        config.eval.patience = 0
        stage = "student_scratch"
        if name != "scratch":
            method, hidden = parse_method(name)
            config.distill.method = method
            if hidden:
                config.distill.hidden_weight = 1.0
            stage = "student_kd"
        config.stages = stage
        wd = os.path.join(args.workdir, name)
        shutil.rmtree(wd, ignore_errors=True)
        link_stage(os.path.join(args.from_workdir, "teacher"), os.path.join(wd, "teacher"))
        if config.distill.method == "cached" and stage == "student_kd":
            os.symlink(
                os.path.abspath(os.path.join(args.from_workdir, "soft_labels")),
                os.path.join(wd, "soft_labels"),
            )
        pipeline.run(config, wd)
        r = workdir_lib.read_json(os.path.join(wd, stage, "result.json"))
        row = {"method": name, "steps": r["steps_run"], "train_seconds": r["train_seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["train_seconds"] / rows[0]["steps"]
    for row in rows:
        per = row["train_seconds"] / row["steps"]
        print(
            f"- {row['method']}: {1000 * per:.1f} ms/step, {per / base:.2f} x {rows[0]['method']}"
        )


if __name__ == "__main__":
    main(sys.argv)
