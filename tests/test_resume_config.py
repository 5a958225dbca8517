"""A workdir remembers its config: a resumed run with another one is refused, naming the keys."""

import json
import os
import subprocess
import sys

import pytest

from configs import synthetic
from distill_jax import faults
from distill_jax import workdir as workdir_lib


def test_a_changed_config_is_refused_and_free_keys_may_differ(tmp_path):
    work = str(tmp_path / "run")
    config = synthetic.get_config("tiny")
    workdir_lib.check_config(config, work)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert stored["teacher"]["embed_dim"] == config.teacher.embed_dim
    workdir_lib.check_config(config, work)  # the same config resumes
    free = synthetic.get_config("tiny")
    free.update(log_every_steps=7, stages="teacher")
    free.eval.batch_size = 3
    workdir_lib.check_config(free, work)  # keys that cannot change the result
    other = synthetic.get_config("tiny")
    other.teacher.embed_dim = config.teacher.embed_dim * 2
    other.distill.temperature = 3.5
    with pytest.raises(faults.ConfigChangedError) as e:
        workdir_lib.check_config(other, work)
    message = str(e.value)
    assert f"teacher.embed_dim ({config.teacher.embed_dim} -> {2 * config.teacher.embed_dim})" in (
        message
    )
    assert "distill.temperature" in message and "--fresh" in message
    assert "log_every_steps" not in message and "eval.batch_size" not in message


def test_fresh_moves_the_old_work_aside_and_starts_over(tmp_path):
    work = tmp_path / "run"
    workdir_lib.check_config(synthetic.get_config("tiny"), str(work))
    (work / "teacher").mkdir()
    (work / "teacher" / "result.json").write_text("{}")
    other = synthetic.get_config("tiny")
    other.seed = 5
    workdir_lib.check_config(other, str(work), fresh=True)
    replaced = [n for n in os.listdir(work) if n.startswith("replaced-")]
    assert len(replaced) == 1 and not (work / "teacher").exists()
    assert (work / replaced[0] / "teacher" / "result.json").exists()  # nothing is deleted
    assert json.loads((work / "config.json").read_text())["config"]["seed"] == 5
    workdir_lib.check_config(other, str(work))  # the new config is the stored one


def test_the_main_job_refuses_in_one_message(tmp_path):
    work = tmp_path / "run"
    config = synthetic.get_config("tiny")
    config.teacher.num_blocks = 3
    workdir_lib.check_config(config, str(work))
    cmd = [
        sys.executable,
        "-m",
        "distill_jax.main",
        "--config=configs/synthetic.py:tiny",
        f"--workdir={work}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == faults.EXIT_USER_ERROR, out.stderr[-2000:]
    assert "teacher.num_blocks (3 -> " in out.stderr
    assert "Traceback" not in out.stderr
