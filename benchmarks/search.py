"""Equal-size hyperparameter search for the distilled and the scratch student.

  python benchmarks/search.py --config=configs/beauty.py \
      --override=data.path=../shared/datasets/amazon-beauty/Beauty.txt \
      --teacher_workdir=/tmp/beauty_a \
      --grid=student.learning_rate=1e-3,3e-3 --grid=student.dropout=0.1,0.3 \
      --workdir=/tmp/search_beauty

Every stage given by `--stages` (default: student_kd and student_scratch)
trains once per point of the SAME grid (the cartesian product of the `--grid`
values), so neither student gets a bigger search than the other. Points are
ranked by VALIDATION NDCG@10 (the test split is never looked at to choose);
the table shows test figures of each point too, for the record. Distillation's
own settings (temperature, alpha) are not searched: they stay as the config
sets them, so the scratch baseline is not out-searched. A grid over
`student.learning_rate`, `student.dropout` or `student.weight_decay` also
sets the scratch student's own value (`config.student_scratch`), so each
point means the same for both students; the chosen points go into the config
as `config.student` (both) and `config.student_scratch` (where scratch chose
differently).

The teacher is trained once: `--teacher_workdir` is a workdir whose `teacher`
stage finished (e.g. a main-job run); each trial links to it. Trials live in
WORKDIR/STAGE/POINT and are resumable (finished trials are read back); points
run in grid order, each for every stage, so a search cut short still compares
the students on the same points.
"""

import argparse
import itertools
import json
import logging
import os
import sys

from quality import load_config  # benchmarks/quality.py, beside this script

from distill_jax import config_lib, pipeline

METRIC = "ndcg@10"


def _grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid={item!r}: expected KEY=V1,V2,...")
        grid.append((key, values.split(",")))
    return grid


def _point_name(point: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "default"


def _point_overrides(point: dict[str, str]) -> list[str]:
    """KEY=VALUE overrides of a grid point.

    A `student.X` value is the point for BOTH students: it also replaces the
    scratch student's own setting (config.student_scratch.X), if it has one.
    """
    out = [f"{k}={v}" for k, v in point.items()]
    for k, v in point.items():
        section, _, name = k.partition(".")
        if section == "student" and name in config_lib.SCRATCH_KEYS:
            out.append(f"student_scratch.{name}={v}")
    return out


def _link(src: str, dst: str) -> None:
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(src), dst)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="FILE[:variant]")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE, repeatable")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,..., repeatable")
    p.add_argument("--stages", default="student_kd,student_scratch")
    p.add_argument("--teacher_workdir", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING)
    logging.getLogger("distill_jax").setLevel(logging.INFO)
    teacher_dir = os.path.join(args.teacher_workdir, "teacher")
    if not os.path.exists(os.path.join(teacher_dir, "result.json")):
        raise FileNotFoundError(
            f"--teacher_workdir={args.teacher_workdir}: no finished teacher stage "
            f"({teacher_dir}/result.json missing)."
        )
    grid = _grid(args.grid)
    points = [
        dict(zip([k for k, _ in grid], values, strict=True))
        for values in itertools.product(*[v for _, v in grid])
    ]
    rows = []
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    # Points outer, stages inner: a search cut short still compares the
    # students on the same points.
    for point in points:
        for stage in stages:
            config = load_config(args.config, args.override + _point_overrides(point))
            config.stages = stage
            trial = os.path.join(args.workdir, stage, _point_name(point))
            os.makedirs(trial, exist_ok=True)
            _link(teacher_dir, os.path.join(trial, "teacher"))
            data_dir = os.path.join(args.teacher_workdir, "data")
            if os.path.isdir(data_dir):
                _link(data_dir, os.path.join(trial, "data"))
            pipeline.run(config, trial)
            with open(os.path.join(trial, stage, "result.json")) as f:
                result = json.load(f)
            row = {
                "stage": stage,
                **point,
                "valid_" + METRIC: result["metrics"]["valid"][METRIC],
                "test_" + METRIC: result["metrics"]["test"][METRIC],
                "best_step": result["best_step"],
                "train_seconds": round(result["train_seconds"], 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k, _ in grid]
    print(f"\nSearch over {len(points)} points per stage; chosen by valid {METRIC}.\n")
    print(
        "| stage | "
        + " | ".join(keys)
        + f" | valid {METRIC} | test {METRIC} | best step | train s | chosen |"
    )
    print("|---|" + "---:|" * (len(keys) + 5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        best = max(mine, key=lambda r: r["valid_" + METRIC])
        for r in mine:
            print(
                f"| {stage} | "
                + " | ".join(str(r[k]) for k in keys)
                + f" | {r['valid_' + METRIC]:.4f} | {r['test_' + METRIC]:.4f} | "
                f"{r['best_step']} | {r['train_seconds']} | {'**yes**' if r is best else ''} |"
            )


if __name__ == "__main__":
    main()
