"""Tests for the raw-data readers in distill_jax/data/sources.py."""

import datetime
import os
import re
import time
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_jax.data import sources
from distill_jax.data.types import DataError

GENRES_100K = "unknown|0\nAction|1\nComedy|2\n\n"
U_ITEM = (
    # Latin-1 bytes (0xe9 = é) in a title, as in the real u.item.
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
    "2|Mis\xe9rables, Les (1995)|01-Jan-1995||http://x|0|1|1\n"
    "3|Unknown|||http://x|1|0|0\n"
).encode("latin-1")
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def ml100k(folder: Path, data: str | bytes = "2\t3\t4\t300\n1\t1\t5\t100\n1\t2\t3.5\t200\n\n"):
    """A MovieLens 100K folder; `data` is u.data's content."""
    folder.mkdir(exist_ok=True)
    write(folder / "u.data", data)
    write(folder / "u.item", U_ITEM)
    write(folder / "u.genre", GENRES_100K)
    write(folder / "u.user", U_USER)
    return folder


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ readers


def test_movielens_100k_layout(tmp_path):
    raw = sources.read_movielens(ml100k(tmp_path / "ml-100k"))
    # File order, not sorted: the reader must not reorder or clean.
    np.testing.assert_array_equal(raw.user_ids, [2, 1, 1])
    np.testing.assert_array_equal(raw.item_ids, [3, 1, 2])
    np.testing.assert_array_equal(raw.timestamps, [300, 100, 200])
    np.testing.assert_array_equal(raw.ratings, [4.0, 5.0, 3.5])
    assert raw.user_ids.dtype == np.int64 and raw.timestamps.dtype == np.int64
    assert raw.ratings.dtype == np.float32
    assert raw.item_features["title"][2] == "Misérables, Les (1995)"
    assert raw.item_features["genres"] == {1: ("Comedy",), 2: ("Action", "Comedy"), 3: ("unknown",)}
    assert raw.user_features == {
        "age": {1: 24, 2: 53},
        "gender": {1: "M", 2: "F"},
        "occupation": {1: "technician", 2: "other"},
        "zip_prefix": {1: "8", 2: "9"},
    }
    assert len(raw) == 3 and "u.data" in raw.files[0]


