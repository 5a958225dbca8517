"""Preemption at fixed moments: the main job killed (SIGKILL) or stopped (SIGTERM) anywhere.

The killed runs are the main job itself (`python -m distill_jax.main`), ended at
a named point by the test hook DISTILL_JAX_KILL_AT (distill_jax/faults.py);
the same command then resumes in the same workdir, and the final report's
metrics and every stage's best parameters must equal those of an
uninterrupted run bit for bit. The job is the tiny synthetic one cut to a
few steps, with every kind of stage: popularity, a teacher, a distilled
student, a fine-tuned and a one-shot compress variant, the export, the report.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import synthetic
from distill_jax import faults, pipeline
from distill_jax import sharding as sharding_lib
from distill_jax.data import builders
from distill_jax.data.types import SequenceData
from distill_jax.train import preemption

ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/synthetic.py:tiny cut down: 6 steps per model with a checkpoint and an
# evaluation every 2, one block, 8-item windows, two compress variants.
OVERRIDES = {
    "stages": "popularity,teacher,student_kd,compress,export,report",
    "teacher.num_steps": 6,
    "student.num_steps": 6,
    "teacher.warmup_steps": 1,
    "student.warmup_steps": 1,
    "teacher.max_len": 8,
    "student.max_len": 8,
    "teacher.num_blocks": 1,
    "student.num_blocks": 1,
    "data.length_buckets": False,
    "eval.every_steps": 2,
    "checkpoint.every_steps": 2,
    "log_every_steps": 2,
    "eval.latency_repeats": 1,
    "eval.latency_batch_sizes": (1,),
    "compress.variants": "pruned50,int8",
    "compress.finetune_steps": 2,
    "compress.warmup_steps": 1,
    "compress.prune_every_steps": 1,
}
# One device and no LLVM optimisation: the job compiles in seconds. Every compiled
# program goes to the persistent cache (JAX_COMPILATION_CACHE_DIR), so the re-runs
# load what the first run compiled.
ENV = {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "PYTHONUNBUFFERED": "1",
    "DISTILL_JAX_PROGRESS": "log",
}


def _flag(key: str, value) -> str:
    return f"--config.{key}={value}"


def job_config():
    """The config the main job runs with (for reading its checkpoints here)."""
    config = synthetic.get_config("tiny")
    for key, value in OVERRIDES.items():
        *parents, last = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def main_job(workdir: pathlib.Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """Runs the main job in `workdir` (to the end, or until DISTILL_JAX_KILL_AT ends it)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISTILL_JAX_", "SLURM_", "OMPI_", "JAX_COORDINATOR"))
    }
    env.update(ENV)
    if kill_at is not None:
        env[faults.KILL_AT_ENV] = kill_at
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax.main",
            "--config=configs/synthetic.py:tiny",
            f"--workdir={workdir}",
            *(_flag(k, v) for k, v in OVERRIDES.items()),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = main_job(workdir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir


def outcome(workdir: pathlib.Path) -> dict:
    """What interruptions must not change: each model's metrics and steps, the export's check."""
    report = json.loads((workdir / "report.json").read_text())
    out = {"export": report["export"]["same_top_k"]}
    for name, model in report["models"].items():
        out[name] = {
            k: model.get(k)
            for k in ("metrics", "popularity_deciles", "params", "best_step", "steps_run")
        }
        out[name]["agreement"] = model.get("agreement_with_teacher")
        out[name]["curves"] = model.get("curves")
        out[name]["compression"] = model.get("compression")
    return out


def best_params(workdir: pathlib.Path) -> dict:
    """Each trained stage's and fine-tuned variant's best parameters; the exported weights."""
    config = job_config()
    n = config.data.synthetic.num_items
    mesh = sharding_lib.make_mesh(config.mesh)
    out = {}
    for stage, key, model_stage in (
        ("teacher", "teacher", "teacher"),
        ("student_kd", "student", "student_kd"),
        ("compress/pruned50", "student", "student_kd"),
    ):
        model = pipeline.build(config, key, n, model_stage)
        params, _ = pipeline.load_best_params(model, config, mesh, str(workdir / stage))
        out[stage] = jax.device_get(params)
    with np.load(workdir / "export" / "weights.npz", allow_pickle=False) as weights:
        out["export"] = dict(weights)
    return out


def assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    assert outcome(workdir) == outcome(reference)
    got, want = best_params(workdir), best_params(reference)
    assert got.keys() == want.keys()
    for name in want:
        a, b = jax.tree.leaves(got[name]), jax.tree.leaves(want[name])
        assert len(a) == len(b), name
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)


def _checkpoints(workdir: pathlib.Path, stage: str) -> list[str]:
    return sorted(os.listdir(workdir / stage / "checkpoints"))


def _killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, done.stdout[-3000:] + done.stderr[-3000:]


# ---------------------------------------------------------------- the main job, killed


