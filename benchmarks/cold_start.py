"""The cold-start table: the same split without and with side features, over seeds.

Reads the reports of two `benchmarks.quality` work directories, one run
with a config's `cold` variant (ids only) and one with its `features` variant
(the same split; teacher and students read side features), and prints, per
model and slice (warm `test`, `cold_items`, `cold_users`), HR@10, NDCG@10,
tail NDCG@10 and coverage@10 as mean ± std over the seeds (the cold-item
slices also `new_hr@10` and `new_ndcg@10`: the target ranked among the new
items alone, the item cold-start protocol), then the three checks side
features are judged by (on the full-catalogue ranking):

1. cold items: with features, each model's cold-item HR@10 is far above the
   id-only model's (held: the mean gain exceeds twice the standard deviation
   of the per-seed gains, and 0.02);
2. warm: each model's warm test NDCG@10 with features is at least 98% of the
   id-only model's (means over the seeds);
3. distillation: with features, student_kd beats student_scratch on both
   cold slices' HR@10 and NDCG@10 (means over the seeds).

  python -m benchmarks.quality --config=configs/ml100k.py:cold \\
      --config.data.path=../shared/datasets/ml-100k --seeds=0,1,2 --workdir=/tmp/ml_cold
  python -m benchmarks.quality --config=configs/ml100k.py:features \\
      --config.data.path=../shared/datasets/ml-100k --seeds=0,1,2 --workdir=/tmp/ml_features
  python -m benchmarks.cold_start --without=/tmp/ml_cold --with=/tmp/ml_features --seeds=0,1,2

Only seeds whose two runs both wrote a report are used (and named).

Runs made before the evaluator ranked cold-item targets among the new items
alone lack `new_hr@10` / `new_ndcg@10`. `--refresh=CONFIG_FILE` (the config
both runs used, e.g. configs/ml100k.py, with `--data_path`) evaluates those
trained models again on the cold-item slices with today's evaluator (their
best checkpoints, the seed's data; nothing is trained) and stores the figures
in WORKDIR/seed_N/cold_items_refresh.json, which later calls read too:

  python -m benchmarks.cold_start --without=/tmp/ml_cold --with=/tmp/ml_features \
      --refresh=configs/ml100k.py --data_path=../shared/datasets/ml-100k
"""

import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from benchmarks import common

SLICES = ("test", "cold_items", "cold_users", "cold_items_valid", "cold_users_valid")
COLUMNS = ("hr@10", "ndcg@10", "tail_ndcg@10", "coverage@10")
# The cold-item slices also rank the target among the new items alone (older
# reports lack these; their cells show '-').
NEW_ITEM_COLUMNS = ("new_hr@10", "new_ndcg@10")
MODELS = ("popularity", "teacher", "student_kd", "student_scratch")
TRAINED = MODELS[1:]


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    del argv
    flags.DEFINE_string(
        "without",
        None,
        "quality.py workdir of the id-only (`cold`) runs.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "with",
        None,
        "quality.py workdir of the `features` runs.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.", flag_values=flag_values)
    flags.DEFINE_string(
        "refresh",
        "",
        "Config file both runs used (its `cold` and `features` variants): evaluate the "
        "models that lack the new-item figures again on the cold-item slices.",
        flag_values=flag_values,
    )
    flags.DEFINE_string("data_path", "", "config.data.path for --refresh.", flag_values=flag_values)


REFRESH = "cold_items_refresh.json"
COLD_ITEM_SLICES = ("cold_items", "cold_items_valid")


