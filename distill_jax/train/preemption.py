"""Noticing a termination request (SIGTERM) so that a run stops where nothing is lost.

A TPU VM's preemption notice, SLURM's `scancel` and its time limit send
SIGTERM, then SIGKILL after a grace period. The main job (`pipeline.run`)
installs one handler for the whole run (`handling()`), which only sets a
flag; the run acts on it at the next safe point and raises
`faults.Preempted` (exit status 75), and the same command resumes:
* inside a training loop (`run_steps`, which polls `requested(step)` after
  every step): the loop writes a checkpoint at that step boundary first;
* anywhere else (data preparation, an evaluation, the soft-label, compress
  and export stages, between stages): at the next `stop_point(where)`, a
  place where no file is being written (between evaluation batches, before
  and after each stage). Every file a run writes is written to a temporary
  name and renamed into place, so what is on disk at such a point is whole,
  and a re-run skips the finished stages and redoes the rest.

One process: a Python handler on SIGTERM sets the flag (Python runs signal
handlers in the main thread only, so elsewhere nothing is installed and a
SIGTERM keeps its previous meaning). Several processes: each may get the
signal at a different step, and a process that stops alone leaves the others
waiting in a collective, so the processes agree on the step through jax's
preemption service (`multihost_utils.reached_preemption_sync_point`), whose
own SIGTERM handler `jax.distributed.initialize` installs; no Python handler
replaces it. There the training loops stop at the agreed step; outside them
`stop_point` does nothing (no process can tell that another got the signal
without a collective), so a signal there is acted on at the next training
step, or the grace period's SIGKILL ends the run and a re-run redoes the
unfinished stage.
"""

import contextlib
import signal
import threading
import types
from collections.abc import Iterator

import jax

from distill_jax import faults


class Termination:
    """`install()`, then `requested(step)` after every step, then `restore()`.

    `restore` puts the previous SIGTERM handler back. Also a context manager.
    Prefer `handling()`, which shares the run's one handler.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None
        self._installed = False
        self._multi = False
        # Training loops running under this handler: they act on the signal
        # themselves (after a checkpoint), so `stop_point` leaves it to them.
        self.loops = 0
        # Installed by a training loop called outside a run (`loop_started`).
        self.owned_by_loop = False

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

    @property
    def multi_process(self) -> bool:
        return self._multi

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


# The handler of the run in progress (`handling`), or None outside a run.
_current: Termination | None = None


@contextlib.contextmanager
def handling() -> Iterator[Termination]:
    """The run's SIGTERM handler: installed by the outermost call, shared by the inner ones."""
    global _current
    outer = _current
    term = outer if outer is not None else Termination().install()
    _current = term
    try:
        yield term
    finally:
        if outer is None:
            term.restore()
            _current = None


def loop_started() -> Termination:
    """A training loop begins: the run's handler (or the loop's own), polled by `requested`.

    Until `loop_ended`, `stop_point` leaves the signal to the loop, which
    checkpoints at its step boundary and stops.
    """
    global _current
    term = _current if _current is not None else Termination().install()
    term.owned_by_loop = _current is None
    _current = term
    term.loops += 1
    return term


def loop_ended(term: Termination) -> None:
    """The loop of `loop_started` returned or raised; a handler it installed is put back."""
    global _current
    term.loops -= 1
    if term.loops == 0 and term.owned_by_loop:
        term.restore()
        _current = None


def stop_point(where: str) -> None:
    """Raises `faults.Preempted` if this process got SIGTERM and nothing is being written here.

    Call it only where every file written so far is whole; `where` finishes
    the sentence "stopped ..." (e.g. "before stage student_kd"). Costs an
    attribute read when no signal came.

    Raises:
      faults.Preempted: one process, SIGTERM received, and no training loop running.
    """
    term = _current
    if term is None or not term.signalled or term.loops or term.multi_process:
        return
    raise faults.Preempted(
        f"stopped {where} on a termination signal (SIGTERM); the finished stages and "
        "checkpoints are kept: re-run the same command to resume."
    )


def stage_boundary(what: str) -> None:
    """Before a stage (`what`: "stage teacher"): the files of the ones before are whole."""
    faults.kill_point("stage_boundary")
    stop_point(f"before {what}")
