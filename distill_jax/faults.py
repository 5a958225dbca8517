"""The errors a run ends with when something outside the code goes wrong, and their exit statuses.

`main.py` prints each as one message (no traceback) and exits with its
status, so a launcher can tell "re-run me" (a preemption) from "fix the
config or the data" (2) and from a bug (1).
"""

import os
import signal

# A SIGTERM (a TPU VM preemption notice, SLURM's scancel or time limit) stopped
# the run where nothing was lost (a training step's boundary after a checkpoint,
# or between stages; distill_jax/train/preemption.py): re-run the same command to
# resume. 75 is EX_TEMPFAIL of sysexits.h, "try again later".
EXIT_PREEMPTED = 75
# An error the user can fix (a config key, a file and line, a damaged or
# mismatched workdir).
EXIT_USER_ERROR = 2
# Anything else: a bug. main.py prints one line naming the log file that holds
# the traceback (WORKDIR/error.log).
EXIT_BUG = 1
# Ctrl-C (SIGINT), as a shell reports it: 128 + 2.
EXIT_INTERRUPTED = 130


class Preempted(Exception):
    """The run stopped on a termination signal where nothing was lost (see train/preemption.py)."""


class ConfigChangedError(Exception):
    """A workdir holds work of another config; the message names the differing keys."""


class NonFiniteError(Exception):
    """A loss or gradient was NaN or Inf; the message names the stage and step."""


class CheckpointDamagedError(Exception):
    """No checkpoint of a stage that has work in it can be read back."""


class WorkdirError(Exception):
    """The workdir cannot be written (no space, no permission)."""


# ---------------------------------------------------------------- test hook: kill points
#
# For tests and benchmarks/preemption.py only: DISTILL_JAX_KILL_AT='POINT:N' makes
# the process send itself SIGKILL the N-th time it reaches the named point
# (`kill_point(POINT)`), so a test can end a run at an exact moment and check
# that the re-run ends as an uninterrupted one; 'POINT:N:TERM' sends SIGTERM
# instead (a preemption notice at that moment), 'POINT:N:STOP' SIGSTOP (a
# process that hangs with its connections open, as a lost host's do). Unset,
# `kill_point` returns at once. The points:
KILL_POINTS = {
    "data_prepare": "the data are read or generated, before they are split (once per run)",
    "train_step": "each training step, just after it is dispatched",
    "checkpoint_write": (
        "each temporary directory of a checkpoint save, before orbax renames it into "
        "place: each item's (state, best, meta, data), then the step's, five per save"
    ),
    "evaluate": "each split an evaluation of a finished model has scored",
    "stage_boundary": "before each stage of the main job, and each compress variant",
}
KILL_AT_ENV = "DISTILL_JAX_KILL_AT"


def _parse_kill_at(value: str | None) -> tuple[str, int, int] | None:
    if not value:
        return None
    parts = value.split(":")
    signals = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP}
    ok = (
        len(parts) in (2, 3)
        and parts[0] in KILL_POINTS
        and parts[1].isdigit()
        and int(parts[1]) >= 1
        and (len(parts) == 2 or parts[2] in signals)
    )
    if not ok:
        raise ValueError(
            f"{KILL_AT_ENV}={value!r} is invalid: expected 'POINT:N' or 'POINT:N:SIGNAL' with "
            f"POINT one of {', '.join(KILL_POINTS)}, N >= 1 and SIGNAL one of "
            f"{', '.join(signals)}."
        )
    return parts[0], int(parts[1]), signals[parts[2] if len(parts) == 3 else "KILL"]


_KILL_AT = _parse_kill_at(os.environ.get(KILL_AT_ENV))
_reached: dict[str, int] = {}


def kill_point(point: str) -> None:
    """Test hook: the run reached `point` (one of KILL_POINTS); see DISTILL_JAX_KILL_AT above."""
    if _KILL_AT is None:
        return
    target, n, signum = _KILL_AT
    if point != target:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == n:
        os.kill(os.getpid(), signum)


def kill_armed(point: str) -> bool:
    """Whether DISTILL_JAX_KILL_AT names `point` (for a hook that costs something to set up)."""
    return _KILL_AT is not None and _KILL_AT[0] == point
