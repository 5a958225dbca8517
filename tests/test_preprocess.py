"""Cleaning, remapping, time order, splits and popularity, against brute-force references."""

import collections
import math

import numpy as np
import pytest

from distill_jax.data import preprocess as pp
from distill_jax.data.types import DataError, RawInteractions


def _raw(users, items, times=None, ratings=None, **features) -> RawInteractions:
    """Object-dtype ids as the readers give for strings; float times/ratings (NaN allowed)."""
    as_obj = lambda xs: np.array(list(xs) + [None], object)[:-1]  # keeps 1-D even for tuples
    return RawInteractions(
        name="test",
        user_ids=as_obj(users),
        item_ids=as_obj(items),
        timestamps=None if times is None else np.array(times, np.float64),
        ratings=None if ratings is None else np.array(ratings, np.float32),
        **features,
    )


def _is_missing(v) -> bool:
    return (
        v is None
        or (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, str) and not v.strip())
    )


def _reference(raw, rating_threshold=None, k_core=0, min_user=3):
    """Pure-Python preprocessing: per-step (rows, users, items) and {user: [items]}."""
    n = len(raw.user_ids)
    t = [None] * n if raw.timestamps is None else raw.timestamps.tolist()
    r = [None] * n if raw.ratings is None else raw.ratings.tolist()
    rows = [(raw.user_ids[j], raw.item_ids[j], t[j], r[j]) for j in range(n)]
    counts = {}

    def count(step, rows):
        counts[step] = (
            len(rows),
            len({x[0] for x in rows if not _is_missing(x[0])}),
            len({x[1] for x in rows if not _is_missing(x[1])}),
        )

    count("read", rows)
    rows = [
        x
        for x in rows
        if not any(_is_missing(v) for v in x[:2])
        and not any(v is not None and math.isnan(v) for v in x[2:])
    ]
    count("missing", rows)
    seen, unique = set(), []
    for x in rows:
        if x not in seen:
            seen.add(x)
            unique.append(x)
    rows = unique
    count("duplicates", rows)
    if rating_threshold is not None:
        rows = [x for x in rows if x[3] >= rating_threshold]
    count("rating_threshold", rows)
    while k_core:
        cu = collections.Counter(x[0] for x in rows)
        ci = collections.Counter(x[1] for x in rows)
        kept = [x for x in rows if cu[x[0]] >= k_core and ci[x[1]] >= k_core]
        if len(kept) == len(rows):
            break
        rows = kept
    count("k_core", rows)
    cu = collections.Counter(x[0] for x in rows)
    rows = [x for x in rows if cu[x[0]] >= min_user]
    count("short_users", rows)
    seqs = {}
    for u in sorted({x[0] for x in rows}):
        mine = [x for x in rows if x[0] == u]  # file order
        if raw.timestamps is not None:
            mine = sorted(mine, key=lambda x: x[2])  # Python's sort is stable
        seqs[u] = [x[1] for x in mine]
    return counts, seqs


def _as_original(p: pp.Processed) -> dict:
    return {
        p.user_id_to_original[u]: p.items_to_original(s).tolist()
        for u, s in enumerate(p.sequences, start=1)
    }


def _random_raw(seed: int, n: int = 400) -> RawInteractions:
    rng = np.random.default_rng(seed)
    users = [f"u{x}" for x in rng.integers(0, 30, n)]
    items = [f"i{x}" for x in rng.integers(0, 25, n)]
    times = rng.integers(0, 15, n).astype(float)  # many ties
    ratings = rng.integers(1, 6, n).astype(float)
    for j in rng.choice(n, 60, replace=False):  # some exact copies of earlier rows
        k = rng.integers(0, j + 1)
        users[j], items[j], times[j], ratings[j] = users[k], items[k], times[k], ratings[k]
    for j in rng.choice(n, 8, replace=False):
        users[j] = None
    for j in rng.choice(n, 8, replace=False):
        items[j] = ""
    times[rng.choice(n, 5, replace=False)] = np.nan
    ratings[rng.choice(n, 5, replace=False)] = np.nan
    return _raw(users, items, times, ratings)