def test_movielens_1m_layout(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    write(folder / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    titles = "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
    titles += "661::Caf\xe9 (1996)::Animation|Musical\n"
    write(folder / "movies.dat", titles.encode("latin-1"))
    write(folder / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    raw = sources.read_movielens(folder)
    np.testing.assert_array_equal(raw.user_ids, [1, 2])
    np.testing.assert_array_equal(raw.item_ids, [1193, 661])
    np.testing.assert_array_equal(raw.ratings, [5, 3])
    np.testing.assert_array_equal(raw.timestamps, [978300760, 978302109])
    assert raw.item_features["title"][661] == "Café (1996)"
    assert raw.item_features["genres"][661] == ("Animation", "Musical")
    assert raw.user_features["gender"] == {1: "F", 2: "M"}
    assert raw.user_features["age"] == {1: 1, 2: 56}
    assert raw.user_features["occupation"] == {1: 10, 2: 16}
    assert raw.name.startswith("movielens-1m")


def test_movielens_10m_layout_has_half_stars_and_no_users(tmp_path):
    folder = tmp_path / "ml-10M100K"
    folder.mkdir()
    write(folder / "ratings.dat", "1::122::5::838985046\n1::185::4.5::838983525\n")
    write(
        folder / "movies.dat",
        "122::Boomerang (1992)::Comedy|Romance\n185::Net, The::(no genres listed)\n",
    )
    raw = sources.read_movielens(folder)
    np.testing.assert_array_equal(raw.ratings, [5.0, 4.5])
    assert raw.item_features["genres"] == {122: ("Comedy", "Romance"), 185: ()}
    assert raw.user_features == {}
    assert raw.name.startswith("movielens-10m")


def test_movielens_csv_layout_with_quoted_commas(tmp_path):
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    write(
        folder / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,11,4.0,964982703\n1,1,2.5,964981247\n",
    )
    write(
        folder / "movies.csv",
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '12,"Amélie, ""the"" film",(no genres listed)\n',
    )
    raw = sources.read_movielens(folder)
    np.testing.assert_array_equal(raw.user_ids, [1, 1])
    np.testing.assert_array_equal(raw.item_ids, [11, 1])
    np.testing.assert_array_equal(raw.ratings, [4.0, 2.5])
    np.testing.assert_array_equal(raw.timestamps, [964982703, 964981247])
    assert raw.item_ids.dtype == np.int64 and raw.timestamps.dtype == np.int64
    assert raw.item_features["title"][11] == "American President, The (1995)"
    assert raw.item_features["title"][12] == 'Amélie, "the" film'
    assert raw.item_features["genres"][11] == ("Comedy", "Drama", "Romance")
    assert raw.item_features["genres"][12] == ()


def test_s3rec(tmp_path):
    path = write(tmp_path / "Beauty.txt", "1 5 3 9\n2 7\n10 3 3\n\n\n")
    raw = sources.read_s3rec(path)
    np.testing.assert_array_equal(raw.user_ids, [1, 1, 1, 2, 10, 10])
    np.testing.assert_array_equal(raw.item_ids, [5, 3, 9, 7, 3, 3])  # line order, repeats kept
    assert raw.timestamps is None and raw.ratings is None
    assert raw.files == [str(path)]


def test_s3rec_ids_must_be_plain_non_negative_64_bit_integers(tmp_path):
    cases = {
        "1 2 3\n2 4 -5\n": "2: expected a non-negative integer item id in field 3, got -5",
        "1 2 3\n-2 4 5\n": "2: expected a non-negative integer user id in field 1, got -2",
        "1 2 3\n2 99999999999999999999\n": (
            "2: expected an integer item id in field 2, got '99999999999999999999' "
            "(outside the 64-bit integer range"
        ),
        "1 2 0x10\n": "1: expected an integer item id in field 3, got '0x10'",  # not 16
        "1 2 3\n2 4 3\n1 7\n": "3: user 1 already has line 1; expected one line per user",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = write(tmp_path / f"seq{i}.txt", text)
        message = error_of(sources.read_s3rec, path)
        assert message.startswith(f"{path}:{expected}"), message
    path = write(tmp_path / "big.txt", f"0 {2**63 - 1} 0\n")  # the extremes are ids
    np.testing.assert_array_equal(sources.read_s3rec(path).item_ids, [2**63 - 1, 0])


def test_interactions_csv_string_ids_and_iso_times(tmp_path):
    path = write(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp,rating,comment\n"
        "u1,007,2020-01-31T12:00:00Z,4,hi\n"
        "u2,a,2020-01-31 14:00:00+02:00,,\n"  # same instant as row 1; missing rating
        "u1,b,2020-02-01,5,x\n"
        ",b,2020-02-01T00:00:01,3,missing user\n",
    )
    items = write(tmp_path / "items.csv", "item_id,title,price\n007,Bond,1.5\na,Apple,2\n")
    users = write(tmp_path / "users.csv", "user_id,age\nu1,30\nu2,\n")
    raw = sources.read_interactions(path, item_features_path=items, user_features_path=users)
    assert raw.user_ids.tolist() == ["u1", "u2", "u1", None]
    assert raw.item_ids.tolist() == ["007", "a", "b", "b"]  # '007' keeps its spelling
    noon = int(datetime.datetime(2020, 1, 31, 12, tzinfo=datetime.UTC).timestamp())
    feb1 = int(datetime.datetime(2020, 2, 1, tzinfo=datetime.UTC).timestamp())
    np.testing.assert_array_equal(raw.timestamps, [noon, noon, feb1, feb1 + 1])
    assert raw.timestamps.dtype == np.int64
    np.testing.assert_array_equal(raw.ratings, [4, np.nan, 5, 3])  # 'rating' found by name
    assert raw.item_features == {
        "title": {"007": "Bond", "a": "Apple"},
        "price": {"007": 1.5, "a": 2.0},
    }
    # An empty cell is a missing value: u2 has no age (encoded as the mean).
    assert raw.user_features == {"age": {"u1": 30}}
    assert raw.files == [str(path), str(items), str(users)]


def test_interactions_csv_integer_ids_numeric_times_and_options(tmp_path):
    path = write(tmp_path / "log.tsv", "who\twhat\twhen\n3\t10\t1.5\n1\t20\t2\n")
    items = write(tmp_path / "items.tsv", "what\tname\n10\tten\n20\ttwenty\n")
    raw = sources.read_interactions(
        path,
        user_col="who",
        item_col="what",
        time_col="when",
        delimiter="\t",
        item_features_path=items,
    )
    assert raw.user_ids.dtype == np.int64 and raw.item_ids.dtype == np.int64
    np.testing.assert_array_equal(raw.user_ids, [3, 1])
    np.testing.assert_array_equal(raw.timestamps, [1.5, 2.0])  # fractional: float64
    assert raw.ratings is None
    assert raw.item_features == {"name": {10: "ten", 20: "twenty"}}  # int keys, like the ids
    raw = sources.read_interactions(
        path, user_col="who", item_col="what", time_col=None, delimiter="\t"
    )
    assert raw.timestamps is None


@pytest.fixture
def non_utc_local_time(monkeypatch):
    """Local time far from UTC, so that reading zone-less times as local time shows."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    "times",
    [
        ["2020-01-31T12:00:00", "2020-01-31 12:00:05"],  # no zone: Arrow's parser, read as UTC
        ["2020-01-31T12:00:00Z", "2020-01-31T14:00:05+02:00"],  # zones: Arrow's parser
        ["2020-01-31T12:00:00.250Z", "2020-01-31T12:00:05"],  # mixed: Python's parser
    ],
)
def test_iso_times_in_every_form_give_utc_seconds(tmp_path, times, non_utc_local_time):
    rows = "".join(f"u,i,{t}\n" for t in times)
    raw = sources.read_interactions(write(tmp_path / "t.csv", "user_id,item_id,timestamp\n" + rows))
    noon = int(datetime.datetime(2020, 1, 31, 12, tzinfo=datetime.UTC).timestamp())
    np.testing.assert_array_equal(raw.timestamps, [noon, noon + 5])
    assert raw.timestamps.dtype == np.int64


def test_interactions_csv_with_bom_crlf_and_missing_integer_ids(tmp_path):
    content = "\ufeffuser_id,item_id,timestamp\r\n1,5,10\r\n,6,11\r\n3,7,\r\n"
    raw = sources.read_interactions(write(tmp_path / "log.csv", content))
    # Missing values are kept for the preprocessing step to count, not dropped here.
    assert raw.user_ids.tolist() == [1, None, 3]
    assert raw.item_ids.dtype == np.int64
    np.testing.assert_array_equal(raw.timestamps, [10, 11, np.nan])


def test_interactions_parquet(tmp_path):
    path = tmp_path / "log.parquet"
    when = [datetime.datetime(2021, 5, 1, 8, 30, s) for s in (0, 5, 9)]
    table = pa.table(
        {
            "user_id": pa.array([7, 8, 7], pa.int32()),
            "item_id": ["x", "y", "x"],
            "timestamp": pa.array(when, pa.timestamp("ms")),
            "rating": [1.0, 2.0, 3.0],
        }
    )
    pq.write_table(table, path)
    features = tmp_path / "users.pq"
    pq.write_table(pa.table({"user_id": [7, 8], "country": ["DE", "FR"]}), features)
    raw = sources.read_interactions(path, user_features_path=features)
    np.testing.assert_array_equal(raw.user_ids, [7, 8, 7])
    assert raw.user_ids.dtype == np.int64
    assert raw.item_ids.tolist() == ["x", "y", "x"]
    start = int(when[0].replace(tzinfo=datetime.UTC).timestamp())
    np.testing.assert_array_equal(raw.timestamps, [start, start + 5, start + 9])
    np.testing.assert_array_equal(raw.ratings, [1, 2, 3])
    assert raw.user_features == {"country": {7: "DE", 8: "FR"}}


def test_read_source_dispatches_and_names_unknown_kinds(tmp_path):
    path = write(tmp_path / "seq.txt", "1 2 3\n")
    assert len(sources.read_source("s3rec", path)) == 2
    assert len(sources.read_source("movielens", ml100k(tmp_path / "ml"))) == 3
    csv = write(tmp_path / "x.csv", "u,i\na,b\n")
    raw = sources.read_source("interactions", csv, user_col="u", item_col="i", time_col=None)
    assert raw.item_ids.tolist() == ["b"]
    message = error_of(sources.read_source, "netflix", path)
    assert "'netflix'" in message and "movielens" in message


def test_download_movielens_unpacks_atomically(tmp_path, monkeypatch):
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("u.data", "u.item", "u.genre", "u.user"):
            source = ml100k(tmp_path / "src") / name
            zf.write(source, f"ml-100k/{name}")
    monkeypatch.setitem(sources.MOVIELENS_URLS, "ml-100k", archive.as_uri())
    dest = tmp_path / "data"
    folder = sources.download_movielens("ml-100k", dest)
    assert folder == dest / "ml-100k"
    assert len(sources.read_movielens(folder)) == 3
    assert sorted(p.name for p in dest.iterdir()) == ["ml-100k"]  # no temporary files left

    missing = (tmp_path / "nothing.zip").as_uri()
    monkeypatch.setitem(sources.MOVIELENS_URLS, "ml-1m", missing)
    assert missing in error_of(sources.download_movielens, "ml-1m", dest)
    assert not (dest / "ml-1m").exists()
    monkeypatch.setitem(
        sources.MOVIELENS_URLS, "ml-20m", write(tmp_path / "bad.zip", "junk").as_uri()
    )
    assert "zip" in error_of(sources.download_movielens, "ml-20m", dest)
    assert sorted(p.name for p in dest.iterdir()) == ["ml-100k"]
    assert "'ml-7'" in error_of(sources.download_movielens, "ml-7", dest)

    # The config's download: fetched into path once, found there by every later run.
    from distill_jax.data import dataset

    cfg = ml_collections.ConfigDict({"source": "movielens", "download": "ml-100k"})
    cfg.path = str(tmp_path / "fresh")
    first = dataset.movielens_path(cfg)
    archive.unlink()  # a second download would fail now
    assert dataset.movielens_path(cfg) == first == tmp_path / "fresh" / "ml-100k"
    cfg.path = str(first)  # a path that is the MovieLens folder itself
    assert dataset.movielens_path(cfg) == first


# ------------------------------------------------------------------ bad input


def test_malformed_lines_name_file_line_and_layout(tmp_path):
    folder = ml100k(tmp_path / "a", "1\t1\t5\t100\n12\t5\t3\n")
    message = error_of(sources.read_movielens, folder)
    path = folder / "u.data"
    assert message == (
        f"{path}:2: expected 4 tab-separated fields (user item rating timestamp), "
        "got 3: '12\\t5\\t3'"
    )
    folder = tmp_path / "b"
    folder.mkdir()
    write(folder / "ratings.dat", "1::2::3::4\n1::2::3::4::5\n")
    write(folder / "movies.dat", "2::Film::Drama\n")
    message = error_of(sources.read_movielens, folder)
    assert message.startswith(f"{folder / 'ratings.dat'}:2: expected 4 '::'-separated fields")
    assert "got 5" in message

    folder = ml100k(tmp_path / "c")
    write(folder / "u.item", U_ITEM + b"4|Short|line\n")
    message = error_of(sources.read_movielens, folder)
    assert message.startswith(f"{folder / 'u.item'}:4: expected 8 pipe-separated fields")
    assert "3 genre flags" in message

    path = write(tmp_path / "seq.txt", "1 2 3\n5\n")
    message = error_of(sources.read_s3rec, path)
    assert (
        message.startswith(f"{path}:2: expected 'user item1 item2 ...'")
        and "got 1 field" in message
    )

    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,b,1\nc,d\n")
    message = error_of(sources.read_interactions, path)
    assert message.startswith(f"{path}:3: expected 3 comma-separated fields")
    assert "(user_id,item_id,timestamp), got 2: 'c,d'" in message


def test_blank_line_inside_data_is_malformed(tmp_path):
    folder = ml100k(tmp_path / "a", "1\t1\t5\t100\n\n1\t2\t5\t100\n")
    assert "u.data:2: expected 4 tab-separated fields" in error_of(sources.read_movielens, folder)
    path = write(tmp_path / "seq.txt", "1 2\n\n3 4\n")
    assert f"{path}:2: expected" in error_of(sources.read_s3rec, path)


def test_non_integer_ids(tmp_path):
    folder = ml100k(tmp_path / "a", "1\t1\t5\t100\n2\tabc\t5\t100\n")
    message = error_of(sources.read_movielens, folder)
    assert message == (
        f"{folder / 'u.data'}:2: expected an integer item id in field 2, "
        "got 'abc': '2\\tabc\\t5\\t100'"
    )
    path = write(tmp_path / "seq.txt", "1 2 3\n2 4 5.0 6\n")
    message = error_of(sources.read_s3rec, path)
    assert message.startswith(f"{path}:2: expected an integer item id in field 3, got '5.0'")
    path = write(tmp_path / "seq2.txt", "1 2 3\nu2 4\n")
    assert f"{path}:2: expected an integer user id in field 1, got 'u2'" in error_of(
        sources.read_s3rec, path
    )

    folder = tmp_path / "csv"
    folder.mkdir()
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n\n1,m7,3,4\n")
    write(folder / "movies.csv", "movieId,title,genres\n2,X,Drama\n")
    message = error_of(sources.read_movielens, folder)
    # Line 4: the blank line 3 is skipped but still counted.
    assert (
        message
        == f"{folder / 'ratings.csv'}:4: expected an integer movie id in column 'movieId', got 'm7'"
    )


def test_unparsable_timestamps_and_ratings(tmp_path):
    folder = ml100k(tmp_path / "a", "1\t1\t5\t100\n1\t2\t5\t2020-01-01\n")
    message = error_of(sources.read_movielens, folder)
    assert message.startswith(f"{folder / 'u.data'}:2: expected an integer timestamp")
    assert "got '2020-01-01'" in message
    folder = ml100k(tmp_path / "b", "1\t1\t5\t100\n1\t2\tfive\t100\n")
    assert "u.data:2: expected a number (rating) in field 3, got 'five'" in error_of(
        sources.read_movielens, folder
    )

    path = write(tmp_path / "iso.csv", "user_id,item_id,timestamp\na,b,2020-01-01\na,c,yesterday\n")
    message = error_of(sources.read_interactions, path)
    assert message.startswith(f"{path}:3: expected a timestamp") and "got 'yesterday'" in message
    path = write(tmp_path / "num.csv", "user_id,item_id,timestamp\na,b,100\na,c,200\na,d,1e\n")
    message = error_of(sources.read_interactions, path)
    assert message.startswith(f"{path}:4: expected a timestamp") and "got '1e'" in message
    path = write(tmp_path / "r.csv", "user_id,item_id,timestamp,rating\na,b,1,4\na,c,2,good\n")
    message = error_of(sources.read_interactions, path)
    assert message == f"{path}:3: expected a number (rating) in column 'rating', got 'good'"
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [1, 2], "timestamp": ["1", "x"]}), path)
    message = error_of(sources.read_interactions, path)
    assert message.startswith(f"{path}: row 2: expected a timestamp") and "got 'x'" in message


def test_missing_files(tmp_path):
    message = error_of(sources.read_movielens, tmp_path)
    assert message.startswith(f"no u.data, ratings.dat or ratings.csv in {tmp_path}; expected")
    assert "100K (u.data, u.item, u.genre, u.user)" in message
    assert f"{tmp_path / 'nope'}: no such directory" in error_of(
        sources.read_movielens, tmp_path / "nope"
    )
    folder = ml100k(tmp_path / "ml")
    (folder / "u.item").unlink()
    message = error_of(sources.read_movielens, folder)
    assert message.startswith(
        f"{folder / 'u.item'}: no such file; expected the MovieLens 100K layout"
    )

    message = error_of(sources.read_s3rec, tmp_path / "Beauty.txt")
    assert message.startswith(f"{tmp_path / 'Beauty.txt'}: no such file; expected an S3-Rec")
    message = error_of(sources.read_interactions, tmp_path / "log.csv")
    assert message.startswith(f"{tmp_path / 'log.csv'}: no such file")
    path = write(tmp_path / "ok.csv", "user_id,item_id,timestamp\na,b,1\n")
    message = error_of(sources.read_interactions, path, item_features_path=tmp_path / "items.csv")
    assert message.startswith(f"{tmp_path / 'items.csv'}: no such file")


def test_missing_columns_list_the_columns_found(tmp_path):
    path = write(tmp_path / "log.csv", "user,item_id,timestamp\na,b,1\n")
    message = error_of(sources.read_interactions, path)
    assert message == (
        f"{path}: no column 'user_id' (user_col); columns found: ['user', 'item_id', 'timestamp']"
    )
    assert "no column 'stars' (rating_col)" in error_of(
        sources.read_interactions, path, user_col="user", rating_col="stars"
    )
    parquet = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [1], "item": [2], "timestamp": [3]}), parquet)
    message = error_of(sources.read_interactions, parquet)
    assert message.startswith(
        f"{parquet}: no column 'item_id' (item_col); columns found: ['user_id', 'item'"
    )
    items = write(tmp_path / "items.csv", "id,title\n1,x\n")
    message = error_of(sources.read_interactions, path, user_col="user", item_features_path=items)
    assert (
        message
        == f"{items}: no column 'item_id' (the item id column); columns found: ['id', 'title']"
    )
    folder = tmp_path / "ml"
    folder.mkdir()
    write(folder / "ratings.csv", "userId,movieId,stars,timestamp\n1,2,3,4\n")
    write(folder / "movies.csv", "movieId,title,genres\n")
    assert "ratings.csv: no column 'rating' (MovieLens ratings.csv" in error_of(
        sources.read_movielens, folder
    )


def test_empty_files(tmp_path):
    folder = ml100k(tmp_path / "a", "")
    message = error_of(sources.read_movielens, folder)
    assert message.startswith(f"{folder / 'u.data'}: no interactions (empty file)")
    path = write(tmp_path / "seq.txt", "\n\n")
    assert error_of(sources.read_s3rec, path).startswith(f"{path}: no interactions (empty file)")
    path = write(tmp_path / "header.csv", "user_id,item_id,timestamp\n")
    assert error_of(sources.read_interactions, path).startswith(f"{path}: no interactions")
    path = write(tmp_path / "empty.csv", "")
    assert error_of(sources.read_interactions, path).startswith(
        f"{path}:1: empty file; expected a header"
    )
    parquet = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([], pa.int64()),
                "item_id": pa.array([], pa.int64()),
                "timestamp": pa.array([], pa.int64()),
            }
        ),
        parquet,
    )
    assert error_of(sources.read_interactions, parquet).startswith(f"{parquet}: no interactions")


def test_wrong_delimiters_are_named(tmp_path):
    folder = ml100k(tmp_path / "a", "196,242,3,881250949\n186,302,3,891717742\n")
    message = error_of(sources.read_movielens, folder)
    assert message == (
        f"{folder / 'u.data'}:1: expected 4 tab-separated fields (user item rating timestamp), "
        "got 1: '196,242,3,881250949' (it looks comma-separated; this file must be tab-separated)"
    )
    path = write(tmp_path / "seq.txt", "1,2,3\n")
    message = error_of(sources.read_s3rec, path)
    assert message.startswith(f"{path}:1: expected") and "it looks comma-separated" in message
    path = write(tmp_path / "seq.tsv", "1\t2\t3\n")
    assert "it looks tab-separated; this file must be space-separated" in error_of(
        sources.read_s3rec, path
    )
    path = write(tmp_path / "log.csv", "user_id\titem_id\ttimestamp\na\tb\t1\n")
    message = error_of(sources.read_interactions, path)
    assert message.startswith(f"{path}: no column 'user_id' (user_col)")
    assert "the header looks tab-separated; pass delimiter='\\t'" in message


def test_undecodable_bytes_name_line_and_offset(tmp_path):
    folder = ml100k(tmp_path / "a", b"1\t1\t5\t100\n1\t\xff2\t5\t100\n")
    message = error_of(sources.read_movielens, folder)
    assert message == (
        f"{folder / 'u.data'}:2: byte 0xff at offset 12 (column 3) is not valid UTF-8; "
        "expected a UTF-8 text file"
    )
    path = write(tmp_path / "seq.txt", b"1 2\n2 3\n3 4 \xe9\n")
    assert f"{path}:3: byte 0xe9 at offset 12 (column 5)" in error_of(sources.read_s3rec, path)
    path = write(tmp_path / "log.csv", b"user_id,item_id,timestamp\na,b,1\na,caf\xe9,2\n")
    message = error_of(sources.read_interactions, path)
    assert message.startswith(f"{path}:3: byte 0xe9 at offset 37 (column 6) is not valid UTF-8")
    # The same byte in the latin-1 files of MovieLens 100K and 1M is a character.
    assert (
        sources.read_movielens(ml100k(tmp_path / "b")).item_features["title"][2].startswith("Mis")
    )


# ------------------------------------------------------------------ real data


def datasets_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    return Path(os.environ.get("DISTILL_JAX_DATASETS", default))


def real(relative: str) -> Path:
    path = datasets_dir() / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (set DISTILL_JAX_DATASETS to the data sets folder)")
    return path


def test_real_movielens_100k():
    raw = sources.read_movielens(real("ml-100k"))
    assert len(raw) == 100_000
    assert len(np.unique(raw.user_ids)) == 943 and len(np.unique(raw.item_ids)) == 1682
    assert raw.timestamps.min() > 8e8 and set(np.unique(raw.ratings)) == {1, 2, 3, 4, 5}
    titles = raw.item_features["title"]
    assert len(titles) == 1682
    assert titles[1] == "Toy Story (1995)" and titles[543] == "Misérables, Les (1995)"
    genres = {g for movie in raw.item_features["genres"].values() for g in movie}
    assert len(genres) == 19 and {"Film-Noir", "Sci-Fi", "unknown"} <= genres
    assert raw.item_features["genres"][1] == ("Animation", "Children's", "Comedy")
    assert raw.user_features["occupation"][1] == "technician" and raw.user_features["age"][1] == 24


def test_real_beauty():
    raw = sources.read_s3rec(real("amazon-beauty/Beauty.txt"))
    assert len(raw) == 198_502
    assert len(np.unique(raw.user_ids)) == 22_363 and len(np.unique(raw.item_ids)) == 12_101
    assert raw.item_ids.min() == 1 and raw.item_ids.max() == 12_101
    np.testing.assert_array_equal(raw.item_ids[:5], [1, 2, 3, 4, 5])  # the first line's items
    assert (np.diff(raw.user_ids) >= 0).all()  # lines, hence users, in file order


def test_message_format_is_path_line_expected(tmp_path):
    """Every located error starts 'FILE:LINE: expected' or 'FILE: ...' (no bare messages)."""
    folder = ml100k(tmp_path / "a", "1\t1\t5\t100\n1\t2\t5\n")
    assert re.match(
        rf"^{re.escape(str(folder / 'u.data'))}:\d+: expected ",
        error_of(sources.read_movielens, folder),
    )
