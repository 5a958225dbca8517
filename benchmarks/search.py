"""Equal-size hyperparameter search for the distilled and the scratch student.

  python -m benchmarks.search --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \
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

`--seeds=0,1,2` trains every point on each seed (`config.seed`; trials in
WORKDIR/STAGE/POINT/seed_S) and ranks the points by their MEAN validation
NDCG@10 over the seeds, so a choice is not made on one seed's noise. A
`{seed}` in `--teacher_workdir` gives each seed its own teacher (e.g.
`--teacher_workdir=runs/quality/seed_{seed}`, the workdirs quality.py
writes); without it every seed distils the same teacher. A point that has
not finished on every seed is listed but never chosen.

  python -m benchmarks.search --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \
      --teacher_workdir=/tmp/quality_beauty/seed_{seed} --seeds=0,1,2 \
      --grid=distill.temperature=0.5,1.0 --stages=student_kd --workdir=/tmp/search_t

Run from the repository root. `--config` and its `--config.KEY=VALUE`
overrides (settings every point shares) are read as by distill_jax.main. A
`--grid=KEY=V1,V2,...` lists a key's values, split at the commas outside
brackets (`--grid=eval.ks=(5,10),(10,20)` is two points); each value is then
parsed and applied exactly as `--config.KEY=V` would be (the field's own type;
booleans true/false; tuples as Python literals), on top of the overrides.
"""

import copy
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence

import ml_collections
from absl import flags

from benchmarks import common
from distill_jax import config_lib, pipeline

METRIC = "ndcg@10"


