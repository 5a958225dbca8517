"""Top-10 recommendation latency of a workdir's finished models, in one run.

  python -m benchmarks.latency --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \
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

import json
import logging
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from benchmarks import common, trained
from distill_jax import sharding
from distill_jax.data import dataset
from distill_jax.evaluation import evaluator as evaluator_lib


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """latency.py's flags: the trained stages' (config, workdir, stage), then the timing."""
    trained.define_trained_stage_flags(flag_values, argv)
    flags.DEFINE_list(
        "batch_sizes", ["1", "256"], "Comma-separated batch sizes.", flag_values=flag_values
    )
    flags.DEFINE_integer("repeats", 20, "Timed calls per model per round.", flag_values=flag_values)
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds.", flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
    """Times every finished stage's top-10, interleaved, and prints the table."""
    args = common.parse_flags(argv, define_flags, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    config = args.config
    dirs = trained.stage_dirs(args.workdir, args.stage)
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
        model, params, shardings = trained.load_stage(
            config, stage, stage_dir, data.split.num_items, mesh
        )
        scorers[stage] = evaluator_lib.model_scorer(model, params, shardings)

    sizes = [int(b) for b in args.batch_sizes]
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
    main(sys.argv)