def _report(workdir: str, seed: int) -> dict | None:
    """The seed's report.json, with the figures of its cold_items_refresh.json filled in."""
    path = os.path.join(workdir, f"seed_{seed}", "report.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)
    extra = os.path.join(workdir, f"seed_{seed}", REFRESH)
    if os.path.exists(extra):
        with open(extra) as f:
            for model, splits in json.load(f).items():
                for split, values in splits.items():
                    metrics = report["models"][model]["metrics"].setdefault(split, {})
                    for key, value in values.items():
                        metrics.setdefault(key, value)
    return report


def _lacking(report: dict) -> list[str]:
    """The trained models of `report` whose cold-item slices lack the new-item figures."""
    return [
        m
        for m in TRAINED
        if m in report["models"]
        and any(
            "new_hr@10" not in report["models"][m]["metrics"].get(s, {"new_hr@10": 0})
            for s in COLD_ITEM_SLICES
        )
    ]


def refresh(config_file: str, variant: str, data_path: str, workdir: str, seed: int) -> None:
    """Evaluates again, on the cold-item slices, the models of one seed that lack new_hr@10."""
    import importlib.util

    from benchmarks import trained
    from distill_jax import sharding
    from distill_jax.data import dataset
    from distill_jax.evaluation import evaluator as evaluator_lib

    report = _report(workdir, seed)
    models = _lacking(report) if report is not None else []
    if not models:
        return
    spec = importlib.util.spec_from_file_location("refresh_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.seed, config.data.path = seed, data_path
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    data = dataset.load(config, seed_dir)
    mesh = sharding.make_mesh(config.mesh)
    evaluator = evaluator_lib.Evaluator(data.split, config, mesh)
    path = os.path.join(seed_dir, REFRESH)
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
    for stage in models:
        model, params, shardings = trained.load_stage(
            config, stage, os.path.join(seed_dir, stage), data.split, mesh
        )
        scorer = evaluator_lib.model_scorer(model, params, shardings)
        out[stage] = {
            s: evaluator.evaluate(scorer, s) for s in COLD_ITEM_SLICES if s in data.eval_splits
        }
        print(
            f"refreshed {seed_dir} {stage}: "
            + json.dumps(
                {
                    s: {k: round(v, 4) for k, v in m.items() if k.startswith("new_")}
                    for s, m in out[stage].items()
                }
            ),
            flush=True,
        )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def _values(reports: list[dict], model: str, split: str, column: str) -> np.ndarray:
    values = [r["models"][model]["metrics"][split].get(column) for r in reports]
    return np.array(values, object if None in values else np.float64)


def _cell(v: np.ndarray) -> str:
    if v.dtype == object:
        return "-"
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.4f} ± {std:.4f}"


def table(without: list[dict], with_: list[dict]) -> list[str]:
    """Markdown rows: one per (model, features) and slice group."""
    lines = []
    for split in SLICES:
        if any(split not in r["models"]["teacher"]["metrics"] for r in without + with_):
            continue
        columns = COLUMNS + (NEW_ITEM_COLUMNS if split.startswith("cold_items") else ())
        lines += ["", f"**{split}**", "", "| model | features | " + " | ".join(columns) + " |"]
        lines.append("|---|---|" + "---:|" * len(columns))
        for model in MODELS:
            for label, reports in (("no", without), ("yes", with_)):
                if model == "popularity" and label == "yes":
                    continue  # the same counts either way
                if any(model not in r["models"] for r in reports):
                    continue
                cells = [_cell(_values(reports, model, split, c)) for c in columns]
                feats = "-" if model == "popularity" else label
                lines.append(f"| {model} | {feats} | " + " | ".join(cells) + " |")
    return lines


def checks(without: list[dict], with_: list[dict]) -> list[tuple[str, bool]]:
    """(statement with its figures, held) for the three checks of the module docstring."""
    out = []
    for model in TRAINED:
        gain = _values(with_, model, "cold_items", "hr@10") - _values(
            without, model, "cold_items", "hr@10"
        )
        std = gain.std(ddof=1) if len(gain) > 1 else 0.0
        base = _values(without, model, "cold_items", "hr@10").mean()
        out.append(
            (
                f"{model}: cold-item HR@10 {base:.4f} without features, "
                f"{base + gain.mean():.4f} with (gain {gain.mean():.4f} ± {std:.4f})",
                bool(gain.mean() > max(2 * std, 0.02)),
            )
        )
    for model in TRAINED:
        # Check 1 in the item cold-start protocol: ranked among the new items alone.
        w, wo = (_values(r, model, "cold_items", "new_hr@10") for r in (with_, without))
        if w.dtype == object or wo.dtype == object:
            continue
        gain = w - wo
        std = gain.std(ddof=1) if len(gain) > 1 else 0.0
        out.append(
            (
                f"{model}: cold-item new_hr@10 (among the new items alone) {wo.mean():.4f} "
                f"without features, {w.mean():.4f} with (gain {gain.mean():.4f} ± {std:.4f})",
                bool(gain.mean() > max(2 * std, 0.02)),
            )
        )
    for model in TRAINED:
        a = _values(with_, model, "test", "ndcg@10").mean()
        b = _values(without, model, "test", "ndcg@10").mean()
        out.append(
            (
                f"{model}: warm test NDCG@10 {a:.4f} with features against {b:.4f} "
                f"without ({a / b:.3f} x; at least 0.98 x)",
                bool(a >= 0.98 * b),
            )
        )
    for split in ("cold_items", "cold_users"):
        for column in ("hr@10", "ndcg@10"):
            kd = _values(with_, "student_kd", split, column).mean()
            sc = _values(with_, "student_scratch", split, column).mean()
            out.append(
                (
                    f"with features, {split} {column}: student_kd {kd:.4f}, "
                    f"student_scratch {sc:.4f}",
                    bool(kd > sc),
                )
            )
    return out


def main(argv: Sequence[str]) -> None:
    args = common.parse_flags(argv, define_flags, __doc__)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.refresh:
        for seed in seeds:
            refresh(args.refresh, "cold", args.data_path, args.without, seed)
            refresh(args.refresh, "features", args.data_path, getattr(args, "with"), seed)
    pairs = [(s, _report(args.without, s), _report(getattr(args, "with"), s)) for s in seeds]
    used = [s for s, a, b in pairs if a is not None and b is not None]
    if not used:
        sys.exit(
            f"No seed of {seeds} has a report in both {args.without} and {getattr(args, 'with')}."
        )
    without = [a for _, a, b in pairs if a is not None and b is not None]
    with_ = [b for _, a, b in pairs if a is not None and b is not None]
    d = without[0]["dataset"]
    counts = d.get("split_counts", {})
    print(
        f"{d['name']}: {counts.get('warm_users', '?')} warm users, "
        f"{counts.get('cold_users', '?')} cold users, {counts.get('cold_item_users', '?')} "
        f"cold-item users; mean ± std over seeds {used}"
    )
    print("\n".join(table(without, with_)))
    print()
    for text, held in checks(without, with_):
        print(f"- [{'held' if held else 'NOT held'}] {text}")


if __name__ == "__main__":
    main(sys.argv)