@pytest.mark.parametrize(
    "seed,threshold,k,min_user",
    [(0, None, 0, 3), (1, 3.0, 0, 2), (2, None, 4, 3), (3, 2.0, 3, 5), (4, 4.0, 2, 1)],
)
def test_matches_brute_force_reference(seed, threshold, k, min_user):
    raw = _random_raw(seed)
    p = pp.preprocess(raw, rating_threshold=threshold, k_core=k, min_user_interactions=min_user)
    counts, seqs = _reference(raw, threshold, k, min_user)
    assert tuple(p.stats) == pp.STEPS
    for step in pp.STEPS:
        got = p.stats[step]
        assert (got["rows"], got["users"], got["items"]) == counts[step], step
    assert _as_original(p) == seqs
    # The per-user times are sorted and aligned with the items.
    assert all(np.all(np.diff(t) >= 0) for t in p.timestamps)
    assert [len(t) for t in p.timestamps] == [len(s) for s in p.sequences]


def test_stats_each_step_removes_what_it_reports():
    p = pp.preprocess(_random_raw(5), rating_threshold=3.0, k_core=2)
    previous = None
    for step in pp.STEPS:
        c = p.stats[step]
        for key in ("rows", "users", "items"):
            expect = 0 if previous is None else previous[key] - c[key]
            assert c[f"removed_{key}"] == expect, (step, key)
        previous = c
    assert p.stats["read"]["rows"] == 400
    assert p.stats["short_users"]["rows"] == p.num_interactions
    assert p.stats["short_users"]["users"] == p.num_users
    assert p.stats["short_users"]["items"] == p.num_items
    assert "rating_threshold" in pp.format_stats(p.stats)


def test_missing_fields_are_dropped_and_counted():
    raw = _raw(
        ["a", None, "b", "a", "a", "b", "a", "b"],
        ["x", "y", "", "  ", "y", "z", "z", "x"],
        [1, 2, 3, 4, np.nan, 6, 7, 8],
        [5, 5, 5, 5, 5, np.nan, 5, 5],
    )
    p = pp.preprocess(raw, min_user_interactions=1)
    # Rows 1 (None user), 2 ('' item), 3 (blank item), 4 (NaN time), 5 (NaN rating).
    assert p.stats["missing"]["removed_rows"] == 5
    assert p.stats["read"]["items"] == 3  # x, y, z: '' and '  ' are not items
    assert p.stats["missing"]["items"] == 2  # y was only in incomplete rows
    assert _as_original(p) == {"a": ["x", "z"], "b": ["x"]}


def test_numeric_ids_with_nan_are_missing():
    raw = RawInteractions(
        "float ids",
        np.array([1.0, np.nan, 1.0, 1.0]),
        np.array([7.0, 8.0, np.nan, 9.0]),
        None,
        None,
    )
    p = pp.preprocess(raw, min_user_interactions=1)
    assert p.stats["missing"]["removed_rows"] == 2
    assert _as_original(p) == {1.0: [7.0, 9.0]}


def test_duplicates_are_exact_rows_and_the_first_is_kept():
    raw = _raw(
        ["a", "a", "a", "a", "a", "a"],
        ["x", "x", "x", "x", "y", "x"],
        [1, 1, 2, 1, 3, 1],
        [5, 5, 5, 4, 5, 5],
    )
    p = pp.preprocess(raw, min_user_interactions=1)
    # Rows 1 and 5 repeat row 0 exactly; row 2 differs in time, row 3 in rating.
    assert p.stats["duplicates"]["removed_rows"] == 2
    assert p.sequences[0].size == 4
    kept = pp.preprocess(raw, min_user_interactions=1, drop_duplicates=False)
    assert kept.stats["duplicates"]["removed_rows"] == 0 and kept.sequences[0].size == 6


