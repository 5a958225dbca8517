"""Multi-process start-up: the one place that calls `jax.distributed.initialize`.

Call `initialize(config)` before anything else touches jax (it must run before
jax creates its backends). Each of the three settings is taken from the first
of these that gives it:

  1. `config.distributed.coordinator_address` / `num_processes` / `process_id`
     when set (not '' / -1), e.g. `--config.distributed.process_id=1`;
  2. the environment: `DISTILL_JAX_COORDINATOR` ('host:port' of process 0),
     `DISTILL_JAX_NUM_PROCESSES`, `DISTILL_JAX_PROCESS_ID`;
  3. inside a SLURM job step (`srun`): `SLURM_NTASKS` and `SLURM_PROCID`. The
     coordinator, if still unset, is left to jax, which takes the step's first
     node and a port derived from the job id; jax also gives each process the
     GPU `SLURM_LOCALID` (so launch one task per GPU, each seeing the node's GPUs).

With none of them set: on a Cloud TPU VM (a pod slice or a single host) or
under Open MPI with several ranks, plain `jax.distributed.initialize()`, which
reads the TPU metadata server or the OMPI variables itself. Otherwise the run
is one process and nothing is initialised; `num_processes=1` (key or variable)
also means one process, skipping the detection.

On CPU the processes reduce through `config.distributed.cpu_collectives`
(gloo by default), which must be chosen before initialising.

A process that dies must not leave the others waiting in a collective for
ever. On CPU a dead process's closed connections make the others' gloo
collectives fail at once (main.py then prints one line and exits 1). Where a
collective cannot notice (a hung host whose connections stay open; NCCL),
jax's coordination service declares a process dead after
`config.distributed.heartbeat_timeout` seconds without a heartbeat and ends
every other process with its own message (an abort: exit status 134).
"""

import dataclasses
import glob
import importlib.util
import logging
import os
from collections.abc import Mapping

import jax
import ml_collections

from distill_jax import config_lib

log = logging.getLogger(__name__)

ENV_COORDINATOR = "DISTILL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DISTILL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DISTILL_JAX_PROCESS_ID"
# The variables jax's own SLURM detection requires: all of them are set only
# inside a job step, so a bare `python` in a batch script stays one process.
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")


