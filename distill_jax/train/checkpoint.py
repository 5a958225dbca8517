"""Orbax checkpoints of one training stage: one manager, one atomic save, a fallback.

Each checkpoint (a step under `<stage>/checkpoints/`) holds four items,
written together by one `CheckpointManager.save`:
  state  the train state (params, optimiser state, step);
  best   the parameters of the step with the best validation NDCG@10 so far;
  meta   JSON bookkeeping (best step and metric, patience, timings, config);
  data   the grain data iterator's position.
Orbax writes a step into a temporary directory and renames it into place, so
a run killed at any moment leaves either the whole step or none of it, and a
re-run resumes from the last whole step and sees exactly the batches (and
reaches exactly the best parameters) of an uninterrupted run. Keeping the best
parameters in a second manager, as this module once did, made two saves per
step: a kill between them left a best step ahead of the state, and every
re-run then died re-saving that step.

The two newest steps are kept. A step that cannot be read back (a truncated
or missing file: a disk or a copy that failed after the save) is named in a
warning and the previous one is used; a resumed stage moves the damaged step
to `<stage>/checkpoints_damaged/` so that it can write that step again. When
no step of a stage can be read, `faults.CheckpointDamagedError` says so: a
stage with work in it never silently starts over. A save the filesystem
refuses (no space, no permission, read-only) raises `faults.WorkdirError`
naming the path and the reason; the steps already written stay as they were.

A teacher's parameters are never written here by a student's stage: the
student's train state holds the student alone.
"""

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from distill_jax import distributed, faults

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
# Where a resumed stage moves the steps it could not read (kept for inspection).
DAMAGED = "checkpoints_damaged"
# The newest step and the one before it: the fallback when the newest is damaged.
MAX_TO_KEEP = 2
# The layout of earlier versions: a `state/` and a `best/` manager side by side.
_OLD_LAYOUT = ("state", "best")
# TensorStore reports a failed write as a ValueError carrying the OS error number.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")


class CheckpointLayoutError(RuntimeError):
    """A stage directory holds checkpoints in a layout this version does not read."""


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _workdir_error(e: BaseException, path: str, what: str) -> faults.WorkdirError | None:
    """`e` as a WorkdirError when the filesystem refused a write; None for any other error."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and isinstance(e, ValueError):
        found = _TENSORSTORE_OS_ERROR.search(str(e))
        code = int(found.group(1)) if found else None
    if code is None:
        return None
    reason = os.strerror(code)
    filename = getattr(e, "filename", None)
    if filename and str(filename) != path:
        reason += f" ({filename})"
    hint = {
        errno.ENOSPC: "free some space",
        errno.EDQUOT: "free some space",
        errno.EACCES: "make it writable",
        errno.EPERM: "make it writable",
        errno.EROFS: "use a writable --workdir",
    }.get(code, "check the filesystem")
    return faults.WorkdirError(
        f"cannot write {what} in {path}: {reason}; {hint} and re-run the same command: the "
        "checkpoints written before stay intact and it resumes from the newest."
    )


class _KillPointTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's temporary directory of a save, reaching the test hook's 'checkpoint_write'
    just before it is renamed into place (each item's, then the step's)."""

    async def finalize(self, *args, **kwargs):
        faults.kill_point("checkpoint_write")
        await super().finalize(*args, **kwargs)


