"""Entry point of the main job.

python -m distill_jax.main --workdir=/tmp/run [--config=configs/synthetic.py:tiny]
    [--config.student.embed_dim=32 ...]

Several processes: the same command on each, with the settings of
`distill_jax/distributed.py` (launch/local.sh, launch/tpu_vm.sh and
launch/slurm_gpu.sbatch set them). Every key, its value and its meaning:
python -m distill_jax.describe [--config=...] [--match=TEXT].
"""

import datetime
import logging
import os
import sys
import tempfile
import traceback

import jax
from absl import app, flags
from ml_collections import config_flags

from distill_jax import compile_cache, describe, distributed, faults, pipeline, progress
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

ERROR_LOG = "error.log"
_PREFIX = "distill_jax.main"


def _workdir_of(argv: list[str]) -> str | None:
    """--workdir's value from the command line, before absl has parsed it."""
    for i, arg in enumerate(argv):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def write_traceback(workdir: str | None) -> str | None:
    """Appends the traceback being handled to WORKDIR/error.log; returns that file's path.

    Where the workdir cannot be written (no permission, no space, none given)
    the traceback goes to a new temporary file instead, whose path is returned;
    None when neither can be written.
    """
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    text = f"--- {now} pid {os.getpid()}: {' '.join(sys.argv)}\n{traceback.format_exc()}\n"
    if workdir:
        path = os.path.join(workdir, ERROR_LOG)
        try:
            os.makedirs(workdir, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            pass
    try:
        fd, path = tempfile.mkstemp(prefix="distill_jax_error_", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        return None


def _multi_process() -> bool:
    # Not jax.process_count(): that would start the backends in a run that failed before.
    return jax.distributed.is_initialized()


def _exit(status: int) -> None:
    """Exits with `status`; with several processes at once.

    Several processes: skipping jax's exit handler, which waits at a shutdown
    barrier for every other process (with one dead, until
    config.distributed.heartbeat_timeout, and then aborts). The others'
    collectives with this process then fail as soon as its connections close,
    and they stop the same way.
    """
    if _multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def fail(error: BaseException, workdir: str | None, status: int, unexpected: bool) -> None:
    """Ends the run with `error` as one message on stderr (no traceback) and `status`.

    The traceback goes to the log file (`write_traceback`); an unexpected
    error's message names that file, since it is what a bug report needs.
    """
    log_path = write_traceback(workdir)
    if not unexpected:
        print(f"{_PREFIX}: {error}", file=sys.stderr)
        _exit(status)
    lines = str(error).strip().splitlines()
    message = type(error).__name__ + (f": {lines[0]}" if lines else "")
    if len(lines) > 1:
        message += " ..."
    where = (
        f"the traceback is in {log_path}"
        if log_path
        else "no log file could be written for the traceback"
    )
    print(f"{_PREFIX}: unexpected error: {message} ({where})", file=sys.stderr)
    _exit(status)


if __name__ == "__main__":
    # Without --config, defining the flag already loads the default file and applies the
    # --config.KEY overrides: a misspelled key fails here with one message, no traceback.
    try:
        describe.check_config_flags(sys.argv)
    except SystemExit as e:  # a bad --config or --config.KEY, already one message
        print(e.code, file=sys.stderr)
        sys.exit(faults.EXIT_USER_ERROR)
    except Exception as e:  # a config file is code: it may raise anything
        fail(e, _workdir_of(sys.argv), faults.EXIT_BUG, unexpected=True)
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag (a value of the wrong type, no --workdir) as one
    message and the user-error status."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{_PREFIX}: {e} (--helpfull lists the flags)", file=sys.stderr)
        sys.exit(faults.EXIT_USER_ERROR)


def main(argv):
    # Caught here, not left to app.run, which would print the traceback: every
    # error ends as one message on stderr and its traceback in WORKDIR/error.log.
    workdir = _WORKDIR.value
    try:
        _run(argv)
    except faults.Preempted as e:
        fail(e, workdir, faults.EXIT_PREEMPTED, unexpected=False)
    except USER_ERRORS as e:
        fail(e, workdir, faults.EXIT_USER_ERROR, unexpected=False)
    except KeyboardInterrupt:
        print(
            f"{_PREFIX}: interrupted; re-run the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        _exit(faults.EXIT_INTERRUPTED)
    except jax.errors.JaxRuntimeError as e:
        if not _multi_process():
            fail(e, workdir, faults.EXIT_BUG, unexpected=True)
        # The usual cause: another process died, and its closed connections ended a collective.
        write_traceback(workdir)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"{_PREFIX}: process {jax.process_index()} of {jax.process_count()}: a collective "
            f"with the other processes failed ({first[:300]}); another process has probably "
            "stopped or died (see its output), so this one stops too. Re-run the same command "
            "on every process to resume from the last checkpoint.",
            file=sys.stderr,
        )
        _exit(faults.EXIT_BUG)
    except Exception as e:  # a bug: one line here, the traceback in the log
        fail(e, workdir, faults.EXIT_BUG, unexpected=True)


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
    # Before anything compiles (it compiles nothing itself).
    compile_cache.configure(_CONFIG.value)
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
            "here; see README.md, 'Speed'."
        )
    if progress.bars_enabled():
        # Log lines print above the progress bars instead of through them.
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            pipeline.run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
    else:
        pipeline.run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
