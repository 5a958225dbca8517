"""Synthetic data, the leave-one-out split and the batches."""

import chex
import numpy as np
import pytest

from configs import synthetic as synthetic_config
from distill_jax.data import pipeline, preprocess, synthetic


@pytest.fixture(scope="module")
def data():
    cfg = synthetic_config.get_config().data.synthetic
    return synthetic.generate(cfg, seed=0)


def test_deterministic_by_seed(data):
    cfg = synthetic_config.get_config().data.synthetic
    again = synthetic.generate(cfg, seed=0)
    other = synthetic.generate(cfg, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(data.sequences, again.sequences, strict=True))
    assert not all(
        len(a) == len(b) and np.array_equal(a, b)
        for a, b in zip(data.sequences, other.sequences, strict=True)
    )


def test_size_ids_and_lengths_follow_config(data):
    cfg = synthetic_config.get_config().data.synthetic
    assert data.num_users == cfg.num_users
    flat = np.concatenate(data.sequences)
    assert flat.min() >= 1 and flat.max() <= cfg.num_items
    lengths = np.array([len(s) for s in data.sequences])
    assert lengths.min() >= cfg.min_len and lengths.max() <= cfg.max_len
    assert abs(lengths.mean() - cfg.mean_len) < 0.15 * cfg.mean_len


def test_popularity_is_long_tailed(data):
    counts = np.bincount(np.concatenate(data.sequences), minlength=data.num_items + 1)[1:]
    top = np.sort(counts)[::-1]
    # The 10% most popular items take a large share; the median item is rare.
    assert top[: data.num_items // 10].sum() > 0.4 * counts.sum()
    assert np.median(counts) < counts.mean()


def _hr_at_10(score_fn, split):
    hits = 0
    histories, targets = split.eval_examples("test")
    for hist, target in zip(histories, targets, strict=True):
        scores = score_fn(hist).astype(np.float64)
        scores[0] = -np.inf
        scores[hist] = -np.inf
        scores[target] = score_fn(hist)[target]
        rank = 1 + np.sum(np.delete(scores, target) >= scores[target])
        hits += rank <= 10
    return hits / len(targets)


def test_a_sequence_model_clearly_beats_popularity(data):
    # A count-based next-item (bigram) model, fitted on the training part only,
    # is the simplest sequence model: it must beat popularity by a wide margin,
    # or the data would not reward sequence modelling.
    split = preprocess.leave_one_out(data)
    V = data.num_items
    pop = np.bincount(np.concatenate(split.train), minlength=V + 1).astype(np.float64)
    bigram = np.zeros((V + 1, V + 1))
    for s in split.train:
        np.add.at(bigram, (s[:-1], s[1:]), 1.0)
    hr_pop = _hr_at_10(lambda h: pop.copy(), split)
    hr_seq = _hr_at_10(lambda h: bigram[h[-1]] + 1e-3 * pop / pop.max(), split)
    assert hr_seq > 2.0 * hr_pop, (hr_seq, hr_pop)


def test_leave_one_out():
    d = synthetic.SequenceData(num_items=9, sequences=[np.array([1, 2, 3, 4]), np.array([5, 6, 7])])
    split = preprocess.leave_one_out(d)
    np.testing.assert_array_equal(split.train[0], [1, 2])
    np.testing.assert_array_equal(split.valid_targets, [3, 6])
    np.testing.assert_array_equal(split.test_targets, [4, 7])
    hist, tgt = split.eval_examples("test")
    np.testing.assert_array_equal(hist[0], [1, 2, 3])
    with pytest.raises(ValueError, match="fewer than 3 items"):
        preprocess.leave_one_out(synthetic.SequenceData(num_items=3, sequences=[np.array([1, 2])]))


def _train_batches(causal, seqs, **kw):
    args = dict(num_items=20, max_len=6, batch_size=4, causal=causal, mask_prob=0.3, seed=3)
    args.update(kw)
    return pipeline.TrainBatches(seqs, **args)


def _slots(b):
    """(row, position, target) of each valid packed slot."""
    S = b["inputs"].shape[1]
    idx = b["target_index"][b["where"]]
    return idx // S, idx % S, b["targets"][b["where"]]


def test_causal_batches_are_shifted_windows_and_cover_every_target():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 21, size=n).astype(np.int32) for n in (2, 3, 9, 14, 5, 7)]
    tb = _train_batches(True, seqs)
    seen = []
    for step in range(tb.steps_per_epoch):
        b = tb.batch(step)
        N = b["targets"].shape[0]
        chex.assert_shape([b["target_index"], b["where"]], (N,))
        rows, pos, tgt = _slots(b)
        for row in range(4):
            sel = rows == row
            if not sel.any():
                continue
            # Each target is the item after the input at its position, and a
            # row's targets sit at the right end of its window.
            inp = b["inputs"][row]
            S = len(inp)
            np.testing.assert_array_equal(pos[sel], np.arange(S - sel.sum(), S))
            assert np.all(inp[pos[sel]] > 0)
            seen.append((tuple(inp[pos[sel]]), tuple(tgt[sel])))
    # Every (item -> next item) pair of every sequence appears exactly once.
    pairs = sorted(p for inp, tgt in seen for p in zip(inp, tgt, strict=True))
    expect = sorted((int(a), int(b)) for s in seqs for a, b in zip(s[:-1], s[1:], strict=True))
    assert pairs == expect


