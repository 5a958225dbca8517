"""Multi-process runs: the settings of distributed.py, and the main job on 2 CPU processes.

The end-to-end test runs the same small job as one process with 2 CPU devices
and as 2 processes (launch/local.sh: gloo collectives, a coordinator on
127.0.0.1) with 1 device each, so both have the mesh {'data': 2, 'model': 1}
and the same batches; the reports must agree.

When one of two processes dies in training (SIGKILL) or hangs (SIGSTOP: its
connections stay open, as a lost host's do), the other must stop with an
error within config.distributed.heartbeat_timeout (plus start-up and exit
time), never wait in a collective for ever.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import base
from distill_jax import config_lib, distributed

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"
# Without these XLA spends most of the test compiling (each training batch
# shape compiles once); both runs use them, so they compare like with like.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
JOB_ARGS = [
    "--config=configs/synthetic.py:tiny",
    "--config.stages=popularity,teacher,student_kd,report",
    "--config.teacher.num_steps=4",
    "--config.student.num_steps=4",
    "--config.teacher.warmup_steps=1",
    "--config.student.warmup_steps=1",
    "--config.teacher.max_len=8",
    "--config.teacher.num_blocks=1",
    "--config.student.max_len=8",
    "--config.data.length_buckets=False",  # fewer batch shapes, fewer compilations
    "--config.eval.every_steps=2",
    "--config.checkpoint.every_steps=2",
    "--config.eval.latency_repeats=1",
    "--config.eval.latency_batch_sizes=(1,)",
]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the multi-process settings, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISTILL_JAX_", "SLURM_", "OMPI_", "JAX_COORDINATOR"))
    }
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


# --- distributed.resolve: where each setting comes from -------------------------------


def _config(**distributed_values):
    config = base.get_base_config()
    config.distributed.update(distributed_values)
    return config


SLURM_STEP = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
}


def test_nothing_set_is_one_process():
    s = distributed.resolve(_config(), environ={}, detect_cluster=False)
    assert not s.multi_process and s.num_processes is None


def test_env_gives_the_settings():
    env = {
        "DISTILL_JAX_COORDINATOR": "10.0.0.1:1234",
        "DISTILL_JAX_NUM_PROCESSES": "4",
        "DISTILL_JAX_PROCESS_ID": "3",
    }
    s = distributed.resolve(_config(), environ=env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3)
    assert s.multi_process
    assert s.sources["process_id"] == "DISTILL_JAX_PROCESS_ID"


def test_config_wins_over_env_which_wins_over_slurm():
    env = {**SLURM_STEP, "DISTILL_JAX_COORDINATOR": "gpu01:4000", "DISTILL_JAX_PROCESS_ID": "6"}
    s = distributed.resolve(_config(process_id=2), environ=env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("gpu01:4000", 8, 2)
    assert s.sources == {
        "coordinator_address": "DISTILL_JAX_COORDINATOR",
        "num_processes": "SLURM_NTASKS",
        "process_id": "config.distributed.process_id",
    }


def test_slurm_step_leaves_the_coordinator_to_jax():
    s = distributed.resolve(_config(), environ=SLURM_STEP)
    assert (s.coordinator_address, s.num_processes, s.process_id) == (None, 8, 5)


def test_slurm_batch_script_without_srun_is_one_process():
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert not distributed.resolve(_config(), environ=env, detect_cluster=False).multi_process


def test_count_of_one_is_one_process():
    env = {"DISTILL_JAX_NUM_PROCESSES": "1", "DISTILL_JAX_PROCESS_ID": "0"}
    assert not distributed.resolve(_config(), environ=env).multi_process
    # Also where jax would detect a cluster: the setting overrides the detection.
    s = distributed.resolve(_config(num_processes=1), environ={"OMPI_COMM_WORLD_SIZE": "4"})
    assert not s.multi_process


@pytest.mark.parametrize(
    "config_values, env, message",
    [
        ({}, {"DISTILL_JAX_NUM_PROCESSES": "two"}, "DISTILL_JAX_NUM_PROCESSES='two'"),
        ({"num_processes": 2}, {}, "config.distributed.process_id"),
        ({"num_processes": 2, "process_id": 1}, {}, "DISTILL_JAX_COORDINATOR"),
        ({}, {"DISTILL_JAX_PROCESS_ID": "1"}, "DISTILL_JAX_NUM_PROCESSES"),
        (
            {"coordinator_address": "h:1"},
            {"DISTILL_JAX_NUM_PROCESSES": "2", "DISTILL_JAX_PROCESS_ID": "2"},
            "DISTILL_JAX_PROCESS_ID=2 is invalid",
        ),
        (
            {"num_processes": 2, "process_id": 0},
            {"DISTILL_JAX_COORDINATOR": "nohost"},
            "DISTILL_JAX_COORDINATOR='nohost'",
        ),
    ],
)
def test_incomplete_settings_name_the_key_or_variable(config_values, env, message):
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.resolve(_config(**config_values), environ=env)


@pytest.mark.parametrize(
    "key, value",
    [
        ("coordinator_address", "10.0.0.1"),
        ("num_processes", 0),
        ("process_id", 3),
        ("cpu_collectives", "nccl"),
        ("initialization_timeout", 0),
        ("heartbeat_timeout", 0),
    ],
)
def test_config_validation_names_the_key(key, value):
    config = _config(num_processes=2)
    config.distributed[key] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.distributed.{key}=")):
        config_lib.validate(config)


# --- launch/local.sh ------------------------------------------------------------------


def test_local_sh_stops_the_others_when_one_fails(tmp_path):
    # A stand-in interpreter: process 1 fails at once, process 0 would run a minute.
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "if [[ $DISTILL_JAX_PROCESS_ID == 1 ]]; then exit 3; fi\n"
        "exec sleep 60\n"
    )
    fake.chmod(0o755)
    t0 = time.time()
    out = subprocess.run(
        ["bash", str(LOCAL_SH), "2"],
        env=_clean_env(PYTHON=str(fake), PORT="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr
    assert "process 1 exited with status 3" in out.stderr
    assert time.time() - t0 < 30


# --- the main job on 2 processes ------------------------------------------------------


def _metrics(report: dict) -> dict[str, float]:
    """Every model's numbers that do not depend on timing, flattened."""
    out = {}
    for name, model in report["models"].items():
        for split, metrics in model["metrics"].items():
            out.update({f"{name}/{split}/{k}": float(v) for k, v in metrics.items()})
        for key in ("params", "best_step", "steps_run"):
            if key in model:
                out[f"{name}/{key}"] = float(model[key])
        for split, agree in model.get("agreement_with_teacher", {}).items():
            out.update({f"{name}/agree/{split}/{k}": float(v) for k, v in agree.items()})
    return out


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    t0 = time.time()
    single = subprocess.run(
        [sys.executable, "-m", "distill_jax.main", f"--workdir={one}", *JOB_ARGS],
        env=_clean_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_XLA}"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stdout[-3000:]
    t1 = time.time()
    # local.sh replaces the device count with 1 per process and keeps the other flags.
    multi = subprocess.run(
        ["bash", str(LOCAL_SH), "2", f"--workdir={two}", *JOB_ARGS],
        env=_clean_env(PYTHON=sys.executable, XLA_FLAGS=FAST_XLA),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    log = multi.stdout
    assert multi.returncode == 0, log[-6000:]
    print(f"1 process: {t1 - t0:.0f} s; 2 processes: {time.time() - t1:.0f} s")

    assert "[p0]" in log and "process 1 of 2" in log, "did not run as 2 processes"
    assert "mesh {'data': 2, 'model': 1}" in log
    # Progress is logged by process 0 only.
    assert "[p0]" in log and not re.search(r"\[p1\].* INFO \[", log), log[-3000:]

    a = _metrics(json.loads((one / "report.json").read_text()))
    b = _metrics(json.loads((two / "report.json").read_text()))
    assert set(a) == set(b)
    assert {"teacher/test/ndcg@10", "student_kd/test/ndcg@10"} <= set(a)
    bad = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6)}
    assert not bad, bad
    print("largest difference:", max(abs(a[k] - b[k]) for k in a))
    assert (two / "report.md").exists()
    # Only process 0 wrote the files that are not checkpoints: no leftovers from a second writer.
    assert not list(two.rglob("*.tmp"))


