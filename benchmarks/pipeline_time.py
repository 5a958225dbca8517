"""Wall time of every stage of the main job per loss form, with the test metrics beside.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
  python -m benchmarks.pipeline_time --config=configs/beauty.py \\
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \\
      --variants=dense,auto --workdir=/tmp/pipeline_time

  python -m benchmarks.pipeline_time --config=configs/synthetic.py:tiny \\
      --config.stages=popularity,teacher,report --workdir=/tmp/pt   # a smoke run

A variant is a value of `config.loss.form` ('dense': the default before 'auto';
'auto': the fastest form that fits, the default now). Each runs the whole main
job (`python -m distill_jax.main`, the stages of `config.stages`) in a process
of its own, one after the other, in WORKDIR/<variant> (work already there is
moved aside to WORKDIR/<variant>/replaced-<time>/ by main's --fresh, so every
stage, data preparation included, is timed from scratch), its output in
WORKDIR/<variant>.log. `--config` and its `--config.KEY=VALUE` overrides reach
every variant, e.g. `--config.teacher.num_steps=500 --config.student.num_steps=500`
to shorten a run (the keys: `python -m distill_jax.describe --config=...`).

The stage seconds come from the pipeline itself (WORKDIR/<variant>/
stage_seconds.json, distill_jax/pipeline.py's STAGE_SECONDS); each trained
stage's split into its training loop (periodic validation included) and its
final evaluation, from report.json. Prints one table, stage | seconds per
variant | ratio to the first variant, with the process's total wall time,
then the test HR@10 and NDCG@10 of every model per variant side by side (the
forms give the same values up to float rounding, so quality should match),
and writes all of it with the machine, commit, date and allocator (tcmalloc
preloaded or not; benchmarks/machine.py) to WORKDIR/pipeline_time.json.
Run from the repository root with nothing else on the machine. Each variant
compiles its own programs into a compilation cache of its own, emptied first
(WORKDIR/<variant>.xla_cache, config.compile_cache): a program a stage compiled
is read back by the later stages of the same run, as in a first run on a new
machine. With JAX_COMPILATION_CACHE_DIR set, that directory wins and a later
variant could reuse an earlier one's programs (the JSON records it, with
XLA_FLAGS and LD_PRELOAD). 'cpu_kernel' (what 'auto' takes on a CPU) is built on its first
use on a machine and cached (distill_jax/losses/kernel_lib.py): a run on a
fresh machine pays that build once, inside a stage.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import flags

from benchmarks import common, machine
from distill_jax import config_lib, pipeline
from distill_jax import workdir as workdir_lib

RESULT = "pipeline_time.json"
METRICS = ("hr@10", "ndcg@10")


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """pipeline_time.py's flags: `--config` (and overrides), `--variants`, `--workdir`."""
    common.define_config(flag_values, argv)
    flags.DEFINE_list(
        "variants",
        ["dense", "auto"],
        "config.loss.form values, each a run of the main job; the first is the baseline "
        "of the ratios.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Each variant runs in WORKDIR/<variant>; the JSON goes to WORKDIR/" + RESULT + ".",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "matmul_size",
        2048,
        "n of the n^3 float32 matmul whose rate is recorded with the machine (after the "
        "runs); 0: none.",
        flag_values=flag_values,
    )


def run_variant(form: str, argv: Sequence[str], workdir: str) -> dict:
    """Runs the main job with config.loss.form=`form` in WORKDIR/<form>; its timings and metrics."""
    wd = os.path.join(workdir, form)
    log_path = os.path.join(workdir, f"{form}.log")
    # A fresh compilation cache per variant: each pays its own compiles, as a
    # first run on a new machine does, and reuses them within the run as that does.
    cache = os.path.join(workdir, f"{form}.xla_cache")
    shutil.rmtree(cache, ignore_errors=True)
    cmd = common.main_job_command(
        argv, [f"--config.loss.form={form}", f"--config.compile_cache.dir={cache}"], wd
    )
    print(f"[{form}] {' '.join(cmd)}\n[{form}] log: {log_path}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc,
    ):
        last = ""
        for line in proc.stdout:
            log.write(line)
            print(f"[{form}] {line}", end="", flush=True)
            last = line.strip() or last
        code = proc.wait()
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(
            f"pipeline_time: variant {form!r} failed (exit {code}): {last} "
            f"(its whole output: {log_path})"
        )
    seconds_path = os.path.join(wd, pipeline.STAGE_SECONDS)
    out = {
        "workdir": wd,
        "log": log_path,
        "wall_seconds": wall,
        "stage_seconds": workdir_lib.read_json(seconds_path),
        "models": None,
    }
    report_path = os.path.join(wd, "report.json")
    if os.path.exists(report_path):
        models = workdir_lib.read_json(report_path)["models"]
        out["models"] = {
            name: {
                "train_seconds": m.get("train_seconds", 0.0),
                "eval_seconds": m.get("eval_seconds", 0.0),
                "steps_run": m.get("steps_run"),
                "compressed": "compression" in m,
                "test": {k: m["metrics"]["test"].get(k) for k in METRICS},
            }
            for name, m in models.items()
        }
    return out


