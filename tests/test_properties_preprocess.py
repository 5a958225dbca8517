"""Property tests of the cleaning and the splits (distill_jax/data/preprocess.py, splits.py).

Random raw interactions (missing, duplicate, huge, negative and string ids;
ties in time; empty and one-item users) are cleaned by `preprocess` and by a
plain Python reference of the documented steps; the two must agree exactly,
or `preprocess` must refuse with a `DataError` naming the data.
"""

import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from distill_jax.data import preprocess, splits
from distill_jax.data.types import DataError, RawInteractions

BIG = 2**63 - 1
INT_ID = st.sampled_from([-(2**63), -7, -1, 0, 1, 2, 3, 5, BIG - 1, BIG])
STR_ID = st.sampled_from(["a", "b", "B", "007", "7", " ", "", "\u00e9"])
MISSING = st.sampled_from([None, math.nan])


@st.composite
def raw_interactions(draw) -> RawInteractions:
    n = draw(st.integers(0, 16))
    mode = draw(st.sampled_from(["int", "int", "str", "mixed"]))

    def ids(distinct: int):
        # A few ids each, so that users and items repeat.
        if mode == "int":
            pool = draw(st.lists(INT_ID, min_size=1, max_size=distinct, unique=True))
            return np.asarray(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)))
        kinds = [STR_ID, MISSING] + ([INT_ID] if mode == "mixed" else [])
        pool = draw(st.lists(st.one_of(*kinds), min_size=1, max_size=distinct))
        out = np.empty(n, object)
        out[:] = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
        return out

    users, items = ids(3), ids(5)
    times = draw(
        st.one_of(
            st.none(),
            st.lists(st.integers(0, 3), min_size=n, max_size=n).map(
                lambda t: np.asarray(t, np.int64)
            ),
            st.lists(st.sampled_from([0.0, 1.5, 2.0, math.nan]), min_size=n, max_size=n).map(
                np.asarray
            ),
        )
    )
    ratings = draw(
        st.one_of(
            st.none(),
            st.lists(st.sampled_from([1.0, 3.0, 5.0, math.nan]), min_size=n, max_size=n).map(
                lambda r: np.asarray(r, np.float32)
            ),
        )
    )
    return RawInteractions(
        name="generated",
        user_ids=users,
        item_ids=items,
        timestamps=times,
        ratings=ratings,
        item_features={"f": {v: str(v) for v in items.tolist()[:2] if not _missing(v)}},
    )


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _reference(raw: RawInteractions, threshold, k, min_user, drop_duplicates):
    """The documented steps, row by row; (stats, output) or None where preprocess must refuse."""
    n = len(raw.user_ids)
    users, items = raw.user_ids.tolist(), raw.item_ids.tolist()
    times = None if raw.timestamps is None else raw.timestamps.tolist()
    ratings = None if raw.ratings is None else raw.ratings.tolist()
    for column in (users, items):
        if len({type(v) for v in column if not _missing(v)}) > 1:
            return None  # ints and strings cannot be ordered
    stats = {}

    def record(step, rows):
        entry = {
            "rows": len(rows),
            "users": len({users[r] for r in rows if not _missing(users[r])}),
            "items": len({items[r] for r in rows if not _missing(items[r])}),
        }
        previous = stats[next(reversed(stats))] if stats else entry
        for key in ("rows", "users", "items"):
            entry[f"removed_{key}"] = previous[key] - entry[key]
        stats[step] = entry

    rows = list(range(n))
    record("read", rows)
    rows = [
        r
        for r in rows
        if not _missing(users[r])
        and not _missing(items[r])
        and (times is None or not math.isnan(times[r]))
        and (ratings is None or not math.isnan(ratings[r]))
    ]
    record("missing", rows)
    if drop_duplicates:
        seen, kept = set(), []
        for r in rows:
            key = (users[r], items[r], times and times[r], ratings and ratings[r])
            if key not in seen:
                seen.add(key)
                kept.append(r)
        rows = kept
    record("duplicates", rows)
    if threshold is not None:
        rows = [r for r in rows if ratings[r] >= threshold]
    record("rating_threshold", rows)
    while k > 0:
        per_user = {u: sum(users[r] == u for r in rows) for u in {users[r] for r in rows}}
        per_item = {i: sum(items[r] == i for r in rows) for i in {items[r] for r in rows}}
        kept = [r for r in rows if per_user[users[r]] >= k and per_item[items[r]] >= k]
        if kept == rows:
            break
        rows = kept
    record("k_core", rows)
    per_user = {u: sum(users[r] == u for r in rows) for u in {users[r] for r in rows}}
    rows = [r for r in rows if per_user[users[r]] >= min_user]
    record("short_users", rows)
    if not rows:
        return None
    user_ids = sorted({users[r] for r in rows})
    item_ids = sorted({items[r] for r in rows})
    new_item = {v: i for i, v in enumerate(item_ids, 1)}
    sequences = []
    for u in user_ids:
        mine = [r for r in rows if users[r] == u]
        mine.sort(key=lambda r: (0 if times is None else times[r], r))  # stable: file order
        sequences.append(([new_item[items[r]] for r in mine], [times and times[r] for r in mine]))
    return stats, user_ids, item_ids, sequences


