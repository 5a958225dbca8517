"""One atomic checkpoint per step: a run killed at any point of a save resumes
to exactly the uninterrupted result, and never bricks its workdir."""

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
from distill_jax import pipeline
from distill_jax import sharding as sharding_lib
from distill_jax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs the tiny teacher stage and SIGKILLs itself at a point of step KILL_STEP's
# save: 'during' (while the data iterator item is written into the step's
# temporary directory) or 'after' (the save finished, the next step not begun).
_KILLED_RUN = """
import os, signal, sys
import grain
from configs import synthetic
from distill_jax import pipeline
from distill_jax.train import checkpoint

config = synthetic.get_config("tiny")
config.stages = "teacher"
config.eval.every_steps = config.checkpoint.every_steps = 10

step, when = int(sys.argv[2]), sys.argv[3]
if when == "during":
    real = grain.checkpoint.CheckpointHandler.save
    def save(self, directory, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(directory))).startswith(f"{step}."):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, directory, *args, **kwargs)
    grain.checkpoint.CheckpointHandler.save = save
else:
    real = checkpoint.StageCheckpointer.save
    def save(self, at, *args, **kwargs):
        real(self, at, *args, **kwargs)
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.StageCheckpointer.save = save
pipeline.run(config, sys.argv[1])
"""


def teacher_config():
    """The config of the killed runs above (evaluations and saves at 10, 20, 30)."""
    config = synthetic.get_config("tiny")
    config.stages = "teacher"
    config.eval.every_steps = config.checkpoint.every_steps = 10
    return config


def _best_params(workdir: pathlib.Path):
    config = teacher_config()
    model = pipeline.build(config, "teacher", config.data.synthetic.num_items)
    mesh = sharding_lib.make_mesh(config.mesh)
    params, _ = pipeline.load_best_params(model, config, mesh, str(workdir / "teacher"))
    return jax.device_get(params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    pipeline.run(teacher_config(), str(workdir))
    return workdir


# Killed after the save: tests/test_preemption.py kills the main job at every
# named point, a checkpoint write included.
@pytest.mark.parametrize("when", ["during"])
def test_a_killed_save_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, when):
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(tmp_path), "20", when],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    steps = os.listdir(tmp_path / "teacher" / "checkpoints")
    if when == "during":
        # The kill left step 20 half-written, beside the whole step 10.
        assert "10" in steps and any(s.startswith("20.") and s != "20" for s in steps), steps
    else:
        assert "20" in steps, steps
    assert not (tmp_path / "teacher" / "result.json").exists()

    pipeline.run(teacher_config(), str(tmp_path))  # resumes, must not fail
    got = json.loads((tmp_path / "teacher" / "result.json").read_text())
    want = json.loads((uninterrupted / "teacher" / "result.json").read_text())
    assert got["metrics"] == want["metrics"]
    assert got["best_step"] == want["best_step"]
    a, b = _best_params(tmp_path), _best_params(uninterrupted)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # The newest step and the one before it (the fallback if the newest is damaged).
    assert sorted(os.listdir(tmp_path / "teacher" / "checkpoints")) == ["20", "30"]


def test_an_older_layout_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "state" / "10").mkdir(parents=True)
    (tmp_path / "best").mkdir()
    with pytest.raises(checkpoint.CheckpointLayoutError, match=r"older layout.*Delete"):
        checkpoint.StageCheckpointer(str(tmp_path))
