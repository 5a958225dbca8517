"""Noticing a termination request (SIGTERM) so that training stops at a step boundary.

A TPU VM's preemption notice, SLURM's `scancel` and its time limit send
SIGTERM, then SIGKILL after a grace period. `Termination` turns the first into
a flag the training loop reads after each step: the loop writes a checkpoint
there and raises `faults.Preempted` (exit status 75), and the same command
resumes from it.

One process: a Python handler on SIGTERM sets the flag (Python runs signal
handlers in the main thread only, so elsewhere nothing is installed and a
SIGTERM keeps its previous meaning). Several processes: each may get the
signal at a different step, and a process that stops alone leaves the others
waiting in a collective, so the processes agree on the step through jax's
preemption service (`multihost_utils.reached_preemption_sync_point`), whose
own SIGTERM handler `jax.distributed.initialize` installs; no Python handler
replaces it.
"""

import signal
import threading
import types

import jax


class Termination:
    """`install()`, then `requested(step)` after every step, then `restore()`.

    `restore` puts the previous SIGTERM handler back. Also a context manager.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None
        self._installed = False
        self._multi = False

    def install(self) -> "Termination":
        self._multi = jax.distributed.is_initialized() and jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del signum, frame
        self._signalled = True

    def requested(self, step: int) -> bool:
        """Whether to checkpoint and stop now; every process calls it after every step."""
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    @property
    def signalled(self) -> bool:
        """This process got SIGTERM (one process; also after the last `requested`)."""
        return self._signalled

    def restore(self) -> None:
        """Puts the previous handler back."""
        if self._installed:
            # None: the previous handler was not set from Python; the default stands for it.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def __enter__(self) -> "Termination":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
