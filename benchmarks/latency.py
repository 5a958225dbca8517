"""Top-10 recommendation latency of a workdir's finished models, in one run.

  python benchmarks/latency.py --config=configs/beauty.py \
      --override=data.path=../shared/datasets/amazon-beauty/Beauty.txt \
      --workdir=/tmp/beauty --repeats=50

The main job times each model when its stage finishes, so on a busy machine
the teacher and the students are timed under different loads. This script
loads the best parameters of every finished stage of `--workdir` (teacher,
student_kd, student_scratch; or `--stage NAME=DIR` for a stage that lives
elsewhere, e.g. a search trial) and times them in the same run with the main
job's own code (`Evaluator.latency`: jit of top-10 over the model's scores for
a full window of test users, one device, after a warm-up call). Models are
timed in `--rounds` interleaved rounds so that a change of load hits all of
them; the p50 and p99 are over every repeat of every round. Prints JSON lines,
then a markdown table with each model's p50 as a ratio of the teacher's.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np
from quality import load_config  # benchmarks/quality.py, beside this script

from distill_jax import pipeline, sharding
from distill_jax.data import dataset
from distill_jax.evaluation import evaluator as evaluator_lib

STAGES = ("teacher", "student_kd", "student_scratch")


def _stage_dirs(workdir: str, extra: list[str]) -> dict[str, str]:
    dirs = {s: os.path.join(workdir, s) for s in STAGES}
    for item in extra:
        name, sep, path = item.partition("=")
        if not sep or name not in STAGES:
            raise ValueError(f"--stage={item!r}: expected NAME=DIR with NAME one of {list(STAGES)}")
        dirs[name] = path
    return {s: d for s, d in dirs.items() if os.path.exists(os.path.join(d, "result.json"))}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="config file[:variants]")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE")
    p.add_argument("--workdir", required=True, help="a main-job workdir (data and stages)")
    p.add_argument("--stage", action="append", default=[], help="NAME=DIR of a finished stage")
    p.add_argument("--batch_sizes", default="1,256")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per model per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    config = load_config(args.config, args.override)
    dirs = _stage_dirs(args.workdir, args.stage)
    if "teacher" not in dirs:
        raise FileNotFoundError(
            f"--workdir={args.workdir}: no finished teacher stage (teacher/result.json); "
            "the latency ratios are against the teacher"
        )
    data = dataset.load(config, args.workdir)
    mesh = sharding.make_mesh(config.mesh)
    evaluator = evaluator_lib.Evaluator(data.split, config, mesh)
    scorers = {}
    for stage, stage_dir in dirs.items():
        key = pipeline.STAGES[stage][0]
        model = pipeline.build(config, key, data.split.num_items)
        params, shardings = pipeline.load_best_params(model, config, mesh, stage_dir)
        scorers[stage] = evaluator_lib.model_scorer(model, params, shardings)

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    times = {(s, b): [] for s in scorers for b in sizes}
    for _ in range(args.rounds):
        for b in sizes:
            for stage, scorer in scorers.items():
                times[(stage, b)].extend(evaluator.latency_samples(scorer, b, args.repeats))

    rows = []
    for stage in scorers:
        row = {"stage": stage, "dir": dirs[stage]}
        for b in sizes:
            t = np.asarray(times[(stage, b)])
            row[f"b{b}_p50_ms"] = float(np.percentile(t, 50))
            row[f"b{b}_p99_ms"] = float(np.percentile(t, 99))
            row[f"b{b}_p50_vs_teacher"] = row[f"b{b}_p50_ms"] / float(
                np.percentile(times[("teacher", b)], 50)
            )
        rows.append(row)
        print(json.dumps(row))
    header = "| model | " + " | ".join(f"b={b} p50 / p99 ms | b={b} p50 / teacher" for b in sizes)
    print(header + " |")
    print("|---|" + "---:|---:|" * len(sizes))
    for r in rows:
        cells = []
        for b in sizes:
            cells.append(f"{r[f'b{b}_p50_ms']:.2f} / {r[f'b{b}_p99_ms']:.2f}")
            cells.append(f"{r[f'b{b}_p50_vs_teacher']:.3f}")
        print(f"| {r['stage']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