def test_rating_threshold_keeps_ratings_at_or_above():
    raw = _raw(["a"] * 5, ["p", "q", "r", "s", "t"], [1, 2, 3, 4, 5], [1, 4, 3.5, 5, 4])
    p = pp.preprocess(raw, rating_threshold=4.0, min_user_interactions=1)
    assert _as_original(p) == {"a": ["q", "s", "t"]}
    assert p.stats["rating_threshold"]["removed_rows"] == 2
    assert p.stats["rating_threshold"]["removed_items"] == 2
    with pytest.raises(ValueError, match="has no ratings"):
        pp.preprocess(_raw(["a"], ["p"]), rating_threshold=4.0)


def test_k_core_iterates_to_the_fixed_point():
    # u4 has one row; removing it leaves i3 with one, removing that leaves u3
    # with one: three passes before users u1, u2 and items i1, i2 remain.
    users = ["u1", "u1", "u2", "u2", "u3", "u3", "u4"]
    items = ["i1", "i2", "i1", "i2", "i2", "i3", "i3"]
    raw = _raw(users, items)
    one_pass_u = collections.Counter(users)
    one_pass_i = collections.Counter(items)
    one_pass = [
        (u, i) for u, i in zip(users, items, strict=True) if min(one_pass_u[u], one_pass_i[i]) >= 2
    ]
    assert len(one_pass) == 6  # one pass is NOT enough here
    p = pp.preprocess(raw, k_core=2, min_user_interactions=1)
    assert _as_original(p) == {"u1": ["i1", "i2"], "u2": ["i1", "i2"]}
    assert p.stats["k_core"] == {
        "rows": 4, "users": 2, "items": 2,
        "removed_rows": 3, "removed_users": 2, "removed_items": 1,
    }  # fmt: skip
    flat = np.concatenate(p.sequences)
    assert np.bincount(flat)[1:].min() >= 2 and min(len(s) for s in p.sequences) >= 2


def test_short_users_are_dropped_and_counted_not_raised():
    raw = _raw(["a", "b", "b", "c", "c", "c", "d", "d", "d", "d"], list("xyxyzxyzxy"))
    p = pp.preprocess(raw, min_user_interactions=3)
    assert p.stats["short_users"]["removed_users"] == 2
    assert p.stats["short_users"]["removed_rows"] == 3
    assert sorted(p.user_original_to_id) == ["c", "d"]
    assert min(len(s) for s in p.sequences) >= 3
    with pytest.raises(DataError, match="no interaction is left"):
        pp.preprocess(raw, min_user_interactions=5)


@pytest.mark.parametrize(
    "users,items",
    [
        (["bob", "amy", "bob", "amy", "bob", "amy"], ["m9", "m2", "m5", "m9", "m2", "m7"]),
        (np.array([30, 10, 30, 10, 30, 10]), np.array([909, 202, 505, 909, 202, 707])),
    ],
)
def test_remapping_is_dense_sorted_and_round_trips(users, items):
    raw = (
        RawInteractions("ints", users, items, None, None)
        if isinstance(users, np.ndarray)
        else _raw(users, items)
    )
    p = pp.preprocess(raw)
    flat = np.concatenate(p.sequences)
    assert flat.dtype == np.int32
    assert set(flat.tolist()) == set(range(1, p.num_items + 1)) and p.num_items == 4
    # New ids follow the sorted original ids; entry 0 is only a placeholder.
    originals = sorted(set(np.asarray(items).tolist()))
    assert p.item_id_to_original[1:].tolist() == originals
    assert p.user_id_to_original[1:].tolist() == sorted(set(np.asarray(users).tolist()))
    assert p.item_id_to_original[0] in (None, -1)
    assert all(p.item_original_to_id[p.item_id_to_original[i]] == i for i in range(1, 5))
    assert all(p.user_original_to_id[p.user_id_to_original[u]] == u for u in (1, 2))
    # Round trip: every user's sequence in original ids is their rows in file order.
    for u, s in enumerate(p.sequences, start=1):
        mine = [i for uu, i in zip(users, items, strict=True) if uu == p.user_id_to_original[u]]
        assert p.items_to_original(s).tolist() == list(mine)


