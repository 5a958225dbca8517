"""Distillation methods side by side: one table per data set.

  python -m benchmarks.methods --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \
      --methods=soft,hard,ranking,cached,ensemble,soft+hidden --seeds=0,1,2 \
      --leaders=soft,cached,ensemble --workdir=/tmp/methods_beauty
  python -m benchmarks.methods --config=configs/synthetic.py:tiny --seeds=0 --workdir=/tmp/m

Run from the repository root. `--config` and its `--config.KEY=VALUE`
overrides are read as by distill_jax.main; every method starts from that
config and changes only what names it:

  soft, hard, ranking, cached, ensemble   config.distill.method
  <method>+hidden                         and config.distill.hidden_weight=--hidden_weight

Layout (resumable: finished stages are skipped). Per seed, WORKDIR/seed_N/base
runs popularity, the teacher and the student trained alone (student_scratch);
each method runs in WORKDIR/seed_N/<method> with the base's finished teacher
linked in, plus what the method needs: the soft_labels stage (cached), the
extra teachers and the ensemble stage (ensemble), then student_kd.
`--teacher_dir=PATH` (with `{seed}` in it) links an already trained teacher
stage instead of training one. With `--leaders`, the other methods run on the
first seed only.

Output: one JSON line per method, then a markdown table: test NDCG@10, HR@10,
tail NDCG@10, coverage@10, top-10 agreement with the student's teacher, and
the distill stage's wall time against the scratch student's stage (with the
soft_labels stage added for 'cached'), mean ± std over the seeds run.
"""

import copy
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from benchmarks import common
from distill_jax import pipeline
from distill_jax import workdir as workdir_lib
from distill_jax.losses import TEACHER_TARGETS

COLUMNS = ("ndcg@10", "hr@10", "tail_ndcg@10", "coverage@10")
BASE_STAGES = "popularity,teacher,student_scratch"


def parse_method(name: str) -> tuple[str, bool]:
    """'<method>[+hidden]' -> (method, hidden)."""
    method, _, extra = name.partition("+")
    if method not in TEACHER_TARGETS or extra not in ("", "hidden"):
        raise ValueError(
            f"--methods: {name!r} is not a method; expected one of {TEACHER_TARGETS}, "
            "optionally with '+hidden'."
        )
    return method, extra == "hidden"


def method_config(config, name: str, hidden_weight: float):
    """The config of method `name`: the method, its stages, hidden matching."""
    method, hidden = parse_method(name)
    c = copy.deepcopy(config)
    c.distill.method = method
    if hidden:
        c.distill.hidden_weight = hidden_weight
    stages = ["student_kd"]
    if method == "cached":
        stages.insert(0, "soft_labels")
    if method == "ensemble":
        members = [m.strip() for m in c.distill.ensemble_teachers.split(",") if m.strip()]
        extra = [m for m in members if m != "teacher" and "/" not in m]
        stages = extra + ["ensemble"] + stages
    c.stages = ",".join(stages)
    return c


def link_stage(target: str, link: str) -> None:
    """Links finished stage directory `target` in as `link` (kept if already there)."""
    if os.path.islink(link) or os.path.exists(link):
        return
    if not os.path.exists(os.path.join(target, "result.json")):
        raise FileNotFoundError(f"{target} is not a finished stage (no result.json).")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.abspath(target), link)


def run_seed(config, seed: int, methods: list[str], workdir: str, args) -> dict:
    """Every method's student_kd result (and the base's) for one seed."""
    config = copy.deepcopy(config)
    config.seed = seed
    base = os.path.join(workdir, f"seed_{seed}", "base")
    if args.teacher_dir:
        link_stage(args.teacher_dir.format(seed=seed), os.path.join(base, "teacher"))
    base_config = copy.deepcopy(config)
    base_config.stages = BASE_STAGES
    pipeline.run(base_config, base)
    out = {
        "base": {
            s: workdir_lib.read_json(os.path.join(base, s, "result.json"))
            for s in BASE_STAGES.split(",")
        },
    }
    for name in methods:
        mdir = os.path.join(workdir, f"seed_{seed}", name)
        link_stage(os.path.join(base, "teacher"), os.path.join(mdir, "teacher"))
        pipeline.run(method_config(config, name, args.hidden_weight), mdir)
        result = {
            "student_kd": workdir_lib.read_json(os.path.join(mdir, "student_kd", "result.json"))
        }
        for extra in ("soft_labels", "ensemble"):
            path = os.path.join(mdir, extra, "result.json")
            if os.path.exists(path):
                result[extra] = workdir_lib.read_json(path)
        out[name] = result
    return out


