"""config.compile_cache: where jax's persistent compilation cache goes, and its errors."""

import os
import subprocess
import sys
import textwrap

import pytest

from configs import synthetic
from distill_jax import compile_cache
from distill_jax import workdir as workdir_lib
from distill_jax.config_checks import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(value, max_gb=4.0):
    config = synthetic.get_config("tiny")
    config.compile_cache.dir = value
    config.compile_cache.max_gb = max_gb
    return config


def test_the_environment_wins_then_off_auto_or_a_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve(_config("")) == str(tmp_path / "env")
    monkeypatch.delenv(compile_cache.ENV)
    assert compile_cache.resolve(_config("")) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(_config("auto")) == str(tmp_path / "xdg" / "distill_jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == str(tmp_path / "home" / ".cache" / "distill_jax" / "xla")
    assert compile_cache.resolve(_config(str(tmp_path / "mine"))) == str(tmp_path / "mine")
    # A bucket a pod's hosts share goes to jax as given (no local directory made).
    assert compile_cache.resolve(_config("gs://bucket/xla")) == "gs://bucket/xla"


def test_a_path_that_cannot_be_a_directory_or_a_bad_size_names_the_key(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(
        ConfigError, match=r"config\.compile_cache\.dir=.*a_file.*writable directory"
    ):
        compile_cache.configure(_config(str(blocker / "xla")))
    with pytest.raises(ConfigError, match=r"config\.compile_cache\.max_gb=0.* positive"):
        compile_cache.configure(_config(str(tmp_path / "ok"), max_gb=0))
    assert not (tmp_path / "ok").exists()


def test_a_second_process_reads_the_program_the_first_compiled(tmp_path):
    """Every program is stored (no minimum compile time), and read back by the next run."""
    script = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp
        from jax._src import monitoring
        from configs import synthetic
        from distill_jax import compile_cache
        hits = []
        monitoring.register_event_listener(
            lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
        config = synthetic.get_config("tiny")
        config.compile_cache.dir = {str(tmp_path / "xla")!r}
        assert compile_cache.configure(config) == {str(tmp_path / "xla")!r}
        f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 3.0)
        print(float(f(jnp.ones((4, 4))).sum()), len(hits))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
    outs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout.split())
    assert os.listdir(tmp_path / "xla"), "nothing was written to the cache"
    assert outs[0][0] == outs[1][0]
    assert int(outs[0][1]) == 0 and int(outs[1][1]) >= 1, outs


def test_a_resumed_run_may_move_its_cache():
    stored, current = _config("auto"), _config("")
    changes = workdir_lib.config_changes(stored.to_dict(), current.to_dict())
    assert changes == []
