"""Kills the main job at N random moments, resumes each, and checks it ends as if uninterrupted.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
      python -m benchmarks.preemption --workdir=/tmp/preemption [--n=20] [--seed=0] \
      [--config=configs/synthetic.py:tiny] [--config.KEY=VALUE ...]

First the main job (`python -m distill_jax.main` with `--config` and its
overrides) runs uninterrupted in WORKDIR/reference, timed; with `--warmup`
(the default) it has run once before in WORKDIR/warmup, so that the timed run
loads its compiled programs from the persistent compilation cache
(JAX_COMPILATION_CACHE_DIR) as the killed runs do, and the wall time is the
shorter of the two (on a loaded machine a run's time varies, and a kill drawn
after a run's end interrupts nothing: such runs are counted apart). Then for
each of `--n` runs, in WORKDIR/run_<i>: the job starts, gets SIGKILL after a
delay drawn uniformly over [0, that wall time) (from `--seed`), and the same
command is run again in that workdir until it exits 0 (each re-run counts as
a restart; `--max_restarts` bounds them). Its report.json must then hold
exactly the reference's numbers: every model's metrics, parameter count,
best and last step, agreement with the teacher, and the export's check
(timings are left out: they differ between any two runs).

Prints one JSON line per run, then a table (the kill time, where the killed
run had got to by its log: the last stage it named, with its last logged
step, restarts, match) and "M/N matched". Exits 1 when
a run did not match or did not finish. Each run's output is kept in
WORKDIR/logs/.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from benchmarks import common

DEFAULT_CONFIG = "configs/synthetic.py:tiny"
# A log line of the main job: "<time> INFO [stage] ..." or "<time> INFO data ...".
_STAGE = re.compile(r" INFO \[([\w.-]+)\](?: step (\d+))?")
_DATA = re.compile(r" INFO data ")


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "Config file[:variants] of the main job; then --config.KEY=VALUE overrides, passed on.",
        flag_values=flag_values,
        sys_argv=list(argv),
    )
    flags.DEFINE_integer("n", 20, "Runs killed at a random moment.", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the kill delays.", flag_values=flag_values)
    flags.DEFINE_integer(
        "max_restarts",
        3,
        "Re-runs of a killed run before it counts as failed.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "warmup",
        True,
        "Run the job once before the timed reference (a warm compilation cache).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Where the runs and their logs go.",
        required=True,
        flag_values=flag_values,
    )


def job_command(config_arg: str, overrides: Sequence[str], workdir: str) -> list[str]:
    """The main job's command line for `workdir`."""
    return [
        sys.executable,
        "-m",
        "distill_jax.main",
        f"--config={config_arg}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _env() -> dict[str, str]:
    # Progress as log lines (they say where a killed run had got to); no kill hook.
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_JAX_KILL_AT"}
    env.update(PYTHONUNBUFFERED="1", DISTILL_JAX_PROGRESS="log")
    return env


def run_job(command: list[str], log_path: str) -> tuple[int, float]:
    """Runs the job to its end; (exit status, seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        status = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=_env()
        ).returncode
    return status, time.time() - t0


def kill_after(command: list[str], log_path: str, delay: float) -> bool:
    """Starts the job and SIGKILLs it after `delay` seconds; False if it ended before."""
    with open(log_path, "w") as log:
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
        try:
            job.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            job.send_signal(signal.SIGKILL)
            job.wait()
            return True


def reached(log_text: str) -> str:
    """Where a run had got to by its log: 'stage@step', 'stage', 'data' or 'start-up'."""
    where = "start-up"
    for line in log_text.splitlines():
        m = _STAGE.search(line)
        if m:
            stage, step = m.group(1), m.group(2)
            if step is not None:
                where = f"{stage}@{step}"
            elif not where.startswith(f"{stage}@"):
                where = stage
        elif _DATA.search(line):
            where = "data"
    return where


def outcome(workdir: str) -> dict[str, object]:
    """The report's numbers that an interruption must not change, flattened."""
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    out: dict[str, object] = {}
    for name, model in report["models"].items():
        for split, metrics in model["metrics"].items():
            out.update({f"{name}/{split}/{k}": v for k, v in metrics.items()})
        for key in ("params", "best_step", "steps_run"):
            if key in model:
                out[f"{name}/{key}"] = model[key]
        for split, agree in (model.get("agreement_with_teacher") or {}).items():
            out.update({f"{name}/agree/{split}/{k}": v for k, v in agree.items()})
    if report.get("export"):
        out.update({f"export/{k}": v for k, v in report["export"]["same_top_k"].items()})
    return out


def differences(got: dict, want: dict) -> list[str]:
    return sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))


def main(argv: Sequence[str]) -> None:
    args = common.parse_flags(argv, define_flags, __doc__)
    config_arg = next(
        (a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), DEFAULT_CONFIG
    )
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    logs = os.path.join(args.workdir, "logs")
    os.makedirs(logs, exist_ok=True)

    def fresh(name: str) -> str:
        path = os.path.join(args.workdir, name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    reference = fresh("reference")
    walls = []
    if args.warmup:
        warm = fresh("warmup")
        status, seconds = run_job(
            job_command(config_arg, overrides, warm), os.path.join(logs, "warmup.log")
        )
        if status != 0:
            sys.exit(f"the warm-up run exited {status}; see {logs}/warmup.log")
        print(f"warm-up run: {seconds:.0f} s", flush=True)
        walls.append(seconds)
    status, seconds = run_job(
        job_command(config_arg, overrides, reference), os.path.join(logs, "reference.log")
    )
    if status != 0:
        sys.exit(f"the uninterrupted run exited {status}; see {logs}/reference.log")
    walls.append(seconds)
    wall = min(walls)
    want = outcome(reference)
    print(f"uninterrupted run: {seconds:.0f} s, {len(want)} numbers compared", flush=True)
    if args.warmup and differences(outcome(warm), want):
        print("the two uninterrupted runs differ: " + ", ".join(differences(outcome(warm), want)))

    delays = np.random.default_rng(args.seed).uniform(0.0, wall, size=args.n)
    rows = []
    for i, delay in enumerate(delays):
        workdir = fresh(f"run_{i:02d}")
        command = job_command(config_arg, overrides, workdir)
        killed_log = os.path.join(logs, f"run_{i:02d}_killed.log")
        killed = kill_after(command, killed_log, float(delay))
        with open(killed_log) as f:
            where = reached(f.read()) if killed else "(ended before the kill)"
        restarts, status = 0, 0 if not killed else None
        while status != 0 and restarts < args.max_restarts:
            restarts += 1
            status, _ = run_job(command, os.path.join(logs, f"run_{i:02d}_rerun{restarts}.log"))
        row = {
            "run": i,
            "kill_seconds": round(float(delay), 2),
            "killed": killed,
            "reached": where,
            "restarts": restarts,
            "exit": status,
        }
        if status == 0:
            diff = differences(outcome(workdir), want)
            row.update(match=not diff, differing=diff[:10])
        else:
            row.update(match=False, differing=["did not finish"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    matched = sum(r["match"] for r in rows)
    print()
    print("| run | kill at (s) | reached | restarts | match |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['kill_seconds']:.1f} | {r['reached']} | {r['restarts']} | "
            f"{'yes' if r['match'] else 'no'} |"
        )
    killed = [r for r in rows if r["killed"]]
    print(
        f"\n{matched}/{len(rows)} matched; {sum(r['match'] for r in killed)}/{len(killed)} of "
        f"the runs killed before their end (kills drawn over {wall:.0f} s, seed {args.seed})"
    )
    if matched != len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