def test_last_item_slot_adds_one_teacher_only_slot_per_user():
    rng = np.random.default_rng(5)
    # max_len=6: lengths 1 (no labelled pair), up to 6 (one window), 7+ (an extra window).
    seqs = [rng.integers(1, 21, size=n).astype(np.int32) for n in (1, 2, 3, 6, 7, 9, 14, 5)]
    plain = _train_batches(True, seqs)
    tb = _train_batches(True, seqs, last_item_slot=True)
    pairs, last_slots = [], []
    for step in range(tb.steps_per_epoch):
        b = tb.batch(step)
        N, S = b["targets"].shape[0], b["inputs"].shape[1]
        chex.assert_shape([b["kd_where"], b["where"]], (N,))
        assert not np.any(b["where"] & ~b["kd_where"])  # labelled slots are distilled too
        rows, pos, tgt = _slots(b)
        pairs += [(int(b["inputs"][r, p]), int(t)) for r, p, t in zip(rows, pos, tgt, strict=True)]
        soft = b["kd_where"] & ~b["where"]
        np.testing.assert_array_equal(b["targets"][soft], 0)
        for i in np.flatnonzero(soft):
            r, p = divmod(int(b["target_index"][i]), S)
            assert p == S - 1  # the slot sits at the row's newest input
            last_slots.append(tuple(int(x) for x in b["inputs"][r] if x))
    # The labelled pairs are exactly those of the batches without the option.
    expect = sorted((int(a), int(b)) for s in seqs for a, b in zip(s[:-1], s[1:], strict=True))
    assert sorted(pairs) == expect
    # One teacher-only slot per user, its input the user's newest max_len items.
    assert sorted(last_slots) == sorted(tuple(int(x) for x in s[-6:]) for s in seqs)
    assert tb.num_windows == plain.num_windows + 4  # lengths 1, 7, 9 and 14 need a window more
    assert "kd_where" not in plain.batch(0)
    with pytest.raises(ValueError, match="causal"):
        _train_batches(False, seqs, last_item_slot=True)


def test_packed_slots_stay_in_their_data_shard():
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, 21, size=n).astype(np.int32) for n in range(2, 40)]
    for causal in (True, False):
        tb = _train_batches(causal, seqs, batch_size=8, num_shards=4, max_len=10)
        for step in range(tb.steps_per_epoch):
            b = tb.batch(step)
            S, N = b["inputs"].shape[1], b["targets"].shape[0]
            assert N % 4 == 0
            # Slot block s holds rows 2s, 2s+1 only (filler slots included).
            shard_of_slot = np.repeat(np.arange(4), N // 4)
            np.testing.assert_array_equal(b["target_index"] // S // 2, shard_of_slot)
            # At most a third of each block's slots is filler (two sizes per octave).
            per_shard = b["where"].reshape(4, -1).sum(1)
            assert N // 4 <= max(pipeline.MIN_POSITIONS, 1.5 * per_shard.max())


def test_pack_bucket_sizes():
    sizes = [pipeline._pack_bucket(n, 8) for n in range(1, 200)]
    assert sorted(set(sizes)) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert all(s >= n for n, s in zip(range(1, 200), sizes, strict=True))
    # From FINE_PACK slots on, four sizes per octave: at most a fifth is padding.
    big = range(pipeline.FINE_PACK + 1, 5000)
    sizes = [pipeline._pack_bucket(n, 8) for n in big]
    assert sorted(set(sizes))[:5] == [640, 768, 896, 1024, 1280]
    assert all(n <= s <= 1.25 * n for n, s in zip(big, sizes, strict=True))


def test_batches_are_a_function_of_the_step():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 21, size=n).astype(np.int32) for n in range(2, 30)]
    for causal in (True, False):
        a, b = _train_batches(causal, seqs), _train_batches(causal, seqs)
        for step in (5, 0, 17, 5):  # any order: no hidden iterator state
            x, y = a.batch(step), b.batch(step)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        assert not np.array_equal(a.batch(0)["inputs"], a.batch(a.steps_per_epoch)["inputs"])


