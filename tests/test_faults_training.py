"""Faults the training loop meets: SIGTERM, a damaged checkpoint, a NaN step, a full disk.

Each ends in our own error (or a resume) and never in a changed answer: a run
that resumes ends with exactly the parameters and metrics of one that did not stop.
"""

import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from distill_jax import config_lib, faults, pipeline
from distill_jax import sharding as sharding_lib
from distill_jax.train import checkpoint, click, loop, steps
from distill_jax.train import state as state_lib
from tests import test_click_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny job with a longer teacher: evaluations and checkpoints every 10 steps.
OVERRIDES = ("--config.stages=teacher,report", "--config.teacher.num_steps=60")


def seq_config():
    """`configs/synthetic.py:tiny` with OVERRIDES."""
    config = synthetic.get_config("tiny")
    config.stages = "teacher,report"
    config.teacher.num_steps = 60
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    pipeline.run(seq_config(), str(workdir))
    return workdir


def _best_params(workdir: pathlib.Path):
    config = seq_config()
    model = pipeline.build(config, "teacher", config.data.synthetic.num_items)
    mesh = sharding_lib.make_mesh(config.mesh)
    params, _ = pipeline.load_best_params(model, config, mesh, str(workdir / "teacher"))
    return jax.device_get(params)


def assert_same_teacher(workdir: pathlib.Path, uninterrupted: pathlib.Path) -> None:
    """The teacher stage's metrics, best step and best parameters equal bit for bit."""
    got = json.loads((workdir / "teacher" / "result.json").read_text())
    want = json.loads((uninterrupted / "teacher" / "result.json").read_text())
    assert got["metrics"] == want["metrics"]
    assert got["best_step"] == want["best_step"]
    assert got["curves"] == want["curves"]
    a, b = _best_params(workdir), _best_params(uninterrupted)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _steps(workdir: pathlib.Path, stage: str = "teacher") -> list[int]:
    return sorted(int(s) for s in os.listdir(workdir / stage / "checkpoints") if s.isdigit())


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_checkpoints_at_the_step_boundary_and_the_rerun_matches(
    tmp_path, uninterrupted, monkeypatch
):
    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM)
    real = sharding_lib.put_local_batch
    calls = []

    def put(batch, mesh):  # runs once per step, before it: step 15's batch sends the signal
        calls.append(1)
        if len(calls) == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, mesh)

    monkeypatch.setattr(loop.sharding_lib, "put_local_batch", put)
    with pytest.raises(faults.Preempted) as e:
        pipeline.run(seq_config(), str(tmp_path))
    message = str(e.value)
    assert "[teacher] stopped at step 15/60" in message
    assert "re-run the same command to resume" in message
    assert _steps(tmp_path) == [10, 15]  # step 15 is no checkpoint step: saved for the signal
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    monkeypatch.undo()

    report = pipeline.run(seq_config(), str(tmp_path))
    want = json.loads((uninterrupted / "report.json").read_text())
    assert report["models"]["teacher"]["metrics"] == want["models"]["teacher"]["metrics"]
    assert_same_teacher(tmp_path, uninterrupted)


def _main(workdir: pathlib.Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distill_jax.main",
            "--config=configs/synthetic.py:tiny",
            f"--workdir={workdir}",
            *OVERRIDES,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DISTILL_JAX_PROGRESS": "log"},
        text=True,
        **kwargs,
    )


