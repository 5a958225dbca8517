"""Orbax checkpoints of one training stage: one manager, one atomic save.

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

A teacher's parameters are never written here by a student's stage: the
student's train state holds the student alone.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
# The layout of earlier versions: a `state/` and a `best/` manager side by side.
_OLD_LAYOUT = ("state", "best")


class CheckpointLayoutError(RuntimeError):
    """A stage directory holds checkpoints in a layout this version does not read."""


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class StageCheckpointer:
    """The checkpoints of one stage: latest state, best params, meta and data position."""

    def __init__(self, directory: str):
        directory = os.path.abspath(directory)
        self.directory = directory
        old = [d for d in _OLD_LAYOUT if os.path.isdir(os.path.join(directory, d))]
        if old:
            raise CheckpointLayoutError(
                f"{directory} holds checkpoints in an older layout ({', '.join(old)}/); this "
                f"version keeps one manager under {CHECKPOINTS}/. Delete {directory} to train "
                "this stage again."
            )
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=1,
            create=True,
            enable_async_checkpointing=False,
            # A step a killed run left half-written is removed, never resumed from.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(os.path.join(directory, CHECKPOINTS), options=opts)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, best_params: Any, meta: dict, data_iterator) -> None:
        """Writes the state, the best params so far, `meta` and the data position at once."""
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

    def restore(
        self, like_state: Any, shardings: Any, data_iterator, like_best=None, best_shardings=None
    ) -> tuple[Any, Any, dict]:
        """The latest (state, best params, meta) in the layout of `like_state`/`shardings`.

        `data_iterator` (a grain iterator) is moved to the saved position in place.
        The best params are laid out like `like_best`/`best_shardings` when
        given (the model's own params, where the state trains more), else
        like the state's params.
        """
        if like_best is None:
            like_best, best_shardings = like_state.params, shardings.params
        out = self._manager.restore(
            self._manager.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like_state, shardings)),
                best=ocp.args.StandardRestore(_abstract(like_best, best_shardings)),
                meta=ocp.args.JsonRestore(),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return out.state, out.best, dict(out.meta)

    def restore_best(self, like_params: Any, shardings: Any) -> tuple[Any, dict]:
        """The best parameters of the latest checkpoint, and its meta."""
        step = self._manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.directory}/{CHECKPOINTS} holds no checkpoint.")
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                best=ocp.args.StandardRestore(_abstract(like_params, shardings)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.best, dict(out.meta)

    def restore_meta(self) -> dict:
        """The meta of the latest checkpoint alone (e.g. the config a stage trained with)."""
        step = self._manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.directory}/{CHECKPOINTS} holds no checkpoint.")
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def close(self) -> None:
        self._manager.close()