def test_masked_batches_hide_their_targets():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 21, size=n).astype(np.int32) for n in range(3, 12)]
    tb = _train_batches(False, seqs)
    for step in range(tb.steps_per_epoch):
        b = tb.batch(step)
        rows, pos, tgt = _slots(b)
        assert len(rows) > 0
        assert np.all(b["inputs"][rows, pos] == 21)  # the mask token V + 1
        assert np.all((tgt >= 1) & (tgt <= 20))


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_mask_last_prob_masks_the_last_item_alone_in_that_share_of_windows(share):
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, 21, size=n).astype(np.int32) for n in (3, 4, 5, 6) * 50]
    whole = {tuple(s) for s in seqs}
    tb = _train_batches(False, seqs, mask_last_prob=share, batch_size=20)
    last_only = 0
    for step in range(tb.steps_per_epoch):
        b = tb.batch(step)
        rows, pos, tgt = _slots(b)
        S = b["inputs"].shape[1]
        for row in range(20):
            sel = rows == row
            if sel.sum() == 1 and pos[sel][0] == S - 1:
                last_only += 1
                # The mask token hides the window's newest item, the target.
                inp = b["inputs"][row]
                assert inp[S - 1] == 21
                assert (*inp[(inp > 0) & (inp < 21)], tgt[sel][0]) in whole
    # Random masking (rate 0.3) alone leaves only the last of n items masked
    # with probability 0.3 * 0.7^(n-1) (it alone is picked) + 0.7^n / n (none
    # is, and the fallback picks it): 0.15 on average for n = 3..6.
    chance = np.mean([0.7**n / n + 0.3 * 0.7 ** (n - 1) for n in (3, 4, 5, 6)])
    expected = share + (1 - share) * chance
    assert abs(last_only / tb.num_windows - expected) < 0.08


def test_eval_batches_keep_the_whole_history():
    hist = [np.arange(1, 41, dtype=np.int32), np.array([3], np.int32)]
    batches = list(
        pipeline.eval_batches(
            hist, np.array([7, 8]), num_items=50, max_len=5, batch_size=4, causal=True
        )
    )
    assert len(batches) == 1
    b = batches[0]
    order = [1, 0]  # shortest history first
    np.testing.assert_array_equal(b["inputs"][1], [36, 37, 38, 39, 40])
    np.testing.assert_array_equal(b["inputs"][0], [0, 0, 0, 0, 3])
    assert b["history"].shape[1] >= 40
    np.testing.assert_array_equal(b["history"][1][:40], hist[0])
    np.testing.assert_array_equal(b["targets"][:2], np.array([7, 8])[order])
    np.testing.assert_array_equal(b["where"], [True, True, False, False])
    masked = next(
        pipeline.eval_batches(
            hist, np.array([7, 8]), num_items=50, max_len=5, batch_size=4, causal=False
        )
    )
    np.testing.assert_array_equal(masked["inputs"][1], [37, 38, 39, 40, 51])


def _triples(batch):
    """The (row, position from the right end, target) of every valid slot."""
    S = batch["inputs"].shape[1]
    row, pos = np.divmod(batch["target_index"][batch["where"]], S)
    tgt = batch["targets"][batch["where"]]
    inp = batch["inputs"][row, pos]
    return sorted(zip(row.tolist(), (S - pos).tolist(), tgt.tolist(), inp.tolist(), strict=True))


@pytest.mark.parametrize("causal", [True, False])
def test_fixed_shapes_give_one_shape_and_the_same_targets(data, causal):
    split = preprocess.leave_one_out(data)
    args = dict(
        num_items=data.num_items,
        max_len=12,
        batch_size=16,
        causal=causal,
        mask_prob=0.3,
        seed=0,
        num_shards=2,
    )
    bucketed = pipeline.TrainBatches(split.train, **args)
    fixed = pipeline.TrainBatches(split.train, fixed_shapes=True, **args)
    shapes = set()
    for step in range(bucketed.steps_per_epoch):
        a, b = bucketed.batch(step), fixed.batch(step)
        shapes.add(tuple(v.shape for v in b.values()))
        chex.assert_shape(b["inputs"], (16, 12))
        chex.assert_shape([b["target_index"], b["targets"], b["where"]], [(16 * 12,)] * 3)
        # Same rows, same targets at the same distance from the right end.
        assert _triples(a) == _triples(b)
        # Each shard's slots point into its own rows.
        rows = b["target_index"].reshape(2, -1) // 12
        assert rows[0].max() < 8 <= rows[1].min()
    assert len(shapes) == 1
    assert len({bucketed.batch(s)["target_index"].shape for s in range(10)}) > 1


def test_pack_positions_refuses_a_size_too_small():
    where = np.ones((2, 3), bool)
    pos = np.tile(np.arange(3), (2, 1))
    with pytest.raises(ValueError, match="size=4 slots cannot hold a shard's 6 targets"):
        pipeline.pack_positions(pos, pos, where, width=3, num_shards=1, size=4)