def test_sigterm_to_the_main_job_exits_75_and_the_same_command_resumes(tmp_path, uninterrupted):
    job = _main(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in job.stdout:  # 50 more steps (seconds) follow this line
        seen.append(line)
        if "[teacher] step 10/60" in line:
            job.send_signal(signal.SIGTERM)
            break
    out, err = job.communicate(timeout=600)
    assert job.returncode == faults.EXIT_PREEMPTED, "".join(seen) + out + err
    assert "re-run the same command to resume" in err
    assert "Traceback" not in err
    assert not (tmp_path / "teacher" / "result.json").exists()

    again = _main(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "[teacher] resumed from step" in out
    got = json.loads((tmp_path / "report.json").read_text())
    want = json.loads((uninterrupted / "report.json").read_text())
    assert got["models"]["teacher"]["metrics"] == want["models"]["teacher"]["metrics"]


# ---------------------------------------------------------------- damaged checkpoints


def _truncate_state(step_dir: pathlib.Path) -> None:
    """Cuts every array file of the step's train state to 5 bytes (a failed copy or disk)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(5)


def _delete_meta(step_dir: pathlib.Path) -> None:
    (step_dir / "meta" / "metadata").unlink()


# A failed read of a truncated file leaves an orbax coroutine behind that finds its event
# loop closed later; harmless, and not ours to fix.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate_state, _delete_meta], ids=["truncated", "missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path, uninterrupted, damage, caplog
):
    assert pipeline.run(seq_config(), str(tmp_path), stop_at_step=20) is None
    assert _steps(tmp_path) == [10, 20]
    damage(tmp_path / "teacher" / "checkpoints" / "20")
    with caplog.at_level(logging.WARNING, logger="distill_jax"):
        pipeline.run(seq_config(), str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    path = str(tmp_path / "teacher" / "checkpoints")
    assert any(path in w and "step 20 cannot be read" in w for w in warned), warned
    assert any("instead of the damaged step 20" in w for w in warned), warned
    moved = os.listdir(tmp_path / "teacher" / checkpoint.DAMAGED)
    assert len(moved) == 1 and moved[0].startswith("20-")
    assert_same_teacher(tmp_path, uninterrupted)


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
    config = seq_config()
    config.stages = "teacher"
    assert pipeline.run(config, str(tmp_path), stop_at_step=20) is None
    for step in (10, 20):
        _truncate_state(tmp_path / "teacher" / "checkpoints" / str(step))
    with pytest.raises(faults.CheckpointDamagedError) as e:
        pipeline.run(config, str(tmp_path))
    message = str(e.value)
    assert str(tmp_path / "teacher") in message
    assert "step 20: ValueError" in message and "step 10: ValueError" in message
    assert "does not start over" in message
    assert _steps(tmp_path) == [10, 20]  # nothing was moved, deleted or overwritten


# A small stand-in for a stage's checkpoints: arrays on one device, a grain iterator.
_ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
_SHARDINGS = {"w": _ONE}


def _tree(value: float) -> dict:
    return {"w": jnp.full((4, 3), value, jnp.float32)}


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _write_steps(directory: pathlib.Path, best_steps: dict[int, int]) -> None:
    """Steps `s` with state `s`, best params `best_steps[s]` and meta best_step = that."""
    ckpt = checkpoint.StageCheckpointer(str(directory))
    it = _iterator()
    for step, best in best_steps.items():
        ckpt.save(step, _tree(step), _tree(best), {"best_step": best}, it)
    ckpt.close()


def test_best_params_fall_back_only_to_a_checkpoint_holding_the_same_best_step(tmp_path):
    _write_steps(tmp_path / "a", {10: 10, 20: 10})
    _truncate_state(tmp_path / "a" / "checkpoints" / "20")
    (tmp_path / "a" / "checkpoints" / "20" / "best" / "manifest.ocdbt").unlink()
    ckpt = checkpoint.StageCheckpointer(str(tmp_path / "a"))
    best, meta = ckpt.restore_best(_tree(0), _SHARDINGS, best_step=10)
    assert meta["best_step"] == 10 and float(best["w"][0, 0]) == 10
    assert ckpt.restore_meta() == {"best_step": 10}
    # Unchecked (no best step given), or another best step: refused, not guessed.
    for best_step in (None, 20):
        with pytest.raises(faults.CheckpointDamagedError, match="holds the best parameters of"):
            ckpt.restore_best(_tree(0), _SHARDINGS, best_step=best_step)
    ckpt.close()
    assert _steps(tmp_path, "a") == [10, 20]  # reading moves nothing

    _write_steps(tmp_path / "b", {10: 10, 20: 20})
    (tmp_path / "b" / "checkpoints" / "20" / "best" / "manifest.ocdbt").unlink()
    ckpt = checkpoint.StageCheckpointer(str(tmp_path / "b"))
    with pytest.raises(faults.CheckpointDamagedError, match=r"step 10.*of step 10, not those"):
        ckpt.restore_best(_tree(0), _SHARDINGS, best_step=20)
    ckpt.close()


# ---------------------------------------------------------------- NaN and Inf


def _click_config(tmp_path: pathlib.Path, policy: str):
    data = tmp_path.parent / "click_data"
    data.mkdir(exist_ok=True)
    csv = data / "clicks.csv"
    if not csv.exists():
        test_click_task._interactions(csv)
    config = test_click_task._config(csv)
    config.stages = "logistic"
    config.data.cache_dir = str(data)
    config.train.on_nonfinite = policy
    config.checkpoint.every_steps = 10
    return config


def _nan_at(monkeypatch, batch_index: int) -> None:
    """The click batch of `batch_index` (the step after it) carries a NaN label."""
    real = click.ClickBatches.batch

    def batch(self, step):
        out = real(self, step)
        if step == batch_index:
            out["labels"] = out["labels"].copy()
            out["labels"][0] = np.nan
        return out

    monkeypatch.setattr(click.ClickBatches, "batch", batch)


def test_a_nan_step_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_at(monkeypatch, 24)  # step 25
    with pytest.raises(faults.NonFiniteError) as e:
        pipeline.run(_click_config(tmp_path, "stop"), str(tmp_path))
    message = str(e.value)
    assert message.startswith("[logistic] step 25: loss nan")
    assert "config.train.on_nonfinite='stop'" in message
    assert "the last good checkpoint, step 20" in message
    assert _steps(tmp_path, "logistic") == [10, 20]
    ckpt = checkpoint.StageCheckpointer(str(tmp_path / "logistic"))
    meta = ckpt.restore_meta()
    ckpt.close()
    assert meta["skipped_steps"] == 0 and not meta["finished"]
    # What the message offers: the same workdir resumes with 'skip' (a key a resume may change).
    pipeline.run(_click_config(tmp_path, "skip"), str(tmp_path))
    ckpt = checkpoint.StageCheckpointer(str(tmp_path / "logistic"))
    meta = ckpt.restore_meta()
    ckpt.close()
    assert meta["skipped_steps"] == 1 and meta["finished"]


def test_on_nonfinite_is_checked_naming_the_key():
    config = seq_config()
    config.train.on_nonfinite = "ignore"
    with pytest.raises(config_lib.ConfigError, match=r"config.train.on_nonfinite='ignore'"):
        config_lib.validate(config)


def test_a_nan_step_is_skipped_and_counted_with_skip(tmp_path, monkeypatch, caplog):
    _nan_at(monkeypatch, 24)
    with caplog.at_level(logging.WARNING, logger="distill_jax"):
        pipeline.run(_click_config(tmp_path, "skip"), str(tmp_path))
    assert any("[logistic] step 25: loss nan" in r.getMessage() for r in caplog.records)
    result = json.loads((tmp_path / "logistic" / "result.json").read_text())
    assert result["metrics"]["test"]["auc"] > 0.75  # trained on, unharmed
    ckpt = checkpoint.StageCheckpointer(str(tmp_path / "logistic"))
    meta = ckpt.restore_meta()
    ckpt.close()
    assert meta["skipped_steps"] == 1 and meta["finished"]
    assert all(np.isfinite(loss) for _, loss in meta["curves"]["train"])


def test_a_nonfinite_step_changes_neither_params_nor_optimiser_state():
    split = test_click_task._split(8)
    model = click.ClickModel((3, 3), 1, 4, mlp_dims=(8,))
    config = synthetic.get_config("tiny")  # the mesh and a click model's optimiser settings
    config.click.student.update(warmup_steps=1, num_steps=10)
    mesh = sharding_lib.make_mesh(config.mesh)
    state, shardings = state_lib.create_state(
        model, config.click.student, mesh, sharding_lib.rules(config), jax.random.key(0)
    )
    step = steps.make_train_step(
        model,
        task="train",
        mesh=mesh,
        state_shardings=shardings,
        loss_fn=click.make_loss_fn(model, None, None),
    )
    good = click.rows_batch(split, np.arange(8), 8)
    bad = {**good, "numeric": np.full_like(good["numeric"], np.inf)}
    state, m = step(state, None, sharding_lib.put_batch(good, mesh), jax.random.key(1))
    assert bool(m["finite"]) and int(state.step) == 1
    before = jax.device_get((state.params, state.opt_state))
    state, m = step(state, None, sharding_lib.put_batch(bad, mesh), jax.random.key(1))
    assert not bool(m["finite"]) and int(state.step) == 2  # counted, not applied
    after = jax.device_get((state.params, state.opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- full or unwritable disk


def test_a_full_disk_raises_workdir_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    config = _click_config(tmp_path, "stop")
    with pytest.raises(faults.WorkdirError) as e:
        pipeline.run(config, str(tmp_path))
    message = str(e.value)
    assert "No space left on device" in message
    assert f"the checkpoint of step 20 in {tmp_path / 'logistic' / 'checkpoints'}" in message
    monkeypatch.undo()
    assert _steps(tmp_path, "logistic") == [10]
    ckpt = checkpoint.StageCheckpointer(str(tmp_path / "logistic"))
    assert ckpt.restore_meta()["finished"] is False  # step 10 reads back
    ckpt.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod) directory")
def test_an_unwritable_workdir_raises_workdir_error(tmp_path):
    _write_steps(tmp_path, {10: 10})
    ckpt = checkpoint.StageCheckpointer(str(tmp_path))
    os.chmod(tmp_path / "checkpoints", 0o555)
    try:
        with pytest.raises(faults.WorkdirError, match="Permission denied"):
            ckpt.save(20, _tree(20), _tree(20), {"best_step": 20}, _iterator())
    finally:
        os.chmod(tmp_path / "checkpoints", 0o755)
    assert ckpt.steps() == [10]
    ckpt.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root with mount rights only): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_or_read_only_disk_raises_workdir_error(small_disk):
    ckpt = checkpoint.StageCheckpointer(str(small_disk / "stage"))
    it = _iterator()
    small = {"w": jnp.ones(100)}
    ckpt.save(10, small, small, {"best_step": 10}, it)
    # 200 KB of random floats (no compression shrinks them), twice: more than the disk holds.
    big = {"w": jax.random.normal(jax.random.key(0), (50_000,))}
    with pytest.raises(faults.WorkdirError, match="No space left on device"):
        ckpt.save(20, big, big, {"best_step": 20}, it)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(faults.WorkdirError, match="Read-only file system"):
        ckpt.save(30, small, small, {"best_step": 30}, it)
    assert ckpt.steps() == [10]
    assert ckpt.restore_meta() == {"best_step": 10}
    ckpt.close()