def test_killed_at_each_point_the_reruns_end_as_the_uninterrupted_run(tmp_path, uninterrupted):
    # One workdir, killed again at a later point by each run (the counts are per run):
    # together they cost about one run, where a fresh workdir per point would cost five.
    w = tmp_path

    # Data preparation: nothing of the run is written yet but its config.
    _killed(main_job(w, "data_prepare:1"))
    assert sorted(os.listdir(w)) == ["config.json"]

    # A train step: the teacher's third, after the checkpoint of step 2.
    _killed(main_job(w, "train_step:3"))
    assert (w / "popularity" / "result.json").exists()
    assert _checkpoints(w, "teacher") == ["2"]

    # A checkpoint write: the resumed teacher saves step 4 (five temporary
    # directories: four items, then the step), then step 6: killed after its
    # first item, before anything of step 6 was renamed into place.
    _killed(main_job(w, "checkpoint_write:7"))
    steps = _checkpoints(w, "teacher")
    assert steps[:2] == ["2", "4"] and len(steps) == 3, steps
    assert steps[2].startswith("6.") and "tmp" in steps[2], steps

    # The evaluation after training: the teacher's test split is scored, the
    # valid split is not; the stage has its last checkpoint but no result.
    _killed(main_job(w, "evaluate:1"))
    assert _checkpoints(w, "teacher") == ["4", "6"]
    assert not (w / "teacher" / "result.json").exists()

    # Between stages: the boundaries are popularity, teacher, student_kd,
    # compress, its variants pruned50 and int8, export (the 7th), report.
    _killed(main_job(w, "stage_boundary:7"))
    assert (w / "compress" / "int8" / "result.json").exists()
    assert not (w / "export").exists()

    # A SIGTERM there instead: exit 75, one line, nothing lost.
    done = main_job(w, "stage_boundary:6:TERM")  # before the report
    assert done.returncode == faults.EXIT_PREEMPTED, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "distill_jax.main: stopped before stage report on a termination signal (SIGTERM); "
        "the finished stages and checkpoints are kept: re-run the same command to resume."
    ]
    assert (w / "export" / "result.json").exists()
    assert not (w / "report.json").exists()

    done = main_job(w)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_run(w, uninterrupted)


# ---------------------------------------------------------------- SIGTERM outside a training loop


def popularity_config():
    """No training: the popularity baseline's evaluation and the report."""
    config = job_config()
    config.stages = "popularity,report"
    return config


@pytest.fixture(scope="module")
def popularity_report(tmp_path_factory) -> dict:
    return pipeline.run(popularity_config(), str(tmp_path_factory.mktemp("popularity")))


@pytest.mark.parametrize(
    "point, n, where",
    [
        ("data_prepare", 1, "while preparing the data"),
        ("evaluate", 1, "during an evaluation"),  # after the test split, before valid
        ("stage_boundary", 2, "before stage report"),
    ],
)
def test_sigterm_outside_training_stops_at_the_next_safe_point(
    tmp_path, monkeypatch, popularity_report, point, n, where
):
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(faults, "_KILL_AT", (point, n, signal.SIGTERM))
    monkeypatch.setattr(faults, "_reached", {})
    with pytest.raises(faults.Preempted, match=f"^stopped {where} on a termination signal"):
        pipeline.run(popularity_config(), str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handler is put back
    assert not (tmp_path / "report.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()

    report = pipeline.run(popularity_config(), str(tmp_path))
    want = popularity_report["models"]["popularity"]
    assert report["models"]["popularity"]["metrics"] == want["metrics"]
    assert report["models"]["popularity"]["popularity_deciles"] == want["popularity_deciles"]


def test_a_stop_while_a_data_set_is_written_leaves_no_half_data_set(tmp_path):
    data = SequenceData(
        num_items=9, sequences=[np.arange(1, 1 + u % 8, dtype=np.int32) for u in range(30)]
    )
    with preemption.handling() as term:
        term._handle(signal.SIGTERM, None)  # as if SIGTERM came during the write
        with pytest.raises(faults.Preempted, match="^stopped while writing the data set"):
            builders.build(data, name="toy", data_dir=tmp_path, fingerprint="f")
    # TFDS removed its temporary directory: no data set, whole or half.
    assert not builders.dataset_dir("toy", tmp_path).exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("incomplete.")]
    builders.build(data, name="toy", data_dir=tmp_path, fingerprint="f")
    got = builders.load("toy", tmp_path)
    for a, b in zip(got.sequences, data.sequences, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_training_loop_keeps_the_signal_for_its_own_step_boundary():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.handling() as term:
        term._handle(signal.SIGTERM, None)
        loop = preemption.loop_started()
        assert loop is term  # one handler for the run
        preemption.stop_point("nowhere")  # the loop checkpoints and stops itself
        assert loop.requested(step=1)
        preemption.loop_ended(loop)
        assert signal.getsignal(signal.SIGTERM) == term._handle  # still the run's
        with pytest.raises(faults.Preempted, match="^stopped after the loop"):
            preemption.stop_point("after the loop")
    assert signal.getsignal(signal.SIGTERM) == before
    preemption.stop_point("outside a run")  # no handler: nothing to act on

    loop = preemption.loop_started()  # a loop called outside a run installs its own
    assert signal.getsignal(signal.SIGTERM) == loop._handle
    preemption.loop_ended(loop)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("value", ["train_step", "train_step:0", "nowhere:1", "evaluate:2:HUP"])
def test_a_malformed_kill_point_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match=f"DISTILL_JAX_KILL_AT='{value}' is invalid"):
        faults._parse_kill_at(value)
    assert faults._parse_kill_at("evaluate:2:TERM") == ("evaluate", 2, signal.SIGTERM)
    assert faults._parse_kill_at(None) is None
