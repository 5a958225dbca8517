"""Click data: labels, sampled non-clicks, the time split, vocabularies from training only."""

import numpy as np
import pytest

from distill_jax.data import clicks, sources
from distill_jax.data.types import DataError, RawInteractions
from tests.test_dataset import DATASETS, _need


def _raw():
    # 10 users x 4 ratings over time; user 9 and item 'z' appear only late.
    users, items, times, ratings = [], [], [], []
    for t in range(40):
        u = t % 9 if t < 36 else 9
        users.append(u)
        items.append("z" if t >= 38 else f"i{(t * 7) % 6}")
        times.append(1_000_000 + 3600 * t)
        ratings.append(1 + t % 5)
    return RawInteractions(
        name="toy",
        user_ids=np.array(users),
        item_ids=np.array(items, object),
        timestamps=np.array(times),
        ratings=np.array(ratings, np.float32),
        item_features={"genres": {f"i{k}": (("a",) if k % 2 else ("a", "b")) for k in range(6)}},
        user_features={
            "age": {u: 20 + 3 * u for u in range(10)},
            "job": {u: f"j{u % 3}" for u in range(10)},
        },
    )


def test_labels_negatives_and_the_time_split():
    raw = _raw()
    data = clicks.build(raw, click_threshold=4, negatives=2, seed=3)
    assert data.name == "toy"
    rows = sum(len(s) for s in data.splits.values())
    assert rows == 40 * 3
    seen = set(zip(raw.user_ids.tolist(), raw.item_ids.tolist(), strict=True))
    all_rows = [data.splits[k] for k in clicks.SPLITS]
    times = np.concatenate([s.times for s in all_rows])
    assert (np.diff(times) >= 0).all()  # train, then valid, then test, by time
    assert [len(s) for s in all_rows] == [96, 12, 12]
    clicks_total = sum(int(s.labels.sum()) for s in all_rows)
    assert clicks_total == int((raw.ratings >= 4).sum())
    for s in all_rows:
        for u, i, y in zip(s.users.tolist(), s.items.tolist(), s.labels.tolist(), strict=True):
            if (u, i) not in seen:
                assert y == 0  # every sampled pair is a non-click
    assert sum(c["sampled_non_clicks"] for k, c in data.counts.items() if k in clicks.SPLITS) == 80