@settings(max_examples=250)
@given(
    raw_interactions(),
    st.sampled_from([None, 3.0]),
    st.integers(0, 3),
    st.integers(1, 4),
    st.booleans(),
)
def test_preprocess_matches_the_reference(raw, threshold, k, min_user, drop_duplicates):
    if threshold is not None and raw.ratings is None:
        threshold = None
    expected = _reference(raw, threshold, k, min_user, drop_duplicates)
    try:
        out = preprocess.preprocess(
            raw,
            rating_threshold=threshold,
            k_core=k,
            min_user_interactions=min_user,
            drop_duplicates=drop_duplicates,
        )
    except DataError as e:
        event("DataError")
        assert expected is None and str(e).startswith("generated: "), str(e)
        return
    assert expected is not None
    stats, user_ids, item_ids, sequences = expected
    assert out.stats == stats
    assert out.num_items == len(item_ids) and out.num_users == len(user_ids)
    assert out.item_id_to_original[1:].tolist() == item_ids
    assert out.user_id_to_original[1:].tolist() == user_ids
    assert out.item_original_to_id == {v: i for i, v in enumerate(item_ids, 1)}
    assert [s.tolist() for s in out.sequences] == [items for items, _ in sequences]
    if raw.timestamps is not None:
        assert [t.tolist() for t in out.timestamps] == [times for _, times in sequences]
    # Features follow the kept items to their new ids.
    for original, value in raw.item_features.get("f", {}).items():
        if original in out.item_original_to_id:
            assert out.item_features["f"][out.item_original_to_id[original]] == value


SEQUENCES = st.lists(st.lists(st.integers(1, 6), min_size=3, max_size=8), min_size=1, max_size=8)


def _processed(sequences: list[list[int]], timed: bool):
    """Processed data of these sequences (times: the position, so later is newer)."""
    users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    items = np.concatenate([np.asarray(s, np.int64) for s in sequences])
    times = np.concatenate([np.arange(len(s)) for s in sequences]) if timed else None
    raw = RawInteractions("generated", users, items, times, None)
    return preprocess.preprocess(raw, drop_duplicates=False)


@settings(max_examples=100)
@given(SEQUENCES)
def test_leave_one_out_matches_the_reference(sequences):
    out = preprocess.leave_one_out(_processed(sequences, False).to_sequence_data())
    remapped = [s.tolist() for s in out.full]
    assert [len(s) for s in remapped] == [len(s) for s in sequences]
    assert [s.tolist() for s in out.train] == [s[:-2] for s in remapped]
    assert out.valid_targets.tolist() == [s[-2] for s in remapped]
    assert out.test_targets.tolist() == [s[-1] for s in remapped]
    history, targets = out.eval_examples("test")
    assert [h.tolist() for h in history] == [s[:-1] for s in remapped]


@settings(max_examples=100)
@given(
    SEQUENCES,
    st.booleans(),
    st.sampled_from([0.0, 0.3, 0.9]),
    st.sampled_from([0.0, 0.2, 0.5]),
    st.integers(0, 3),
)
def test_cold_start_split_partitions_users_and_items(sequences, timed, user_frac, item_frac, seed):
    processed = _processed(sequences, timed)
    rule = "time" if timed else "random"
    try:
        split = splits.cold_start_split(
            processed,
            cold_user_fraction=user_frac,
            cold_item_fraction=item_frac,
            cold_item_rule=rule,
            seed=seed,
        )
    except DataError as e:
        event("DataError")
        assert str(e).startswith("generated: no warm user"), str(e)
        return
    counts = split.counts
    cold = set(split.cold_items.tolist())
    # Every user is warm, cold or counted as left out, once.
    assert (
        counts["warm_users"]
        + counts["cold_users"]
        + counts["warm_users_too_short"]
        + counts["cold_users_too_short"]
    ) == processed.num_users
    roles = split.warm_users.tolist() + split.cold_users.tolist()
    assert len(set(roles)) == len(roles)
    for user, seq in zip(split.warm_users.tolist(), split.warm.full, strict=True):
        original = processed.sequences[user - 1].tolist()
        assert seq.tolist() == [i for i in original if i not in cold]
    for hist, target in zip(split.cold_user_histories, split.cold_user_targets, strict=True):
        assert cold.isdisjoint(hist.tolist() + [int(target)])
    for user, hist, target in zip(
        split.cold_item_users, split.cold_item_histories, split.cold_item_targets, strict=True
    ):
        original = processed.sequences[user - 1].tolist()
        first = next(p for p, i in enumerate(original) if i in cold)
        assert hist.tolist() == original[:first] and int(target) == original[first]
    assert cold.isdisjoint(np.concatenate(split.train + [np.zeros(0, np.int32)]).tolist())


def test_the_time_rule_without_times_is_a_data_error():
    processed = _processed([[1, 2, 3]], timed=False)
    with pytest.raises(DataError, match="cold_item_rule='random'"):
        splits.cold_start_split(processed, cold_item_fraction=0.5, cold_item_rule="time")
