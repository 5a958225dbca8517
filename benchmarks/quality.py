"""Quality table: the main job for several seeds, mean ± std per model.

  python -m benchmarks.quality --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \
      --seeds=0,1,2 --workdir=/tmp/quality_beauty
  python -m benchmarks.quality --config=configs/synthetic.py:tiny --seeds=0,1 --workdir=/tmp/q

Run from the repository root. `--config` and its `--config.KEY=VALUE`
overrides are read as by distill_jax.main; `config.seed` is set per seed.

Each seed runs in WORKDIR/seed_N (resumable: finished stages are skipped), then
one JSON line per model and a markdown table of params, HR@10, NDCG@10,
coverage@10, tail NDCG@10 and top-10 latency (batch 256) on the test split,
then the ratios the distillation result is judged by (student_kd against the
teacher and against student_scratch), seed by seed and mean ± std. The
report's figures (distill_jax/evaluation/plots.py), with error bars of one
standard deviation over the seeds, go to WORKDIR/plots/.

A click config (`config.task='click'`, e.g. configs/ml100k_click.py) gets the
click table instead: AUC, log loss and ECE on the test split and its cold
slices per model (the logistic baseline, teacher, student_kd,
student_scratch), then the checks the click distillation is judged by, seed
by seed: the share of the teacher's AUC gain over the student trained alone
that the distilled student closes, and the distilled student's log loss and
ECE against the student trained alone.
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
from distill_jax.evaluation import plots

COLUMNS = ("hr@10", "ndcg@10", "coverage@10", "tail_ndcg@10")
# (numerator, denominator, quantity): the comparisons the distillation result
# is judged by, computed seed by seed and then averaged.
RATIOS = (
    ("student_kd", "teacher", "ndcg@10"),
    ("student_kd", "student_scratch", "ndcg@10"),
    ("student_kd", "teacher", "latency_b256"),
)


def _quantity(model_report: dict, quantity: str) -> float:
    if quantity == "latency_b256":
        return model_report["cost"]["latency_top10"]["batch_256"]["p50_ms"]
    return model_report["metrics"]["test"][quantity]


def ratios(reports: list[dict]) -> list[dict]:
    """Per-seed ratios of RATIOS over the reports that hold both models."""
    out = []
    for num, den, quantity in RATIOS:
        values = [
            _quantity(r["models"][num], quantity) / _quantity(r["models"][den], quantity)
            for r in reports
            if num in r["models"] and den in r["models"]
        ]
        if values:
            v = np.array(values)
            std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            out.append(
                {
                    "ratio": f"{num} / {den} {quantity}",
                    "per_seed": [float(x) for x in v],
                    "mean": float(v.mean()),
                    "std": std,
                }
            )
    return out


CLICK_COLUMNS = ("auc", "logloss", "ece")
CLICK_SLICES = ("test", "cold_users", "cold_items")


def _mean_std(values: list[float | None]) -> str:
    v = np.array([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.4f} ± {(v.std(ddof=1) if len(v) > 1 else 0.0):.4f}"


def click_checks(reports: list[dict]) -> list[dict]:
    """Per seed: the share of the AUC gap closed, and log loss / ECE against scratch."""
    out = []
    for r in reports:
        m = {
            k: r["models"][k]["metrics"]["test"]
            for k in ("teacher", "student_kd", "student_scratch")
        }
        gap = m["teacher"]["auc"] - m["student_scratch"]["auc"]
        row = {}
        if "logistic" in r["models"]:
            row["teacher_minus_logistic"] = (
                m["teacher"]["auc"] - r["models"]["logistic"]["metrics"]["test"]["auc"]
            )
        out.append(
            row
            | {
                "teacher_auc_gain": gap,
                "gap_closed": (m["student_kd"]["auc"] - m["student_scratch"]["auc"]) / gap
                if gap > 0
                else None,
                "kd_logloss_minus_scratch": m["student_kd"]["logloss"]
                - m["student_scratch"]["logloss"],
                "kd_ece_minus_scratch": m["student_kd"]["ece"] - m["student_scratch"]["ece"],
            }
        )
    return out


def click_table(reports: list[dict], seeds: list[int]) -> list[str]:
    """The click task's table (mean ± std over seeds) and its checks."""
    d = reports[0]["dataset"]
    lines = [
        f"{d['name']}: {json.dumps(d['counts'])}; split by time; mean ± std over seeds {seeds}",
        "",
    ]
    header = ["model", "params"] + [f"{s} {c}" for s in CLICK_SLICES for c in CLICK_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, first in reports[0]["models"].items():
        cells = [name, f"{first['params']:,}"]
        for s in CLICK_SLICES:
            for c in CLICK_COLUMNS:
                cells.append(_mean_std([r["models"][name]["metrics"][s].get(c) for r in reports]))
        lines.append("| " + " | ".join(cells) + " |")
    if all(k in reports[0]["models"] for k in ("teacher", "student_kd", "student_scratch")):
        checks = click_checks(reports)
        lines.append("")
        for key in checks[0]:
            per_seed = [c[key] for c in checks]
            shown = ", ".join("-" if x is None else f"{x:.4f}" for x in per_seed)
            lines.append(f"- {key}: {_mean_std(per_seed)} (per seed: {shown})")
    return lines


def merge(reports: list[dict], seeds: list[int], workdirs: list[str]) -> None:
    """Adds to each seed's report the models that the same seed's reports in `workdirs` add."""
    for workdir in workdirs:
        for seed, report in zip(seeds, reports, strict=True):
            path = os.path.join(workdir, f"seed_{seed}", "report.json")
            if not os.path.exists(path):
                sys.exit(
                    f"--merge_from={workdir}: {path} does not exist (seed {seed} not run there)"
                )
            with open(path) as f:
                other = json.load(f)
            for name, model in other["models"].items():
                report["models"].setdefault(name, model)


def missing_reports(seeds: list[int], reports: list[dict | None], workdir: str) -> str | None:
    """Why there is no table: the seeds whose run wrote no report, or None."""
    missing = [s for s, r in zip(seeds, reports, strict=True) if r is None]
    if not missing:
        return None
    dirs = ", ".join(os.path.join(workdir, f"seed_{s}") for s in missing)
    return (
        f"No table: seeds {missing} wrote no report ({dirs}). Either config.stages "
        "leaves out 'report' or a stage stopped early; the finished stages are saved "
        "there, and a re-run with 'report' in --config.stages=... (the default "
        "stages include it) resumes them and writes the table."
    )


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """quality.py's flags: `--config` (and overrides), `--seeds`, `--workdir`."""
    common.define_config(flag_values, argv)
    flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.", flag_values=flag_values)
    flags.DEFINE_string(
        "workdir", None, "Each seed runs in WORKDIR/seed_N.", required=True, flag_values=flag_values
    )
    flags.DEFINE_string(
        "merge_from",
        "",
        "Comma-separated quality.py workdirs of the same seeds (another point of a search, "
        "e.g. the student trained alone at its own learning rate): their models join the "
        "table where this run has none of that name.",
        flag_values=flag_values,
    )


def main(argv: Sequence[str]) -> None:
    """Runs the main job on every seed, then prints the JSON lines and the table."""
    args = common.parse_flags(argv, define_flags, __doc__)
    common.log_progress()
    seeds = [int(s) for s in args.seeds.split(",")]
    reports = []
    for seed in seeds:
        # A copy per seed: each run starts from the config as the flags gave it.
        config = copy.deepcopy(args.config)
        config.seed = seed
        reports.append(pipeline.run(config, os.path.join(args.workdir, f"seed_{seed}")))
    why = missing_reports(seeds, reports, args.workdir)
    if why:
        print(why)
        return
    merge(reports, seeds, [d for d in args.merge_from.split(",") if d])
    if reports[0].get("task") == "click":
        for line in click_table(reports, seeds):
            print(line)
        return
    names = list(reports[0]["models"])
    rows = []
    for name in names:
        runs = [r["models"][name] for r in reports]
        row = {"model": name, "seeds": seeds, "params": runs[0]["params"]}
        for c in COLUMNS:
            v = np.array([r["metrics"]["test"][c] for r in runs])
            row[c] = {"mean": float(v.mean()), "std": float(v.std(ddof=1) if len(v) > 1 else 0)}
        lat = np.array([_quantity(r, "latency_b256") for r in runs])
        row["latency_b256_ms"] = {
            "mean": float(lat.mean()),
            "std": float(lat.std(ddof=1) if len(lat) > 1 else 0),
        }
        row["train_seconds"] = [r["train_seconds"] for r in runs]
        rows.append(row)
        print(json.dumps(row))
    d = reports[0]["dataset"]
    print(
        f"\n{d['name']}: {d['users']} users, {d['items']} items, {d['interactions']} "
        f"interactions; test split, full ranking; mean ± std over seeds {seeds}\n"
    )
    print("| model | params | " + " | ".join(COLUMNS) + " | top-10 ms (b=256) | train s |")
    print("|---|---:|" + "---:|" * (len(COLUMNS) + 2))
    for row in rows:
        cells = [f"{row[c]['mean']:.4f} ± {row[c]['std']:.4f}" for c in COLUMNS]
        lat = row["latency_b256_ms"]
        print(
            f"| {row['model']} | {row['params']:,} | "
            + " | ".join(cells)
            + f" | {lat['mean']:.2f} ± {lat['std']:.2f} | "
            + f"{np.mean(row['train_seconds']):.0f} |"
        )
    print()
    for r in ratios(reports):
        print(json.dumps(r))
        seeds_text = ", ".join(f"{x:.3f}" for x in r["per_seed"])
        print(f"- {r['ratio']}: {r['mean']:.3f} ± {r['std']:.3f} (per seed: {seeds_text})")
    written = plots.write_all(reports, os.path.join(args.workdir, "plots"))
    print("\nfigures (mean ± std over the seeds): " + ", ".join(written.values()))


if __name__ == "__main__":
    main(sys.argv)