def test_time_sort_is_stable_and_no_timestamps_means_file_order():
    raw = _raw(
        ["a", "b", "a", "a", "b", "a", "a"],
        ["i1", "i2", "i3", "i4", "i5", "i6", "i7"],
        [5, 9, 1, 5, 2, 1, 3],
    )
    p = pp.preprocess(raw, min_user_interactions=1)
    # Times of a: i1 5, i3 1, i4 5, i6 1, i7 3 -> ties (i3, i6) and (i1, i4) keep file order.
    assert _as_original(p) == {"a": ["i3", "i6", "i7", "i1", "i4"], "b": ["i5", "i2"]}
    np.testing.assert_array_equal(p.timestamps[0], [1, 1, 3, 5, 5])
    untimed = pp.preprocess(_raw(raw.user_ids, raw.item_ids), min_user_interactions=1)
    assert untimed.timestamps is None
    assert _as_original(untimed) == {"a": ["i1", "i3", "i4", "i6", "i7"], "b": ["i2", "i5"]}


def test_features_follow_the_new_ids():
    raw = _raw(
        ["a", "a", "a", "b"],
        ["x", "y", "z", "w"],
        item_features={"title": {"x": "X", "z": "Z", "w": "W", "gone": "?"}},
        user_features={"age": {"a": 30, "b": 40}},
    )
    p = pp.preprocess(raw)  # b is too short, so w goes too
    ids = p.item_original_to_id
    assert p.item_features == {"title": {ids["x"]: "X", ids["z"]: "Z"}}
    assert p.user_features == {"age": {p.user_original_to_id["a"]: 30}}
    wrong_type = _raw(["a"] * 3, ["1", "2", "3"], item_features={"title": {1: "one"}})
    with pytest.raises(DataError, match="check the id types"):
        pp.preprocess(wrong_type)


def test_mixed_id_types_raise():
    with pytest.raises(DataError, match="mix types"):
        pp.preprocess(_raw(["a", 1, "a"], ["x", "y", "z"]))


def test_leave_one_out_on_processed_data():
    p = pp.preprocess(_random_raw(6), k_core=3)
    split = pp.leave_one_out(p.to_sequence_data())
    assert split.num_items == p.num_items and len(split.train) == p.num_users
    for s, tr, v, t in zip(
        p.sequences, split.train, split.valid_targets, split.test_targets, strict=True
    ):
        np.testing.assert_array_equal(np.concatenate([tr, [v, t]]), s)


