"""Training batches through grain, identical to `pipeline.TrainBatches.batch(step)`.

A grain record here is one GLOBAL batch: record `i` is `TrainBatches.batch(i)`.
Why whole batches rather than windows as records: a batch's shape and content
depend on the whole batch (the epoch plan groups windows of similar length;
the packed target slots N are bucketed over all its rows; masks are seeded
by (seed, epoch, index)), so batching records inside grain could not
reproduce it. With one record per
step, random access by step is free (`MapDataset[step]`) and an iterator's
whole state is the next step, which grain checkpoints as JSON.

Sharding is by ROWS, not by records. Grain's own sharding (ShardOptions given
to a sampler or to `DataLoader`) would hand different steps to different
processes; here every process computes the same global batch (cheap and
deterministic) and keeps its contiguous block of rows, the block
`sharding.py:put_batch` keeps, so every process agrees on S and N and the
rows concatenate, in process order, to the global batch. Feed such a local
batch to `jax.make_array_from_process_local_data`, not to `put_batch` (which
slices a global batch itself).
"""

import threading
from typing import Any

import grain
import numpy as np

from distill_jax.data.pipeline import TrainBatches

Batch = dict[str, np.ndarray]

# One background thread builds the next batches while the accelerator runs
# the current step; more threads only contend for the GIL (batches are built
# in Python from in-memory windows).
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


class BatchSource:
    """A grain random-access source: index `step` -> `batches.batch(step)`.

    Args:
      batches: the training batches (their seed fixes every batch).
      num_steps: how many steps the source holds (it may span epochs).
    """

    def __init__(self, batches: TrainBatches, num_steps: int):
        if num_steps <= 0:
            raise ValueError(f"num_steps={num_steps} is invalid: expected a positive count.")
        self._batches = batches
        self._num_steps = num_steps
        # TrainBatches caches one epoch's plan; prefetch threads that cross an
        # epoch boundary must not interleave inside that cache update.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._num_steps

    def __getitem__(self, step: int) -> Batch:
        step = int(step)
        if not 0 <= step < self._num_steps:
            raise IndexError(f"step {step} is outside 0..{self._num_steps - 1}.")
        with self._lock:
            return self._batches.batch(step)

    def __repr__(self) -> str:
        # Grain's DataLoader stores this in its state and refuses to restore a
        # state into a source with another repr: name all that fixes batches.
        b = self._batches
        if hasattr(b, "source_repr"):  # another task's batches name what fixes them
            return f"BatchSource(num_steps={self._num_steps}, {b.source_repr()})"
        return (
            f"BatchSource(num_steps={self._num_steps}, num_windows={b.num_windows}, "
            f"num_items={b.num_items}, max_len={b.max_len}, batch_size={b.batch_size}, "
            f"causal={b.causal}, mask_prob={b.mask_prob}, mask_last_prob={b.mask_last_prob}, "
            f"seed={b.seed}, length_buckets={b.length_buckets}, num_shards={b.num_shards})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # For grain worker processes: locks do not pickle.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def shard_rows(batch: Batch, shard_index: int, shard_count: int) -> Batch:
    """Shard `shard_index`'s contiguous block of rows of a global batch.

    Args:
      batch: the global batch; every array has the batch on its first axis.
      shard_index: this process's index, in 0..shard_count-1.
      shard_count: the number of processes.

    Returns:
      The rows `[i * B / n, (i + 1) * B / n)` of every array.

    Raises:
      ValueError: when the batch size is not a multiple of `shard_count`.
    """
    size = next(iter(batch.values())).shape[0]
    if size % shard_count:
        raise ValueError(
            f"Batch size {size} is not a multiple of the shard count {shard_count}; "
            "every process must get the same number of rows."
        )
    out = {}
    for k, v in batch.items():
        if v.shape[0] % shard_count:
            raise ValueError(
                f"{k!r} has {v.shape[0]} rows, not a multiple of the shard count {shard_count}."
            )
        rows = v.shape[0] // shard_count
        out[k] = v[shard_index * rows : (shard_index + 1) * rows]
    return out


class ShardRows(grain.transforms.Map):
    """Keeps one shard's rows of each global batch (see `shard_rows`)."""

    def __init__(self, shard_options: grain.sharding.ShardOptions):
        self.shard_index = shard_options.shard_index
        self.shard_count = shard_options.shard_count

    def map(self, element: Batch) -> Batch:
        return shard_rows(element, self.shard_index, self.shard_count)

    def __repr__(self) -> str:
        return f"ShardRows({self.shard_index}/{self.shard_count})"


def _check_shards(batches: TrainBatches, shard_options: grain.sharding.ShardOptions) -> None:
    if batches.num_shards % shard_options.shard_count:
        raise ValueError(
            f"TrainBatches.num_shards={batches.num_shards} (the mesh's data axis) is not a "
            f"multiple of the shard count {shard_options.shard_count}; each process must "
            "hold whole packing shards."
        )
    if batches.batch_size % shard_options.shard_count:
        raise ValueError(
            f"batch_size={batches.batch_size} is not a multiple of the shard count "
            f"{shard_options.shard_count}; every process must get the same number of rows."
        )


def batch_dataset(
    batches: TrainBatches,
    num_steps: int,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> grain.MapDataset:
    """The batches as a `grain.MapDataset`: `dataset[step]` is step's batch.

    Args:
      batches: the training batches.
      num_steps: the dataset's length (steps, possibly spanning epochs).
      shard_options: None for the global batch; `grain.sharding.ShardByJaxProcess()`
        (or explicit `ShardOptions`) for this process's rows of it.

    Returns:
      A MapDataset of batch dicts (`inputs`, `target_index`, `targets`, `where`).
    """
    ds = grain.MapDataset.source(BatchSource(batches, num_steps))
    if shard_options is not None and shard_options.shard_count > 1:
        _check_shards(batches, shard_options)
        ds = ds.map(ShardRows(shard_options))
    return ds


def iter_dataset(
    batches: TrainBatches,
    num_steps: int,
    shard_options: grain.sharding.ShardOptions | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The batches in step order as a `grain.IterDataset`.

    `iter(...)` gives a `grain.DatasetIterator` whose `get_state()` is
    `{'next_index': step}` (JSON); `set_state` resumes there, and
    `grain.checkpoint.CheckpointSave/CheckpointRestore` store it with Orbax.

    Args:
      batches: the training batches.
      num_steps: steps before the iterator ends.
      shard_options: as in `batch_dataset`.
      read_options: prefetching (default: one thread, four batches ahead).
    """
    ds = batch_dataset(batches, num_steps, shard_options)
    return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
