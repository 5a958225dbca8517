"""Entry point of the main job.

python -m distill_jax.main --workdir=/tmp/run [--config=configs/synthetic.py:tiny]
    [--config.student.embed_dim=32 ...]

Several processes: the same command on each, with the settings of
`distill_jax/distributed.py` (launch/local.sh, launch/tpu_vm.sh and
launch/slurm_gpu.sbatch set them). Every key, its value and its meaning:
python -m distill_jax.describe [--config=...] [--match=TEXT].
"""

import logging
import os
import sys
import traceback

import jax
from absl import app, flags
from ml_collections import config_flags

from distill_jax import describe, distributed, faults, pipeline, progress
from distill_jax.config_checks import ConfigError
from distill_jax.data.types import DataError
from distill_jax.distributed import DistributedError
from distill_jax.train.checkpoint import CheckpointLayoutError

# Errors that name what the user must fix (a config key, a file and line):
# shown as one line, without a traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    DistributedError,
    CheckpointLayoutError,
    faults.ConfigChangedError,
    faults.NonFiniteError,
    faults.CheckpointDamagedError,
    faults.WorkdirError,
)

if __name__ == "__main__":
    # Without --config, defining the flag already loads the default file and applies the
    # --config.KEY overrides: a misspelled key fails here with one message, no traceback.
    describe.check_config_flags(sys.argv)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    describe.DEFAULT_CONFIG,
    "Config file[:variant]; then --config.KEY=VALUE overrides (python -m distill_jax.describe "
    "lists every key).",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and the report.", required=True
)
_FRESH = flags.DEFINE_bool(
    "fresh",
    False,
    "Start over in a workdir that holds work of another config: that work is moved to "
    "WORKDIR/replaced-<time>/ first. Without it such a run is refused, naming the keys.",
)


def main(argv):
    try:
        _run(argv)
    except faults.Preempted as e:
        print(f"distill_jax.main: {e}", file=sys.stderr)
        sys.exit(faults.EXIT_PREEMPTED)
    except USER_ERRORS as e:
        _fail(faults.EXIT_USER_ERROR, str(e))
    except jax.errors.JaxRuntimeError as e:
        if not _multi_process():
            raise
        # The usual cause: another process died, and its closed connections ended a collective.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _fail(
            1,
            f"process {jax.process_index()} of {jax.process_count()}: a collective with the "
            f"other processes failed ({first[:300]}); another process has probably stopped or "
            "died (see its output), so this one stops too. Re-run the same command on every "
            "process to resume from the last checkpoint.",
        )
    except Exception:
        if not _multi_process():
            raise
        traceback.print_exc()
        _fail(1, None)


def _multi_process() -> bool:
    # Not jax.process_count(): that would start the backends in a run that failed before.
    return jax.distributed.is_initialized()


def _fail(status: int, message: str | None) -> None:
    """Prints `message` (one line) and exits with `status`.

    Several processes: at once, skipping jax's exit handler, which waits at a
    shutdown barrier for every other process (with one dead, until
    config.distributed.heartbeat_timeout, and then aborts). The others'
    collectives with this process then fail as soon as its connections close,
    and they stop the same way.
    """
    if message is not None:
        print(f"distill_jax.main: {message}", file=sys.stderr)
    if _multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _run(argv):
    del argv
    # Our progress at INFO; libraries (orbax, absl) only at WARNING and above.
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        force=True,
    )
    ours = logging.getLogger("distill_jax")
    ours.setLevel(logging.INFO)
    # First jax call of the job: jax.distributed must start before the backends.
    distributed.initialize(_CONFIG.value)
    if not distributed.is_main_process():
        # Every process runs the same steps; one copy of the progress is enough,
        # but each process's warnings and errors still show.
        ours.setLevel(logging.WARNING)
    if jax.default_backend() == "cpu" and "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        ours.info(
            "CPU backend with the system allocator: preloading tcmalloc "
            "(LD_PRELOAD=.../libtcmalloc_minimal.so.4) makes train steps 1.4-1.8x faster "
            "here; see README.md, 'Speed on CPU'."
        )
    if progress.bars_enabled():
        # Log lines print above the progress bars instead of through them.
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            pipeline.run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
    else:
        pipeline.run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)


if __name__ == "__main__":
    app.run(main)