def test_features_come_from_training_rows_only():
    data = clicks.build(_raw(), click_threshold=4, negatives=0)
    assert data.fields == ("user", "item", "user_job", "hour", "weekday")
    assert "user_age" in data.numeric_names and "item_genres=b" in data.numeric_names
    train, test = data.splits["train"], data.splits["test"]
    user_col, item_col = data.fields.index("user"), data.fields.index("item")
    # User 9 and item 'z' first appear after the training rows: out of vocabulary.
    late = test.users == 9
    assert late.any() and (test.categorical[late, user_col] == 0).all()
    assert (test.categorical[test.items == "z", item_col] == 0).all()
    assert (train.categorical[:, user_col] > 0).all()
    assert data.vocab_sizes[user_col] == len(set(train.users.tolist()))
    # Standardised with the training rows' statistics.
    age = data.numeric_names.index("user_age")
    np.testing.assert_allclose(train.numeric[:, age].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(train.numeric[:, age].std(), 1.0, atol=1e-5)
    # Cold slices: test rows of users/items training never saw.
    assert set(data.slice("cold_users").users.tolist()) == {9}
    assert set(data.slice("cold_items").items.tolist()) == {"z"}
    hour = data.fields.index("hour")
    assert data.vocab_sizes[hour] == 24


def test_implicit_data_and_bad_settings():
    raw = _raw()
    raw.ratings = None
    data = clicks.build(raw, click_threshold=None, negatives=1)
    assert sum(int(s.labels.sum()) for s in data.splits.values()) == 40
    with pytest.raises(ValueError, match="train_fraction=0.95, valid_fraction=0.1"):
        clicks.build(raw, train_fraction=0.95, valid_fraction=0.1)
    with pytest.raises(ValueError, match="negatives=-1"):
        clicks.build(raw, negatives=-1)
    bad = _raw()
    bad.ratings[3] = np.nan
    with pytest.raises(DataError, match="toy: interaction 3 has no rating"):
        clicks.build(bad)
    with pytest.raises(ValueError, match="unknown click slice 'cold'"):
        clicks.build(_raw()).slice("cold")


def test_movielens_100k_as_clicks():
    path = _need(DATASETS / "ml-100k")
    raw = sources.read_movielens(path)
    data = clicks.build(raw, click_threshold=4, negatives=1, drop_features={"title"})
    assert sum(len(s) for s in data.splits.values()) == 200_000
    assert sum(int(s.labels.sum()) for s in data.splits.values()) == 55_375
    assert {"user", "item", "user_gender", "user_occupation", "hour", "weekday"} <= set(data.fields)
    assert {"user_age", "item_year"} <= set(data.numeric_names)
    assert sum(n.startswith("item_genres=") for n in data.numeric_names) == 19
    assert data.counts["cold"]["cold_users"] > 0


def test_order_only_data_splits_each_users_history_by_its_place():
    raw = _raw()
    raw.timestamps = None  # an S3-Rec file: the order within each user only
    data = clicks.build(
        raw, click_threshold=4, negatives=0, train_fraction=0.5, valid_fraction=0.25
    )
    assert "hour" not in data.fields
    test, train = data.splits["test"], data.splits["train"]
    # Every user's latest rows are tested, their earliest trained on.
    for u in range(9):
        assert (train.users == u).sum() >= (test.users == u).sum()
    assert set(test.users.tolist()) <= set(train.users.tolist())  # no user is cold by construction
    assert np.all(test.times > 0.5)


def _history_reference(users, times, clicked, k):
    out = []
    for r in range(len(users)):
        before = [
            j
            for j in range(len(users))
            if users[j] == users[r] and times[j] < times[r] and clicked[j]
        ]
        out.append([-1] * (k - len(before[-k:])) + before[-k:])
    return np.array(out, np.int64).reshape(len(users), k)


@pytest.mark.parametrize("k", [1, 3])
def test_history_rows_are_the_users_earlier_clicks(k):
    rng = np.random.default_rng(k)
    users = rng.integers(0, 4, 60)
    times = np.sort(rng.integers(0, 25, 60)).astype(np.float64)  # ties: same-time rows
    clicked = rng.random(60) < 0.6
    got = clicks.history_rows(users, times, clicked, k)
    np.testing.assert_array_equal(got, _history_reference(users, times, clicked, k))


def test_rows_carry_the_items_clicked_before_them():
    raw = _raw()
    data = clicks.build(raw, click_threshold=4, negatives=2, history=3, seed=1)
    item_field = data.fields.index("item")
    assert data.history_field == item_field
    inverse = {}
    for split in data.splits.values():
        inverse.update(
            zip(split.categorical[:, item_field].tolist(), split.items.tolist(), strict=True)
        )
    inverse.pop(0, None)
    clicks_of = {}  # user -> [(time, item)] of real clicks
    for u, i, t, r in zip(raw.user_ids, raw.item_ids, raw.timestamps, raw.ratings, strict=True):
        if r >= 4:
            clicks_of.setdefault(u, []).append((t, i))
    checked = 0
    for split in data.splits.values():
        assert split.history.shape == (len(split), 3)
        for u, t, h in zip(split.users.tolist(), split.times.tolist(), split.history, strict=True):
            want = [i for s, i in sorted(clicks_of.get(u, [])) if s < t][-3:]
            got = [inverse.get(x, "<oov>") for x in h.tolist() if x]
            assert got == [i if i in inverse.values() else "<oov>" for i in want][-len(got) :]
            assert len(got) == len(want)
            checked += bool(want)
    assert checked > 20


def test_click_rows_round_trip_through_the_tfds_data_set(tmp_path, monkeypatch):
    data = clicks.build(_raw(), click_threshold=4, negatives=2, history=2, seed=1)
    clicks.write(data, "toy", str(tmp_path), "fp1")
    back = clicks.read("toy", str(tmp_path), "fp1")
    assert clicks.read("toy", str(tmp_path), "other") is None  # another fingerprint: rebuild
    assert back.fields == data.fields and back.vocab_sizes == data.vocab_sizes
    assert back.numeric_names == data.numeric_names and back.counts == data.counts
    for name in clicks.SPLITS:
        a, b = data.splits[name], back.splits[name]
        for field in ("categorical", "numeric", "labels", "times", "history"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert a.users.tolist() == b.users.tolist() and a.items.tolist() == b.items.tolist()
    assert back.history_field == data.history_field == data.fields.index("item")
    for k in data.cold:
        np.testing.assert_array_equal(data.cold[k], back.cold[k])


def test_the_click_task_builds_its_rows_once(tmp_path, monkeypatch):
    from distill_jax.data import dataset
    from distill_jax.train import click
    from tests.test_click_task import _config, _interactions

    config = _config(_interactions(tmp_path / "c.csv"))
    first = click.load(config, str(tmp_path / "w"))
    calls = []
    monkeypatch.setattr(dataset, "raw_interactions", lambda *a, **k: calls.append(1))
    again = click.load(config, str(tmp_path / "w"))
    assert not calls  # read back, the raw file untouched
    np.testing.assert_array_equal(first.splits["test"].numeric, again.splits["test"].numeric)
    config.seed = 1  # other sampled non-clicks: another data set
    with pytest.raises(TypeError):
        click.load(config, str(tmp_path / "w"))


def _table(path, rows=400):
    rng = np.random.default_rng(0)
    lines = ["label,t,user,item,device,price,slot"]
    for r in range(rows):
        device = ["phone", "tablet", "desktop"][r % 3]
        price = float(rng.uniform(1, 50))
        label = int(device == "phone" or price < 5)
        user = f"u{r % 25}" if r < 0.8 * rows else f"new{r}"
        lines.append(f"{label},{1000 + r},{user},i{r % 7},{device},{price:.2f},{r % 4}")
    lines.append(f"0,{1000 + rows},u1,i1,,,1")  # missing device and price
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_table_of_examples_becomes_click_rows(tmp_path):
    path = _table(tmp_path / "t.csv")
    data = clicks.from_table(
        str(path),
        label_col="label",
        time_col="t",
        user_col="user",
        item_col="item",
        categorical={"slot"},
    )
    assert data.fields == ("user", "item", "device", "slot")
    assert data.numeric_names == ("price",)
    assert sum(len(s) for s in data.splits.values()) == 401
    train, test = data.splits["train"], data.splits["test"]
    np.testing.assert_allclose(train.numeric[:, 0].mean(), 0.0, atol=1e-5)
    # The last row's device and price are missing: out of vocabulary, the training mean.
    device = data.fields.index("device")
    assert test.categorical[-1, device] == 0 and test.numeric[-1, 0] == 0.0
    assert len(data.cold["cold_users"]) == int((test.users != "u1").sum())  # the 'new' users
    with pytest.raises(DataError, match=r"t.csv: no column 'y' \(config.click.label_col\)"):
        clicks.from_table(str(path), label_col="y")
    bad = tmp_path / "bad.csv"
    bad.write_text("label,x\n1,a\n2,b\n")
    with pytest.raises(
        DataError, match=r"bad.csv:3: expected a 0/1 label in column 'label', got 2"
    ):
        clicks.from_table(str(bad), label_col="label")


def test_the_click_task_reads_a_table_of_examples(tmp_path):
    from distill_jax import pipeline
    from tests.test_click_task import _config

    config = _config(_table(tmp_path / "t.csv", rows=1200))
    config.data.update(source="click_table", path=str(tmp_path / "t.csv"))
    config.click.update(label_col="label", time_col="t", user_col="user", item_col="item")
    config.stages = "logistic,report"
    report = pipeline.run(config, str(tmp_path / "run"))
    assert report["models"]["logistic"]["metrics"]["test"]["auc"] > 0.9
