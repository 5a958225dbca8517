"""Grain pipelines: the same batches as TrainBatches, resumable, sharded by rows."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic as synthetic_config
from distill_jax.data import loader, synthetic
from distill_jax.data.pipeline import TrainBatches

NUM_STEPS = 11  # More than two epochs of the tiny data: crosses epoch boundaries.


@pytest.fixture(scope="module")
def data():
    return synthetic.generate(synthetic_config.get_config("tiny").data.synthetic, seed=0)


def _batches(data, causal: bool, seed: int = 3) -> TrainBatches:
    return TrainBatches(
        data.sequences,
        num_items=data.num_items,
        max_len=16,
        batch_size=32,
        causal=causal,
        mask_prob=0.2,
        seed=seed,
        num_shards=4,  # the most processes a test below splits the batch over
    )


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


def _expected(data, causal: bool, steps) -> list[dict]:
    reference = _batches(data, causal)  # A fresh instance: no shared cache.
    return [reference.batch(s) for s in steps]


@pytest.mark.parametrize("causal", [True, False])
def test_every_form_gives_the_train_batches(data, causal):
    assert _batches(data, causal).steps_per_epoch * 2 < NUM_STEPS
    expected = _expected(data, causal, range(NUM_STEPS))
    ds = loader.batch_dataset(_batches(data, causal), NUM_STEPS)
    assert len(ds) == NUM_STEPS
    # Random access, out of order and across epochs.
    for step in [7, 0, 10, 3, 3, 5]:
        assert _equal(ds[step], expected[step])
    got_iter = list(loader.iter_dataset(_batches(data, causal), NUM_STEPS))
    assert len(got_iter) == NUM_STEPS
    assert all(_equal(g, e) for g, e in zip(got_iter, expected, strict=True))


def test_the_seed_changes_the_batches(data):
    ds = loader.batch_dataset(_batches(data, True, seed=4), NUM_STEPS)
    assert not all(_equal(ds[s], e) for s, e in enumerate(_expected(data, True, range(3))))


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("form", ["iter_dataset"])
def test_a_restored_iterator_yields_exactly_the_remaining_batches(data, causal, form):
    make = getattr(loader, form)
    expected = _expected(data, causal, range(NUM_STEPS))
    it = iter(make(_batches(data, causal), NUM_STEPS))
    k = 6
    assert all(_equal(g, e) for g, e in zip(_take(it, k), expected[:k], strict=True))
    state = it.get_state()
    _take(it, 2)  # Moving on after the save must not change what was saved.

    fresh = iter(make(_batches(data, causal), NUM_STEPS))
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == NUM_STEPS - k
    assert all(_equal(g, e) for g, e in zip(rest, expected[k:], strict=True))


@pytest.mark.parametrize("form", ["iter_dataset"])
def test_the_iterator_state_round_trips_through_orbax(data, tmp_path, form):
    make = getattr(loader, form)
    expected = _expected(data, False, range(NUM_STEPS))
    it = iter(make(_batches(data, False), NUM_STEPS))
    _take(it, 4)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path, options=options) as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    _take(it, 3)

    fresh = iter(make(_batches(data, False), NUM_STEPS))
    with ocp.CheckpointManager(tmp_path, options=options) as manager:
        assert manager.latest_step() == 4
        restored = manager.restore(
            4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
        ).data
    rest = list(restored)
    assert len(rest) == NUM_STEPS - 4
    assert all(_equal(g, e) for g, e in zip(rest, expected[4:], strict=True))


@pytest.mark.parametrize("form", ["batch_dataset", "iter_dataset"])
@pytest.mark.parametrize("causal", [True, False])
def test_process_shards_concatenate_to_the_global_batch(data, form, causal):
    expected = _expected(data, causal, range(NUM_STEPS))
    count = 4
    shards = []
    for index in range(count):
        options = grain.sharding.ShardOptions(shard_index=index, shard_count=count)
        shards.append(list(getattr(loader, form)(_batches(data, causal), NUM_STEPS, options)))
    for step, want in enumerate(expected):
        parts = [shard[step] for shard in shards]
        # Every process gets the same shapes: B / count rows, N / count slots.
        assert {tuple(p["inputs"].shape) for p in parts} == {(32 // count, want["inputs"].shape[1])}
        assert {tuple(p["targets"].shape) for p in parts} == {(want["targets"].shape[0] // count,)}
        glued = {k: np.concatenate([p[k] for p in parts]) for k in want}
        assert _equal(glued, want)
        # Process i holds rows [i * B/n, (i + 1) * B/n), as put_batch slices.
        assert np.array_equal(parts[1]["inputs"], want["inputs"][8:16])


def test_shard_by_jax_process_on_one_process_is_the_global_batch(data):
    ds = loader.batch_dataset(_batches(data, True), NUM_STEPS, grain.sharding.ShardByJaxProcess())
    assert _equal(ds[2], _expected(data, True, [2])[0])


def test_uneven_shards_are_refused(data):
    with pytest.raises(ValueError, match="multiple of the shard count 3"):
        loader.batch_dataset(
            _batches(data, True), NUM_STEPS, grain.sharding.ShardOptions(0, shard_count=3)
        )
    with pytest.raises(ValueError, match="multiple of the shard count 3"):
        loader.shard_rows({"x": np.zeros((4, 2))}, 0, 3)


def test_steps_outside_the_source_are_refused(data):
    source = loader.BatchSource(_batches(data, True), 5)
    with pytest.raises(IndexError):
        source[5]
    with pytest.raises(ValueError, match="num_steps"):
        loader.BatchSource(_batches(data, True), 0)