# --- a process that dies or hangs -------------------------------------------------------

HEARTBEAT_TIMEOUT = 10
# Start-up of a process, and its exit, on this loaded 2-core machine.
MARGIN = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (state T in /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize(
    "victim, kill_at",
    [(1, "train_step:3"), (0, "train_step:3"), (1, "train_step:3:STOP")],
    ids=["process_1_killed", "process_0_killed", "process_1_hangs"],
)
def test_the_others_stop_within_the_heartbeat_timeout_when_a_process_dies(
    tmp_path, victim, kill_at
):
    # Started one by one (not by launch/local.sh, which would stop the survivor itself).
    # DISTILL_JAX_KILL_AT (distill_jax/faults.py) kills or stops the victim in its third
    # training step, in the middle of the gradients' all-reduce with the other process.
    args = [
        sys.executable,
        "-m",
        "distill_jax.main",
        "--config=configs/synthetic.py:tiny",
        f"--workdir={tmp_path}",
        "--config.stages=teacher",
        "--config.teacher.num_steps=30",
        "--config.teacher.max_len=8",
        "--config.teacher.num_blocks=1",
        "--config.student.max_len=8",
        "--config.data.length_buckets=False",
        f"--config.distributed.heartbeat_timeout={HEARTBEAT_TIMEOUT}",
    ]
    env = _clean_env(
        XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_XLA}",
        DISTILL_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}",
        DISTILL_JAX_NUM_PROCESSES="2",
        PYTHONUNBUFFERED="1",
    )
    procs = []
    for i in range(2):
        extra = {"DISTILL_JAX_PROCESS_ID": str(i)}
        if i == victim:
            extra["DISTILL_JAX_KILL_AT"] = kill_at
        procs.append(
            subprocess.Popen(
                args,
                env={**env, **extra},
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    dying, survivor = procs[victim], procs[1 - victim]
    try:
        deadline = time.time() + 300
        while dying.poll() is None and not _stopped(dying.pid):
            assert time.time() < deadline, "the victim never reached its third step"
            assert survivor.poll() is None, survivor.communicate()[0][-3000:]
            time.sleep(0.1)
        t0 = time.time()
        try:
            out, _ = survivor.communicate(timeout=HEARTBEAT_TIMEOUT + MARGIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still runs {HEARTBEAT_TIMEOUT + MARGIN} s later")
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    print(f"process {1 - victim} stopped {waited:.1f} s after process {victim} ({kill_at})")
    assert survivor.returncode != 0, out[-3000:]
    ours = "another process has probably stopped or died"
    if kill_at.endswith("STOP"):
        # Its connections stay open: jax's heartbeat check stops the survivor, with its message.
        assert "stopped sending heartbeats" in out, out[-3000:]
    elif victim == 1:
        # The dead process's closed connections end the collective at once: our message.
        assert ours in out and survivor.returncode == 1, out[-3000:]
    else:
        # With the coordinator gone, jax's own check may stop the survivor first.
        assert ours in out or "JAX distributed service detected fatal errors" in out, out[-3000:]
