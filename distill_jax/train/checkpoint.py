"""Orbax checkpoints of one training stage.

Two managers under the stage's directory:
  state/  the latest train state, the grain data iterator's state and JSON
          metadata (best-so-far bookkeeping, the config): a re-run resumes
          from it and sees exactly the batches an uninterrupted run would.
  best/   parameters only, of the step with the best validation NDCG@10.
A teacher's parameters are never written here by a student's stage: the
student's train state holds the student alone.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class StageCheckpointer:
    """Latest-state and best-params checkpoints of one stage."""

    def __init__(self, directory: str):
        directory = os.path.abspath(directory)
        self.directory = directory
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        )
        self._state = ocp.CheckpointManager(os.path.join(directory, "state"), options=opts)
        self._best = ocp.CheckpointManager(os.path.join(directory, "best"), options=opts)

    def latest_step(self) -> int | None:
        return self._state.latest_step()

    def save_state(self, step: int, state: Any, meta: dict, data_iterator) -> None:
        self._state.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=True,
        )
        self._state.wait_until_finished()

    def restore_state(self, like_state: Any, shardings: Any, data_iterator) -> tuple[Any, dict]:
        """Restores the latest state into the layout of `like_state`/`shardings`.

        `data_iterator` (a grain iterator) is moved to the saved position in place.
        """
        step = self._state.latest_step()
        out = self._state.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like_state, shardings)),
                meta=ocp.args.JsonRestore(),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return out.state, dict(out.meta)

    def has_best(self) -> bool:
        return self._best.latest_step() is not None

    def save_best(self, step: int, params: Any, meta: dict) -> None:
        self._best.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._best.wait_until_finished()

    def restore_best(self, like_params: Any, shardings: Any) -> tuple[Any, dict]:
        step = self._best.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.directory}/best holds no checkpoint.")
        out = self._best.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(like_params, shardings)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.params, dict(out.meta)

    def close(self) -> None:
        self._state.close()
        self._best.close()