def _stats(values: list[float]) -> dict:
    v = np.array(values, float)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "n": len(v),
    }


def summarise(runs: dict[int, dict], methods: list[str]) -> list[dict]:
    """One row per model: the base's scratch student and teacher, then each method."""
    rows = []
    seeds = sorted(runs)

    def row(name, results, seconds):
        r = {"model": name, "seeds": [s for s, _ in results], "params": results[0][1]["params"]}
        for c in COLUMNS:
            r[c] = _stats([x["metrics"]["test"][c] for _, x in results])
        agree = [
            x["agreement_with_teacher"]["test"]["top10_overlap"]
            for _, x in results
            if "agreement_with_teacher" in x
        ]
        r["agreement@10"] = _stats(agree) if agree else None
        r["stage_vs_scratch"] = _stats(seconds) if seconds else None
        return r

    for stage in ("teacher", "student_scratch"):
        results = [(s, runs[s]["base"][stage]) for s in seeds]
        seconds = [1.0] * len(seeds) if stage == "student_scratch" else []
        rows.append(row(stage, results, seconds))
    for name in methods:
        have = [s for s in seeds if name in runs[s]]
        results = [(s, runs[s][name]["student_kd"]) for s in have]
        ratios = []
        for s in have:
            spent = runs[s][name]["student_kd"]["train_seconds"]
            if "soft_labels" in runs[s][name]:
                spent += runs[s][name]["soft_labels"]["seconds"]
            ratios.append(spent / runs[s]["base"]["student_scratch"]["train_seconds"])
        r = row(f"student_kd ({name})", results, ratios)
        r["train_seconds"] = [x["train_seconds"] for _, x in results]
        r["steps_run"] = [x["steps_run"] for _, x in results]
        if "soft_labels" in runs[have[0]][name]:
            r["soft_labels_seconds"] = [runs[s][name]["soft_labels"]["seconds"] for s in have]
        if "ensemble" in runs[have[0]][name]:
            e = [(s, runs[s][name]["ensemble"]) for s in have]
            rows.append(row(f"ensemble ({name})", e, []))
        rows.append(r)
    return rows


def _cell(stat, digits=4) -> str:
    if stat is None:
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | seeds | params | "
        + " | ".join(COLUMNS)
        + " | agreement@10 | stage s / scratch s |"
    )
    lines = [head, "|---|---|---:|" + "---:|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [_cell(r[c]) for c in COLUMNS]
        lines.append(
            f"| {r['model']} | {','.join(map(str, r['seeds']))} | {r['params']:,} | "
            + " | ".join(cells)
            + f" | {_cell(r['agreement@10'], 3)} | {_cell(r['stage_vs_scratch'], 2)} |"
        )
    return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    common.define_config(flag_values, argv)
    flags.DEFINE_string(
        "methods",
        "soft,hard,ranking,cached,ensemble,soft+hidden",
        "Comma-separated methods, each optionally '+hidden'.",
        flag_values=flag_values,
    )
    flags.DEFINE_string("seeds", "0", "Comma-separated seeds.", flag_values=flag_values)
    flags.DEFINE_string(
        "leaders",
        "",
        "Methods run on every seed; the others on the first only. '' = every method.",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "hidden_weight", 1.0, "config.distill.hidden_weight of '+hidden'.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "teacher_dir",
        "",
        "A finished teacher stage to link in per seed instead of training one; {seed} is replaced.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "workdir", None, "Where the runs go.", required=True, flag_values=flag_values
    )


def main(argv: Sequence[str]) -> None:
    args = common.parse_flags(argv, define_flags, __doc__)
    common.log_progress()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        parse_method(m)
    seeds = [int(s) for s in args.seeds.split(",")]
    leaders = [m.strip() for m in args.leaders.split(",") if m.strip()] or methods
    unknown = [m for m in leaders if m not in methods]
    if unknown:
        sys.exit(f"--leaders {unknown} are not among --methods {methods}")
    runs = {}
    for i, seed in enumerate(seeds):
        run_methods = methods if i == 0 else [m for m in methods if m in leaders]
        runs[seed] = run_seed(args.config, seed, run_methods, args.workdir, args)
    rows = summarise(runs, methods)
    for r in rows:
        print(json.dumps(r))
    print()
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv)
