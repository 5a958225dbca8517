"""The main job ends every error as one message on stderr, the traceback in WORKDIR/error.log."""

import os
import re
import subprocess
import sys

from distill_jax import faults

TINY = "--config=configs/synthetic.py:tiny"


def _main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distill_jax.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _one_message(stderr: str) -> str:
    """The lines of our message on stderr (libraries may warn above it)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.startswith("distill_jax.main: ")]
    assert len(ours) == 1, stderr[-3000:]
    return ours[0]


def test_a_data_error_is_one_message_and_its_traceback_is_logged(tmp_path):
    data = tmp_path / "log.csv"
    data.write_text("user_id,item_id,timestamp\n1,2,100\n1,3,yesterday\n")
    work = tmp_path / "run"
    out = _main(
        TINY, "--config.data.source=interactions", f"--config.data.path={data}", f"--workdir={work}"
    )
    assert out.returncode == faults.EXIT_USER_ERROR, out.stderr[-3000:]
    line = _one_message(out.stderr)
    assert f"{data}:3:" in line and "'yesterday'" in line
    logged = (work / "error.log").read_text()
    assert "Traceback" in logged and "DataError" in logged


def test_a_config_error_names_the_key_without_a_traceback(tmp_path):
    work = tmp_path / "run"
    out = _main(TINY, "--config.distill.temperature=-1.0", f"--workdir={work}")
    assert out.returncode == faults.EXIT_USER_ERROR, out.stderr[-3000:]
    assert "config.distill.temperature=-1.0" in _one_message(out.stderr)
    assert "ConfigError" in (work / "error.log").read_text()


# The main job with pipeline.run replaced by a function that raises (python -c, argv[1]: workdir).
_RAISES = """
import sys

from absl import app

from distill_jax import main, pipeline


def run(*args, **kwargs):
    raise ValueError("an internal check failed\\nsecond line")


pipeline.run = run
sys.argv = ["distill_jax.main", "--config=configs/synthetic.py:tiny", "--workdir=" + sys.argv[1]]
app.run(main.main)
"""


def _unexpected(tmp_path, work) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", _RAISES, str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_an_unexpected_error_is_one_line_naming_the_log(tmp_path):
    work = tmp_path / "run"
    out = _unexpected(tmp_path, work)
    assert out.returncode == faults.EXIT_BUG, out.stderr[-3000:]
    line = _one_message(out.stderr)
    log = work / "error.log"
    assert line == (
        "distill_jax.main: unexpected error: ValueError: an internal check failed ... "
        f"(the traceback is in {log})"
    )
    logged = log.read_text()
    # Each entry opens with its UTC time.
    assert re.match(r"--- \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 ", logged)
    assert "Traceback" in logged and "second line" in logged and "in run" in logged
    # A second failure appends: both tracebacks stay.
    out = _unexpected(tmp_path, work)
    assert log.read_text().count("Traceback") == 2


def test_an_unwritable_workdir_logs_to_a_temporary_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    work = blocker / "run"  # below a file: cannot be created
    out = _unexpected(tmp_path, work)
    assert out.returncode == faults.EXIT_BUG, out.stderr[-3000:]
    line = _one_message(out.stderr)
    logs = list((tmp_path / "tmp").glob("distill_jax_error_*.log"))
    assert len(logs) == 1 and f"(the traceback is in {logs[0]})" in line
    assert "an internal check failed" in logs[0].read_text()


def test_a_config_file_that_raises_is_one_line(tmp_path):
    config = tmp_path / "bad_config.py"
    config.write_text("def get_config():\n    raise RuntimeError('no such setting')\n")
    work = tmp_path / "run"
    out = _main(f"--config={config}", f"--workdir={work}")
    assert out.returncode == faults.EXIT_BUG, out.stderr[-3000:]
    line = _one_message(out.stderr)
    assert "RuntimeError: no such setting" in line and str(work / "error.log") in line
    assert "bad_config.py" in (work / "error.log").read_text()


def test_bad_flags_are_one_message_with_the_user_error_status(tmp_path):
    work = tmp_path / "run"
    for args, expected in (
        ((TINY, "--config.teacher.embed_dim=abc", f"--workdir={work}"), "embed_dim=abc"),
        ((TINY,), "flag --workdir=None"),  # --workdir is required
        ((TINY, "--config.teachr.embed_dim=8", f"--workdir={work}"), "did you mean"),
    ):
        out = _main(*args)
        assert out.returncode == faults.EXIT_USER_ERROR, out.stderr[-3000:]
        assert "Traceback" not in out.stderr and expected in out.stderr, out.stderr[-3000:]
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not work.exists()  # refused before anything is written
