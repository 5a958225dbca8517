"""The persistent XLA compilation cache of the main job (config.compile_cache).

On the CPU most of a short run is compilation: every batch shape bucket of a
train step, every evaluation program, each compiled anew by each stage that
builds its own jitted function. jax's persistent cache stores a compiled
program under a hash of its HLO, its compile options and the jax/XLA
versions, so a program compiled once is read back instead of compiled again:
within a run (the report re-evaluating a model another stage evaluated), on a
resume after a preemption, for the next seed of `benchmarks/quality.py`, and
for the next run of the same config. Entries of a changed program, flag or
jax version are simply never read (their key differs), and the directory is
kept under `max_gb` by jax, least recently used first.

`configure` runs once at start-up, before anything compiles:
  - `JAX_COMPILATION_CACHE_DIR` set in the environment: jax already reads it;
    the user's choice wins over the config (tests and benchmarks pin it);
  - config.compile_cache.dir '' : no persistent cache;
  - 'auto': ~/.cache/distill_jax/xla (or $XDG_CACHE_HOME/distill_jax/xla);
  - any other value: that directory, or a bucket every host of a pod shares
    (gs://..., written by jax through etils; not created or checked here).
The size bound (config.compile_cache.max_gb) holds for the config's
directories; one the environment names is left unbounded, as jax leaves it.
Every program is cached (jax's default keeps only those that took over a
second to compile; on the CPU many evaluation programs take 0.2-0.9 s, and
a run compiles dozens of them).
"""

import logging
import os

import jax
import ml_collections

from distill_jax.config_checks import ConfigError

log = logging.getLogger(__name__)

ENV = "JAX_COMPILATION_CACHE_DIR"


def default_dir() -> str:
    """~/.cache/distill_jax/xla, or under $XDG_CACHE_HOME where that is set."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "distill_jax", "xla")


def resolve(config: ml_collections.ConfigDict) -> str | None:
    """The directory config.compile_cache names (None: off), or the environment's."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    value = str(config.compile_cache.dir).strip()
    if not value:
        return None
    if value == "auto":
        return default_dir()
    if "://" in value:  # a bucket, e.g. gs://...: as given
        return value
    return os.path.abspath(os.path.expanduser(value))


def _check_local(config: ml_collections.ConfigDict, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError as e:
        raise ConfigError(
            f"config.compile_cache.dir={config.compile_cache.dir!r} is invalid: {path} cannot "
            f"be a directory ({e.strerror}); expected a writable directory, 'auto' or '' (off)."
        ) from None
    if not writable:
        raise ConfigError(
            f"config.compile_cache.dir={config.compile_cache.dir!r} is invalid: {path} is "
            "not writable; expected a writable directory, 'auto' or '' (off)."
        )


def configure(config: ml_collections.ConfigDict) -> str | None:
    """Points jax's persistent compilation cache where the config says; returns the directory.

    Raises:
      ConfigError: config.compile_cache.dir names a path that is not a
        writable directory, or max_gb is not positive.
    """
    max_gb = float(config.compile_cache.max_gb)
    if not max_gb > 0:
        raise ConfigError(
            f"config.compile_cache.max_gb={config.compile_cache.max_gb!r} is invalid: "
            "expected a positive size in GiB."
        )
    path = resolve(config)
    if path is None:
        log.info("No persistent compilation cache (config.compile_cache.dir='').")
        return None
    remote = "://" in path
    if not remote:
        _check_local(config, path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if not remote and not os.environ.get(ENV):
        # jax keeps a size bound with a last-use time file per entry; processes
        # that share a directory must agree on it, and one whose directory the
        # environment set may share it with processes that never set a bound.
        jax.config.update("jax_compilation_cache_max_size", int(max_gb * 2**30))
    log.info("Compiled programs are cached in %s (config.compile_cache).", path)
    return path