class StageCheckpointer:
    """The checkpoints of one stage: latest state, best params, meta and data position."""

    def __init__(self, directory: str):
        directory = os.path.abspath(directory)
        self.directory = directory
        self.path = os.path.join(directory, CHECKPOINTS)
        old = [d for d in _OLD_LAYOUT if os.path.isdir(os.path.join(directory, d))]
        if old:
            raise CheckpointLayoutError(
                f"{directory} holds checkpoints in an older layout ({', '.join(old)}/); this "
                f"version keeps one manager under {CHECKPOINTS}/. Delete {directory} to train "
                "this stage again."
            )
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=MAX_TO_KEEP,
            create=True,
            enable_async_checkpointing=False,
            # A step a killed run left half-written is removed, never resumed from.
            cleanup_tmp_directories=True,
        )
        if faults.kill_armed("checkpoint_write"):  # the test hook (faults.KILL_POINTS)
            opts.temporary_path_class = _KillPointTemporaryPath
        try:
            self._manager = ocp.CheckpointManager(self.path, options=opts)
        except OSError as e:
            error = _workdir_error(e, self.path, "the checkpoint directory")
            if error is None:
                raise
            raise error from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The steps on disk, newest first (damaged ones included until a resume moves them)."""
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, step: int, state: Any, best_params: Any, meta: dict, data_iterator) -> None:
        """Writes the state, the best params so far, `meta` and the data position at once.

        Raises:
          faults.WorkdirError: the filesystem refused the write (no space, no
            permission, read-only); the steps written before stay readable.
        """
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    best=ocp.args.StandardSave(best_params),
                    meta=ocp.args.JsonSave(meta),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except (OSError, ValueError) as e:
            error = _workdir_error(e, self.path, f"the checkpoint of step {step}")
            if error is None:
                raise
            raise error from e

    def _first_readable(
        self, restore: Callable[[int], Any], what: str
    ) -> tuple[int, Any, list[int]]:
        """(step, what `restore(step)` read, the newer steps that failed), newest step first.

        Raises:
          faults.CheckpointDamagedError: no step can be read.
        """
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.path} holds no checkpoint.")
        damaged, reasons = [], []
        for step in steps:
            try:
                out = restore(step)
            # A damaged step fails in orbax, TensorStore, grain or json, each with its own error.
            except Exception as e:
                reason = f"{type(e).__name__}: {_first_line(e)}"
                log.warning(
                    "%s: checkpoint step %d cannot be read (%s); trying the one before it",
                    self.path,
                    step,
                    reason,
                )
                damaged.append(step)
                reasons.append(f"step {step}: {reason}")
                continue
            if damaged:
                log.warning(
                    "%s: read %s from step %d instead of the damaged step %s",
                    self.path,
                    what,
                    step,
                    ", ".join(map(str, damaged)),
                )
            return step, out, damaged
        raise faults.CheckpointDamagedError(
            f"no checkpoint of {self.directory} can be read ({'; '.join(reasons)}). The stage "
            f"has work in it, so it does not start over by itself: delete {self.directory} "
            "(and the stages trained after it) to train it again."
        )

    def restore(
        self, like_state: Any, shardings: Any, data_iterator, like_best=None, best_shardings=None
    ) -> tuple[Any, Any, dict]:
        """The newest readable (state, best params, meta) in the layout of `like_state`/`shardings`.

        `data_iterator` (a grain iterator) is moved to the saved position in place.
        The best params are laid out like `like_best`/`best_shardings` when
        given (the model's own params, where the state trains more), else
        like the state's params. Newer steps that cannot be read are moved to
        `<stage>/checkpoints_damaged/`, so that training writes them again.

        Raises:
          faults.CheckpointDamagedError: no step can be read.
        """
        if like_best is None:
            like_best, best_shardings = like_state.params, shardings.params
        abstract_state = _abstract(like_state, shardings)
        abstract_best = _abstract(like_best, best_shardings)

        def read(step: int):
            return self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    best=ocp.args.StandardRestore(abstract_best),
                    meta=ocp.args.JsonRestore(),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )

        _, out, damaged = self._first_readable(read, "the state")
        if damaged:
            self._move_damaged(damaged)
        return out.state, out.best, dict(out.meta)

    def _move_damaged(self, steps: list[int]) -> None:
        """Moves damaged steps aside (process 0; the others wait), then rereads the step list."""
        target = os.path.join(self.directory, DAMAGED)
        if distributed.is_main_process():
            os.makedirs(target, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            for step in steps:
                dest = os.path.join(target, f"{step}-{stamp}")
                shutil.move(os.path.join(self.path, str(step)), dest)
                log.warning("%s: damaged step %d moved to %s", self.path, step, dest)
        distributed.barrier(f"distill_jax_damaged_{self.path}")
        self._manager.reload()

    def restore_best(
        self, like_params: Any, shardings: Any, best_step: int | None = None
    ) -> tuple[Any, dict]:
        """The best parameters of the newest readable checkpoint, and its meta.

        Args:
          like_params, shardings: the layout of the parameters.
          best_step: the step whose parameters the finished stage chose (its
            result.json's `best_step`). An older checkpoint, read because the
            newest is damaged, is accepted only if it holds that step's
            parameters; None accepts the newest step alone.

        Raises:
          faults.CheckpointDamagedError: no readable step holds those parameters.
        """
        abstract = _abstract(like_params, shardings)

        def read(step: int):
            return self._manager.restore(
                step,
                args=ocp.args.Composite(
                    best=ocp.args.StandardRestore(abstract),
                    meta=ocp.args.JsonRestore(),
                ),
            )

        step, out, damaged = self._first_readable(read, "the best parameters")
        meta = dict(out.meta)
        if damaged and (best_step is None or meta.get("best_step") != best_step):
            chose = "" if best_step is None else f" (the stage chose step {best_step})"
            raise faults.CheckpointDamagedError(
                f"the newest checkpoint of {self.directory} (step {damaged[0]}) is damaged and "
                f"step {step}, the newest readable one, holds the best parameters of step "
                f"{meta.get('best_step')}, not those the stage finished with{chose}. Delete "
                f"{self.directory} (and the stages trained after it) to train it again."
            )
        return out.best, meta

    def restore_meta(self) -> dict:
        """The meta of the newest readable checkpoint (e.g. the config a stage trained with)."""

        def read(step: int):
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))

        _, out, _ = self._first_readable(read, "the meta")
        return dict(out.meta)

    def close(self) -> None:
        self._manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