class DistributedError(ValueError):
    """The multi-process settings are missing or inconsistent; names where each came from."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved settings; None where jax's own detection fills them.

    Attributes:
      coordinator_address: 'host:port' of process 0.
      num_processes: the process count.
      process_id: this process's id, in [0, num_processes).
      sources: where each set value came from (a config key or a variable), for messages.
      auto: no setting was given but a cluster jax detects itself (TPU VM,
        Open MPI) was found: initialise with no arguments.
    """

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    sources: dict[str, str]
    auto: bool = False

    @property
    def multi_process(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedError(
            f"Environment variable {name}={value!r} is invalid: expected an integer."
        ) from None


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
    return all(name in environ for name in _SLURM_STEP_VARS)


def _on_cloud_tpu_vm() -> bool:
    # What jax checks too: libtpu installed and TPU chips present.
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def _open_mpi_ranks(environ: Mapping[str, str]) -> int:
    if "OMPI_COMM_WORLD_SIZE" not in environ:
        return 1
    return _env_int(environ, "OMPI_COMM_WORLD_SIZE")


def resolve(
    config: ml_collections.ConfigDict,
    environ: Mapping[str, str] | None = None,
    detect_cluster: bool = True,
) -> Settings:
    """Works out the settings from the config and the environment (see the module doc).

    Args:
      config: the whole config (only `config.distributed` is read).
      environ: the environment (default `os.environ`).
      detect_cluster: look for a Cloud TPU VM / Open MPI when nothing is set.

    Returns:
      The settings; `multi_process` tells whether to initialise.

    Raises:
      ConfigError: a `config.distributed` value is invalid.
      DistributedError: a variable is not an integer, or the settings do not
        make a cluster (a count > 1 without this process's id or a coordinator).
    """
    environ = os.environ if environ is None else environ
    config_lib.validate_distributed(config)
    c = config.distributed
    sources: dict[str, str] = {}

    def pick(name: str, from_config, unset, env_names: tuple[str, ...], as_int: bool):
        if from_config != unset:
            sources[name] = f"config.distributed.{name}"
            return from_config
        for env in env_names:
            if env in environ:
                sources[name] = env
                return _env_int(environ, env) if as_int else environ[env]
        return None

    slurm = _in_slurm_step(environ)
    slurm_n = ("SLURM_NTASKS",) if slurm else ()
    slurm_id = ("SLURM_PROCID",) if slurm else ()
    address = pick("coordinator_address", c.coordinator_address, "", (ENV_COORDINATOR,), False)
    n = pick("num_processes", c.num_processes, -1, (ENV_NUM_PROCESSES, *slurm_n), True)
    pid = pick("process_id", c.process_id, -1, (ENV_PROCESS_ID, *slurm_id), True)

    if n is None:
        if pid is not None or address is not None:
            set_ = ", ".join(f"{k} (from {v})" for k, v in sources.items())
            raise DistributedError(
                f"{set_} set but not the process count: set config.distributed.num_processes "
                f"or {ENV_NUM_PROCESSES} (>= 1)."
            )
        auto = detect_cluster and (_open_mpi_ranks(environ) > 1 or _on_cloud_tpu_vm())
        return Settings(None, None, None, sources, auto=auto)
    where_n = sources["num_processes"]
    if n < 1:
        raise DistributedError(f"{where_n}={n} is invalid: expected a process count >= 1.")
    if n == 1:
        if pid not in (None, 0):
            raise DistributedError(
                f"{sources['process_id']}={pid} is invalid with {where_n}=1: expected 0."
            )
        return Settings(address, 1, 0, sources)
    if pid is None:
        raise DistributedError(
            f"{where_n}={n} but this process's id is unset: set config.distributed.process_id "
            f"or {ENV_PROCESS_ID} (0 on the coordinator, up to {n - 1})."
        )
    if not 0 <= pid < n:
        raise DistributedError(
            f"{sources['process_id']}={pid} is invalid: expected an id in [0, {n}) ({where_n}={n})."
        )
    if address is None and not slurm:
        raise DistributedError(
            f"{where_n}={n} but the coordinator is unset: set "
            f"config.distributed.coordinator_address or {ENV_COORDINATOR} to 'host:port' "
            "of process 0 (the same on every process)."
        )
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(
                f"{sources['coordinator_address']}={address!r} is invalid: expected "
                "'host:port' of process 0, e.g. '10.0.0.1:1234'."
            )
    return Settings(address, n, pid, sources)


def initialize(config: ml_collections.ConfigDict) -> bool:
    """Initialises `jax.distributed` when this run has several processes.

    A no-op for one process (nothing set, no cluster found, or a count of 1)
    and when jax.distributed is already initialised.

    Args:
      config: the whole config (`config.distributed` is read).

    Returns:
      Whether this run is multi-process (jax.distributed is initialised).

    Raises:
      ConfigError, DistributedError: see `resolve`.
      RuntimeError: jax was used before this call (from jax itself).
    """
    if jax.distributed.is_initialized():
        return True
    settings = resolve(config)
    if not settings.multi_process:
        return False
    # The CPU client reads this when it is created, i.e. at the first jax use
    # after initialize; it does nothing on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", config.distributed.cpu_collectives)
    timeouts = {
        "initialization_timeout": config.distributed.initialization_timeout,
        "heartbeat_timeout_seconds": config.distributed.heartbeat_timeout,
    }
    if settings.auto:
        log.info("jax.distributed: detecting the cluster (Cloud TPU VM or Open MPI)")
        jax.distributed.initialize(**timeouts)
    else:
        log.info(
            "jax.distributed: process %d of %d, coordinator %s (%s)",
            settings.process_id,
            settings.num_processes,
            settings.coordinator_address or "from SLURM",
            ", ".join(f"{k} from {v}" for k, v in settings.sources.items()),
        )
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            **timeouts,
        )
    return True


def is_main_process() -> bool:
    """Whether this process logs and writes files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`; a no-op on one process.

    For files process 0 writes that the others read next (a stage's
    result.json), on a filesystem all processes share.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