def split_values(text: str) -> list[str]:
    """`V1,V2,...` split at the commas outside brackets, so a tuple stays whole."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`--grid=KEY=V1,V2,...` items as (KEY, [V1, V2, ...]), the values still text."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid={item!r}: expected KEY=V1,V2,...")
        grid.append((key, split_values(values)))
    return grid


def _point_name(point: Mapping[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "default"


def point_config(
    config: ml_collections.ConfigDict, point: Mapping[str, str]
) -> ml_collections.ConfigDict:
    """A copy of `config` with a grid point's values applied as `--config.KEY=V`.

    A `student.X` value is the point for BOTH students: it also replaces the
    scratch student's own setting (config.student_scratch.X), if it has one,
    with the parsed value in the scratch field's type (`exclude_history=true`
    there is 1: its -1 means "config.student's").
    """
    config = common.apply_overrides(config, point, flag="--grid")
    for key in point:
        section, _, name = key.partition(".")
        if section == "student" and name in config_lib.SCRATCH_KEYS:
            scratch = config.student_scratch
            scratch[name] = type(scratch[name])(config.student[name])
    return config


def _link(src: str, dst: str) -> None:
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(src), dst)


def parse_seeds(text: str) -> list[int | None]:
    """--seeds=0,1,2 as ints; empty: the config's own seed (one trial per point)."""
    if not text.strip():
        return [None]
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--seeds={text!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={text!r}: a seed is listed twice")
    return seeds


def teacher_workdir(template: str, seed: int | None) -> str:
    """--teacher_workdir for one seed: `{seed}` filled in where the template has one."""
    if "{seed}" not in template:
        return template
    if seed is None:
        raise ValueError(
            f"--teacher_workdir={template}: has a {{seed}} placeholder but no --seeds was given"
        )
    return template.replace("{seed}", str(seed))


def summarise(rows: list[dict], keys: list[str], seeds: list[int | None]) -> list[dict]:
    """One line per (stage, point): mean validation and test METRIC over the
    seeds and whether it is the stage's choice (the best mean validation
    among the points finished on every seed)."""
    lines = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        for point in dict.fromkeys(tuple(r[k] for k in keys) for r in mine):
            runs = [r for r in mine if tuple(r[k] for k in keys) == point]
            valid = [r["valid_" + METRIC] for r in runs]
            lines.append(
                {
                    "stage": stage,
                    "point": dict(zip(keys, point, strict=True)),
                    "valid": valid,
                    "valid_mean": sum(valid) / len(valid),
                    "test_mean": sum(r["test_" + METRIC] for r in runs) / len(runs),
                    "best_steps": [r["best_step"] for r in runs],
                    "train_seconds": round(sum(r["train_seconds"] for r in runs), 1),
                    "complete": {r["seed"] for r in runs} == set(seeds),
                    "chosen": False,
                }
            )
        complete = [ln for ln in lines if ln["stage"] == stage and ln["complete"]]
        if complete:
            max(complete, key=lambda ln: ln["valid_mean"])["chosen"] = True
    return lines


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """search.py's flags: `--config` (and overrides), the grid, stages, seeds, workdirs."""
    common.define_config(flag_values, argv)
    flags.DEFINE_multi_string(
        "grid", [], "KEY=V1,V2,...: a key's values; repeatable.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "stages", "student_kd,student_scratch", "Stages trained per point.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "teacher_workdir",
        None,
        "Workdir with a finished teacher; {seed}: per seed.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "workdir", None, "Trials in WORKDIR/STAGE/POINT.", required=True, flag_values=flag_values
    )
    flags.DEFINE_string(
        "seeds",
        "",
        "e.g. 0,1,2: every point on each seed, ranked by the mean; empty: config.seed.",
        flag_values=flag_values,
    )


def main(argv: Sequence[str]) -> None:
    """Trains every stage on every point (and seed), then prints the rows and the table."""
    args = common.parse_flags(argv, define_flags, __doc__)
    common.log_progress()
    seeds = parse_seeds(args.seeds)
    teacher_workdirs = {seed: teacher_workdir(args.teacher_workdir, seed) for seed in seeds}
    for seed, workdir in teacher_workdirs.items():
        teacher_dir = os.path.join(workdir, "teacher")
        if not os.path.exists(os.path.join(teacher_dir, "result.json")):
            raise FileNotFoundError(
                f"--teacher_workdir={args.teacher_workdir}"
                + ("" if seed is None else f" (seed {seed})")
                + f": no finished teacher stage ({teacher_dir}/result.json missing)."
            )
    grid = parse_grid(args.grid)
    points = [
        dict(zip([k for k, _ in grid], values, strict=True))
        for values in itertools.product(*[v for _, v in grid])
    ]
    # Every point is parsed before the first trial trains, so a bad value
    # stops the search at once rather than hours in.
    point_configs = [point_config(args.config, point) for point in points]
    rows = []
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    # Points outer, then seeds, stages inner: a search cut short still
    # compares the students on the same points and seeds.
    for point, base in zip(points, point_configs, strict=True):
        for seed in seeds:
            for stage in stages:
                config = copy.deepcopy(base)
                if seed is not None:
                    config.seed = seed
                config.stages = stage
                trial = os.path.join(args.workdir, stage, _point_name(point))
                if seed is not None:
                    trial = os.path.join(trial, f"seed_{seed}")
                os.makedirs(trial, exist_ok=True)
                teacher = teacher_workdirs[seed]
                _link(os.path.join(teacher, "teacher"), os.path.join(trial, "teacher"))
                data_dir = os.path.join(teacher, "data")
                if os.path.isdir(data_dir):
                    _link(data_dir, os.path.join(trial, "data"))
                pipeline.run(config, trial)
                with open(os.path.join(trial, stage, "result.json")) as f:
                    result = json.load(f)
                row = {
                    "stage": stage,
                    **point,
                    "seed": seed,
                    "valid_" + METRIC: result["metrics"]["valid"][METRIC],
                    "test_" + METRIC: result["metrics"]["test"][METRIC],
                    "best_step": result["best_step"],
                    "train_seconds": round(result["train_seconds"], 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    keys = [k for k, _ in grid]
    lines = summarise(rows, keys, seeds)
    over = "" if seeds == [None] else f" (mean over seeds {','.join(map(str, seeds))})"
    print(f"\nSearch over {len(points)} points per stage; chosen by valid {METRIC}{over}.\n")
    print(
        "| stage | "
        + " | ".join(keys)
        + f" | valid {METRIC} | per seed | test {METRIC} | best step | train s | chosen |"
    )
    print("|---|" + "---:|" * (len(keys) + 6))
    for ln in lines:
        print(
            f"| {ln['stage']} | "
            + " | ".join(str(ln["point"][k]) for k in keys)
            + f" | {ln['valid_mean']:.4f} | {' / '.join(f'{v:.4f}' for v in ln['valid'])} | "
            f"{ln['test_mean']:.4f} | {' / '.join(map(str, ln['best_steps']))} | "
            f"{ln['train_seconds']} | {'**yes**' if ln['chosen'] else ''} |"
        )


if __name__ == "__main__":
    main(sys.argv)
