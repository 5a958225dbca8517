"""Distill -> compress -> export, side by side: size, quality and serving latency.

  python -m benchmarks.compress --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt --workdir=/tmp/beauty

Runs the main job's teacher, student_kd, compress and export stages in
`--workdir` (finished stages are reused), then exports EVERY model (the
teacher, student_kd and each compressed variant) as an artefact under
`WORKDIR/benchmark_export/<model>/` and measures, per model: parameters,
bytes in memory, the artefact's bytes on disk (weights + function; the id
map is the same for all), test NDCG@10 and tail NDCG@10 (from the
evaluator), and top-K latency p50/p99 at each `config.eval.latency_batch_sizes`
of the artefact and of the same function jitted in process (interleaved
rounds). Prints JSON lines, a markdown table, and the serving targets:
int8 within 2% relative NDCG@10 of student_kd with at most 1/3 of its
artefact bytes, the 50%-pruned student within 3%, the artefact within
1.2x of the in-process latency.
"""

import json
import logging
import os
import sys
from collections.abc import Sequence

from absl import flags

from benchmarks import common
from distill_jax import compress, config_lib, pipeline
from distill_jax import sharding as sharding_lib
from distill_jax.compress import stage as compress_stage
from distill_jax.data import dataset


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    common.define_config(flag_values, argv)
    flags.DEFINE_string("workdir", None, "The main job's workdir.", flag_values=flag_values)
    flags.mark_flag_as_required("workdir", flag_values)
    flags.DEFINE_integer(
        "repeats",
        20,
        "Timed calls per round and side (sets eval.latency_repeats).",
        flag_values=flag_values,
    )


def _row(name: str, result: dict, exported: dict) -> dict:
    disk = exported["bytes_on_disk"]
    test = result["metrics"]["test"]
    return {
        "model": name,
        "params": result["params"],
        "param_bytes": result["param_bytes"],
        "artifact_bytes": disk["recommend.jaxexport"] + disk["weights.npz"],
        "artifact_bytes_total": disk["total"],
        "ndcg@10": test["ndcg@10"],
        "tail_ndcg@10": test["tail_ndcg@10"],
        "same_top_k": exported["same_top_k"]["identical_share"],
        "latency": exported["latency_top_k"],
    }


def _targets(rows: dict, exported_name: str) -> list[str]:
    out = []
    kd = rows.get("student_kd")
    if kd is None:
        return out

    def rel(name):
        return rows[name]["ndcg@10"] / kd["ndcg@10"] - 1.0

    for name, limit in (
        ("student_kd_int8", 0.02),
        ("student_kd_int8_act", 0.02),
        ("student_kd_int8_qat", 0.02),
    ):
        if name in rows:
            out.append(
                f"{name}: NDCG@10 {rel(name):+.2%} relative to student_kd (target within "
                f"-{limit:.0%}): {'met' if rel(name) >= -limit else 'missed'}; artefact "
                f"{rows[name]['artifact_bytes'] / kd['artifact_bytes']:.3f} x student_kd's bytes "
                f"(target <= 1/3): "
                f"{'met' if rows[name]['artifact_bytes'] * 3 <= kd['artifact_bytes'] else 'missed'}"
            )
    if "student_kd_pruned50" in rows:
        r = rel("student_kd_pruned50")
        out.append(
            f"student_kd_pruned50: NDCG@10 {r:+.2%} relative (target within -3%): "
            f"{'met' if r >= -0.03 else 'missed'}"
        )
    served = rows.get(exported_name)
    if served is not None:
        # The served artefact against the float student jitted in process.
        worst = max(
            served["latency"][b]["artifact"]["p50_ms"] / kd["latency"][b]["in_process"]["p50_ms"]
            for b in served["latency"]
        )
        out.append(
            f"{exported_name} artefact / student_kd in process, p50 latency, worst batch size "
            f"{worst:.2f} (target <= 1.2): {'met' if worst <= 1.2 else 'missed'}"
        )
    for name, row in rows.items():
        worst = max(v["ratio_p50"] for v in row["latency"].values())
        out.append(
            f"{name}: artefact / in-process p50 latency, worst batch size {worst:.2f} "
            f"(target <= 1.2): {'met' if worst <= 1.2 else 'missed'}"
        )
    return out


def main(argv: Sequence[str]) -> None:
    """Runs the stages it needs, exports every model, prints the table and the targets."""
    args = common.parse_flags(argv, define_flags, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = args.config
    config.stages = "teacher,student_kd,compress,export"
    config.eval.latency_repeats = args.repeats
    config_lib.validate(config)
    pipeline.run(config, args.workdir)
    data = dataset.load(config, args.workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    names = ["teacher", "student_kd", *compress.variant_names(config)]
    rows = {}
    for name in names:
        out_dir = os.path.join(args.workdir, "benchmark_export", name)
        exported = compress_stage.export_model(config, data, mesh, args.workdir, name, out_dir)
        with open(compress_stage.result_path(config, args.workdir, name)) as f:
            result = json.load(f)
        rows[name] = _row(name, result, exported)
        print(json.dumps(rows[name]), flush=True)
    batches = [f"batch_{b}" for b in config.eval.latency_batch_sizes]
    print()
    print(
        "| model | params | KiB in memory | artefact KiB | ndcg@10 | tail ndcg@10 | same top-10 | "
        + " | ".join(f"{b.replace('_', ' ')} p50 / p99 ms (in process p50)" for b in batches)
        + " |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(batches))
    for name, r in rows.items():
        cells = []
        for b in batches:
            art, live = r["latency"][b]["artifact"], r["latency"][b]["in_process"]
            cells.append(f"{art['p50_ms']:.2f} / {art['p99_ms']:.2f} ({live['p50_ms']:.2f})")
        lat = " | ".join(cells)
        print(
            f"| {name} | {r['params']:,} | {r['param_bytes'] / 1024:.1f} | "
            f"{r['artifact_bytes'] / 1024:.1f} | {r['ndcg@10']:.4f} | {r['tail_ndcg@10']:.4f} | "
            f"{r['same_top_k']:.3f} | {lat} |"
        )
    print()
    for line in _targets(rows, config.export.model):
        print("- " + line)


if __name__ == "__main__":
    main(sys.argv)
