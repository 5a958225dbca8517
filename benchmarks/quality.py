"""Quality table: the main job for several seeds, mean ± std per model.

  python benchmarks/quality.py --config=configs/beauty.py \
      --override=data.path=../shared/datasets/amazon-beauty/Beauty.txt \
      --seeds=0,1,2 --workdir=/tmp/quality_beauty
  python benchmarks/quality.py --config=configs/synthetic.py:tiny --seeds=0,1 --workdir=/tmp/q

Each seed runs in WORKDIR/seed_N (resumable: finished stages are skipped), then
one JSON line per model and a markdown table of params, HR@10, NDCG@10,
coverage@10, tail NDCG@10 and top-10 latency (batch 256) on the test split,
then the ratios the distillation result is judged by (student_kd against the
teacher and against student_scratch), seed by seed and mean ± std.
"""

import argparse
import importlib.util
import json
import logging
import os
import sys

import numpy as np

from distill_jax import pipeline

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


_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _parse_override(item: str, old, text: str):
    """`text` as the type of the config's current value `old`.

    Booleans take true/false/1/0 (not Python's bool(text), which is True for
    any non-empty string); an int key given true/false takes 1/0 (e.g.
    student_scratch.exclude_history, whose -1 means "config.student's").
    """
    if isinstance(old, str):
        return text
    if isinstance(old, bool) or (isinstance(old, int) and text.lower() in ("true", "false")):
        if text.lower() not in _BOOLS:
            raise ValueError(f"--override={item!r}: expected true or false")
        value = _BOOLS[text.lower()]
        return value if isinstance(old, bool) else int(value)
    return type(old)(text)


def load_config(spec: str, overrides: list[str]):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("quality_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"--config={spec}: no config file at {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override={item!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"--override={item!r}: config has no key {key!r}")
        node[leaf] = _parse_override(item, node[leaf], value)
    return config


def missing_reports(seeds: list[int], reports: list[dict | None], workdir: str) -> str | None:
    """Why there is no table: the seeds whose run wrote no report, or None."""
    missing = [s for s, r in zip(seeds, reports, strict=True) if r is None]
    if not missing:
        return None
    dirs = ", ".join(os.path.join(workdir, f"seed_{s}") for s in missing)
    return (
        f"No table: seeds {missing} wrote no report ({dirs}). Either config.stages "
        "leaves out 'report' or a stage stopped early; the finished stages are saved "
        "there, and a re-run with 'report' in --override=stages=... (the default "
        "stages include it) resumes them and writes the table."
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="FILE[:variant]")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE, repeatable")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING)
    logging.getLogger("distill_jax").setLevel(logging.INFO)
    seeds = [int(s) for s in args.seeds.split(",")]
    reports = []
    for seed in seeds:
        config = load_config(args.config, args.override)
        config.seed = seed
        reports.append(pipeline.run(config, os.path.join(args.workdir, f"seed_{seed}")))
    why = missing_reports(seeds, reports, args.workdir)
    if why:
        print(why)
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


if __name__ == "__main__":
    main()