def _timed_processed(seed: int = 7, users: int = 40, items: int = 30):
    """Items enter the catalogue over time (item k not before time 3k)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for t in np.sort(rng.integers(0, 100, rng.integers(4, 12))):
            rows.append((f"u{u:02d}", f"i{rng.integers(0, min(items, t // 3 + 1)):02d}", t))
    raw = _raw(*zip(*rows, strict=True))
    return pp.preprocess(raw, min_user_interactions=4)


def test_cold_users_never_appear_in_training():
    p = _timed_processed()
    split = pp.cold_start_split(p, cold_user_fraction=0.25, seed=1)
    cold = set(split.cold_users.tolist())
    assert len(cold) == round(0.25 * p.num_users)
    assert cold.isdisjoint(split.warm_users.tolist())
    assert len(split.warm_users) + len(cold) == p.num_users
    # The training rows are exactly the warm users' sequences minus their last two.
    for u, tr in zip(split.warm_users, split.train, strict=True):
        np.testing.assert_array_equal(tr, p.sequences[u - 1][:-2])
    # Each cold user is evaluated on the last item of their whole sequence.
    hist, tgt = split.eval_examples("cold_users")
    for u, h, t in zip(split.cold_users, hist, tgt, strict=True):
        np.testing.assert_array_equal(np.append(h, t), p.sequences[u - 1])
    plain = pp.cold_start_split(p)
    assert plain.counts["cold_users"] == 0 and plain.cold_items.size == 0
    ref = pp.leave_one_out(p.to_sequence_data())
    assert all(np.array_equal(a, b) for a, b in zip(plain.train, ref.train, strict=True))


def test_cold_items_never_appear_in_training_and_form_their_slice():
    p = _timed_processed()
    split = pp.cold_start_split(p, cold_item_fraction=0.3)
    items = np.concatenate(p.sequences)
    times = np.concatenate(p.timestamps)
    # Brute force: the cut-off starts the last 30% of interactions.
    cutoff = sorted(times)[int((1 - 0.3) * len(times))]
    first = {}
    for i, t in zip(items.tolist(), times.tolist(), strict=True):
        first[i] = min(first.get(i, math.inf), t)
    cold = sorted(i for i, t in first.items() if t >= cutoff)
    assert split.cold_item_cutoff == cutoff and split.cold_items.tolist() == cold
    assert 0 < len(cold) < p.num_items
    warm_items = set(np.concatenate(split.warm.full).tolist())
    assert warm_items.isdisjoint(cold)  # not in training, nor in warm valid/test targets
    assert set(np.concatenate(split.train).tolist()).isdisjoint(cold)
    # One example per user with a cold item: their first cold item after warm history.
    hist, tgt = split.eval_examples("cold_items")
    expect = {}
    for u, s in enumerate(p.sequences, start=1):
        pos = [j for j, i in enumerate(s.tolist()) if i in cold]
        if pos and pos[0] > 0:
            expect[u] = (s[: pos[0]].tolist(), int(s[pos[0]]))
    got = {
        int(u): (h.tolist(), int(t))
        for u, h, t in zip(split.cold_item_users, hist, tgt, strict=True)
    }
    assert got == expect and len(got) > 0
    assert split.counts["cold_item_users"] == len(got)
    with pytest.raises(ValueError, match="needs timestamps"):
        pp.cold_start_split(pp.preprocess(_raw(["a"] * 3, "xyz")), cold_item_fraction=0.1)


def test_random_cold_items_need_no_timestamps():
    # No times: an order-only file (S3-Rec).
    pairs = [(f"u{u}", f"i{(u * 7 + j * 3) % 40}") for u in range(30) for j in range(8)]
    p = pp.preprocess(_raw(*zip(*pairs, strict=True)), min_user_interactions=4)
    assert p.timestamps is None
    split = pp.cold_start_split(p, cold_item_fraction=0.2, cold_item_rule="random", seed=5)
    seen = np.unique(np.concatenate(p.sequences))
    cold = split.cold_items.tolist()
    assert len(cold) == round(0.2 * len(seen)) and set(cold) <= set(seen.tolist())
    assert split.cold_item_cutoff is None
    assert set(np.concatenate(split.train).tolist()).isdisjoint(cold)
    hist, tgt = split.eval_examples("cold_items")
    for u, h, t in zip(split.cold_item_users, hist, tgt, strict=True):
        s = p.sequences[u - 1].tolist()
        first = next(j for j, i in enumerate(s) if i in cold)
        assert h.tolist() == s[:first] and t == s[first] and first > 0
    assert len(tgt) > 0
    again = pp.cold_start_split(p, cold_item_fraction=0.2, cold_item_rule="random", seed=5)
    other = pp.cold_start_split(p, cold_item_fraction=0.2, cold_item_rule="random", seed=6)
    assert again.cold_items.tolist() == cold and other.cold_items.tolist() != cold
    with pytest.raises(ValueError, match="cold_item_rule='random'"):
        pp.cold_start_split(p, cold_item_fraction=0.2)  # 'time' without times: says what to set
    with pytest.raises(ValueError, match="cold_item_rule='newest'"):
        pp.cold_start_split(p, cold_item_fraction=0.2, cold_item_rule="newest")


def test_a_share_of_each_cold_slice_is_held_for_validation():
    p = _timed_processed()
    whole = pp.cold_start_split(p, cold_user_fraction=0.25, cold_item_fraction=0.3, seed=1)
    split = pp.cold_start_split(
        p, cold_user_fraction=0.25, cold_item_fraction=0.3, cold_valid_fraction=0.4, seed=1
    )
    for name in ("cold_users", "cold_items"):
        all_hist, all_tgt = whole.eval_examples(name)
        test_hist, test_tgt = split.eval_examples(name)
        valid_hist, valid_tgt = split.eval_examples(f"{name}_valid")
        assert len(valid_tgt) == round(0.4 * len(all_tgt)) > 0
        assert len(test_tgt) + len(valid_tgt) == len(all_tgt)
        users = split.user_ids(name) if split.item_features else None
        assert users is None  # no user features: no ids
        # The two parts are the whole slice, each example once.
        got = sorted(
            (tuple(h.tolist()), int(t))
            for h, t in [
                *zip(test_hist, test_tgt, strict=True),
                *zip(valid_hist, valid_tgt, strict=True),
            ]
        )
        want = sorted((tuple(h.tolist()), int(t)) for h, t in zip(all_hist, all_tgt, strict=True))
        assert got == want
        assert split.counts[f"{name}_valid"] == len(valid_tgt)
    with pytest.raises(ValueError, match="no 'cold_items_valid' slice"):
        whole.eval_examples("cold_items_valid")
    # With user features in use, each part keeps its users' ids.
    import dataclasses
    import types

    featured = dataclasses.replace(split, item_features=types.SimpleNamespace(users=object()))
    mask = split.cold_valid["cold_items"]
    np.testing.assert_array_equal(
        featured.user_ids("cold_items_valid"), split.cold_item_users[mask]
    )
    np.testing.assert_array_equal(featured.user_ids("cold_items"), split.cold_item_users[~mask])


def test_cold_start_split_is_deterministic_by_seed():
    p = _timed_processed()
    a = pp.cold_start_split(p, cold_user_fraction=0.3, cold_item_fraction=0.2, seed=3)
    b = pp.cold_start_split(p, cold_user_fraction=0.3, cold_item_fraction=0.2, seed=3)
    c = pp.cold_start_split(p, cold_user_fraction=0.3, cold_item_fraction=0.2, seed=4)
    np.testing.assert_array_equal(a.cold_users, b.cold_users)
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    assert a.counts == b.counts
    assert not np.array_equal(a.cold_users, c.cold_users)


def test_item_popularity_counts_only_the_training_part():
    p = pp.preprocess(_random_raw(8))
    split = pp.leave_one_out(p.to_sequence_data())
    pop = pp.item_popularity(split.train, p.num_items)
    ref = collections.Counter(i for s in split.train for i in s.tolist())
    assert pop.shape == (p.num_items + 1,) and pop[0] == 0
    assert pop.tolist() == [ref.get(i, 0) for i in range(p.num_items + 1)]
    full = pp.item_popularity(split.full, p.num_items)
    assert pop.sum() == full.sum() - 2 * p.num_users  # targets are not counted
    with pytest.raises(ValueError, match="1..3"):
        pp.item_popularity([np.array([1, 4])], 3)


def test_head_items_cover_the_share_with_the_fewest_items():
    rng = np.random.default_rng(0)
    for share in (0.2, 0.5, 0.9, 1.0):
        pop = rng.zipf(1.5, 51)
        pop[0] = 999  # padding is never a head item
        head = pp.head_items(pop, share)
        total = pop[1:].sum()
        assert not head[0]
        assert pop[head].sum() >= share * total - 1e-9
        # Minimal: without its least popular item the head falls short.
        least = np.flatnonzero(head)[np.argmin(pop[head])]
        assert pop[head].sum() - pop[least] < share * total
        # Every head item is at least as popular as every tail item.
        assert pop[head].min() >= pop[1:][~head[1:]].max(initial=0)
    # 7 of 25 is exactly 0.28: one item suffices (a naive 7 >= 0.28 * 25 wants two).
    head = pp.head_items(np.array([0, 7, 6, 6, 6]), 0.28)
    np.testing.assert_array_equal(head, [False, True, False, False, False])