def time_rows(runs: dict[str, dict]) -> list[dict]:
    """The table's rows: {"row": name, "seconds": {variant: s or None}}, in stage order."""
    order: list[str] = []
    for r in runs.values():
        order += [s for s in r["stage_seconds"] if s not in order]

    def row(name, get):
        return {"row": name, "seconds": {v: get(r) for v, r in runs.items()}}

    def model_sum(r, key, pick):
        if r["models"] is None:
            return None
        return sum(m[key] for name, m in r["models"].items() if pick(name, m))

    rows = []
    for stage in order:
        rows.append(row(stage, lambda r, s=stage: r["stage_seconds"].get(s)))
        if stage in config_lib.TRAINED_STAGES or stage.startswith("teacher_"):
            for key, what in (("train_seconds", "training"), ("eval_seconds", "final evaluation")):
                rows.append(
                    row(
                        f"  {stage}: {what}",
                        lambda r, s=stage, k=key: model_sum(r, k, lambda n, m: n == s),
                    )
                )
        if stage == "compress":
            for key, what in (("train_seconds", "fine-tuning"), ("eval_seconds", "evaluation")):
                rows.append(
                    row(
                        f"  compress: {what}",
                        lambda r, k=key: model_sum(r, k, lambda n, m: m["compressed"]),
                    )
                )
    rows.append(
        row(
            "evaluation, every model (final)",
            lambda r: model_sum(r, "eval_seconds", lambda n, m: True),
        )
    )
    rows.append(row("sum of the stages", lambda r: sum(r["stage_seconds"].values())))
    rows.append(
        row(
            "start-up and exit",
            lambda r: r["wall_seconds"] - sum(r["stage_seconds"].values()),
        )
    )
    rows.append(row("total wall time", lambda r: r["wall_seconds"]))
    return rows


def _cell(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def time_table(rows: list[dict], variants: list[str]) -> list[str]:
    """The markdown table: stage | seconds per variant | ratio of each variant to the first."""
    base, others = variants[0], variants[1:]
    header = ["stage"] + [f"{v} s" for v in variants] + [f"{v}/{base}" for v in others]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        s = r["seconds"]
        ratios = [s[v] / s[base] if s[v] is not None and s[base] else None for v in others]
        cells = [r["row"]] + [_cell(s[v], ".1f") for v in variants]
        cells += [_cell(x, ".2f") for x in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def metrics_table(runs: dict[str, dict], variants: list[str]) -> list[str]:
    """Test HR@10 and NDCG@10 per model, the variants side by side."""
    with_models = [v for v in variants if runs[v]["models"] is not None]
    if not with_models:
        return ["No metrics: config.stages leaves out 'report', so no variant wrote report.json."]
    names: list[str] = []
    for v in with_models:
        names += [n for n in runs[v]["models"] if n not in names]
    header = ["model"] + [f"{k} {v}" for k in METRICS for v in with_models]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        cells = [name]
        for k in METRICS:
            for v in with_models:
                m = runs[v]["models"].get(name)
                cells.append(_cell(m and m["test"][k], ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str]) -> None:
    """Runs the main job once per variant, then prints the tables and writes the JSON."""
    args = common.parse_flags(argv, define_flags, __doc__)
    variants = [v.strip() for v in args.variants if v.strip()]
    if not variants or len(set(variants)) != len(variants):
        sys.exit(f"pipeline_time: --variants={','.join(args.variants)}: give distinct forms")
    if args.config.task != "sequence":
        sys.exit(
            f"pipeline_time: config.task={args.config.task!r}: only the sequence task's "
            "stages are timed (the click task has no catalogue loss forms)"
        )
    # Every variant's config is checked before the first run starts.
    for form in variants:
        config = common.apply_overrides(args.config, {"loss.form": form}, flag="--variants")
        try:
            config_lib.validate(config)
        except config_lib.ConfigError as e:
            sys.exit(f"pipeline_time: variant {form!r}: {e}")
    os.makedirs(args.workdir, exist_ok=True)
    runs = {form: run_variant(form, argv, args.workdir) for form in variants}
    rows = time_rows(runs)
    # After the runs: measuring the matmul rate starts jax's backend here, which on
    # a GPU would hold the memory the runs need.
    info = machine.describe(args.matmul_size)
    out = {
        "machine": info,
        "argv": list(argv),
        "variants": variants,
        "runs": runs,
        "rows": rows,
    }
    path = os.path.join(args.workdir, RESULT)
    workdir_lib.write_json(path, out)
    print(json.dumps({"machine": info}))
    print(
        f"\nconfig.loss.form variants {variants}; {info['cpu']}, {info['cores']} cores, "
        f"{info['allocator']}; commit {info['commit']}{' (modified)' if info['dirty'] else ''}; "
        f"{info['date']}\n"
    )
    for line in time_table(rows, variants):
        print(line)
    print("\ntest split, full ranking:\n")
    for line in metrics_table(runs, variants):
        print(line)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main(sys.argv)
