"""The errors a run ends with when something outside the code goes wrong, and their exit statuses.

`main.py` prints each as one message (no traceback) and exits with its
status, so a launcher can tell "re-run me" (a preemption) from "fix the
config or the data" (2) and from a bug (1).
"""

# A SIGTERM (a TPU VM preemption notice, SLURM's scancel or time limit) stopped
# the run at a step boundary after a checkpoint: re-run the same command to
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
    """The run stopped on a termination signal after writing a checkpoint."""


class ConfigChangedError(Exception):
    """A workdir holds work of another config; the message names the differing keys."""


class NonFiniteError(Exception):
    """A loss or gradient was NaN or Inf; the message names the stage and step."""


class CheckpointDamagedError(Exception):
    """No checkpoint of a stage that has work in it can be read back."""


class WorkdirError(Exception):
    """The workdir cannot be written (no space, no permission)."""
