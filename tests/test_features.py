"""Side-feature files, their encoding (data/features.py), and how sources add them."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from distill_jax.data import features, sources
from distill_jax.data.types import DataError
from tests.test_sources import error_of, ml100k, real, write

# ------------------------------------------------------------------ attribute files


def test_item_attributes_are_read_by_integer_id(tmp_path):
    path = write(tmp_path / "attrs.json", json.dumps({"4": [1, 2, 3], "83": [4, 5, 4]}))
    assert features.read_item_attributes(path) == {4: (1, 2, 3), 83: (4, 5)}


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"4": [1, 2],\n "5": [3,]}', r"attrs.json:2: not valid JSON"),
        ("[1, 2]", r"expected a JSON object"),
        ("{}", r"expected a JSON object"),
        ('{"x4": [1]}', r"key 'x4' is not an integer item id"),
        ('{"4": 7}', r"key '4': expected a list of integer attribute ids >= 1, got 7"),
        ('{"4": [1, 0]}', r"key '4': expected a list of integer attribute ids >= 1"),
        ('{"4": [1, "b"]}', r"key '4': expected a list"),
        ('{"4": [1], "04": [2]}', r"key '04' is not an integer item id"),
    ],
)
def test_bad_attribute_files_name_the_file_and_key(tmp_path, content, match):
    path = write(tmp_path / "attrs.json", content)
    message = error_of(features.read_item_attributes, path)
    assert str(path) in message
    assert re.search(match, message), message


def test_missing_attribute_file(tmp_path):
    assert "attrs.json" in error_of(features.read_item_attributes, tmp_path / "attrs.json")


# ------------------------------------------------------------------ vector files


def _vectors(tmp_path: Path, matrix, ids: str) -> Path:
    path = tmp_path / "emb.npy"
    np.save(path, np.asarray(matrix))
    write(features.vectors_ids_path(path), ids)
    return path


def test_vectors_are_read_with_their_ids(tmp_path):
    path = _vectors(tmp_path, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "10\n-2\n7\n")
    assert features.vectors_ids_path(path).name == "emb.ids.txt"
    got = features.read_vectors(path)
    assert list(got) == [10, -2, 7]
    np.testing.assert_array_equal(got[7], [5.0, 6.0])
    assert got[7].dtype == np.float32
    got = features.read_vectors(_vectors(tmp_path, [[1.0], [2.0]], "a7\n007\n"))
    assert list(got) == ["a7", "007"]


@pytest.mark.parametrize(
    "matrix, ids, match",
    [
        ([[1.0], [2.0]], "1\n", r"emb.ids.txt: 1 ids for the 2 rows of emb.npy"),
        ([[1.0], [np.nan]], "1\n2\n", r"emb.npy: row 1 \(id 2, emb.ids.txt:2\) is not finite"),
        ([1.0, 2.0], "1\n2\n", r"expected a 2-D float matrix"),
        ([[1.0], [2.0]], "1\n1\n", r"emb.ids.txt:2: id 1 appears twice"),
        ([[1.0], [2.0], [3.0]], "1\n \n2\n", r"emb.ids.txt:2: empty line"),
    ],
)
def test_bad_vector_files_are_named(tmp_path, matrix, ids, match):
    message = error_of(features.read_vectors, _vectors(tmp_path, matrix, ids))
    assert re.search(match, message), message


def test_vectors_refuse_pickled_objects(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    write(features.vectors_ids_path(path), "1\n")
    assert "not a NumPy .npy matrix" in error_of(features.read_vectors, path)


def test_vectors_without_their_ids_file(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, np.ones((2, 2)))
    assert "emb.ids.txt" in error_of(features.read_vectors, path)


# ------------------------------------------------------------------ text


def test_text_vectors_put_related_titles_close():
    titles = {
        1: "Star Wars (1977)",
        2: "Return of the Jedi (1983)",
        3: "Star Wars: The Empire Strikes Back (1980)",
        4: "Toy Story (1995)",
        5: "Toy Story 2 (1999)",
        6: "Heat (1995)",
    }
    got = features.text_vectors(titles, 4, seed=0)
    assert set(got) == set(titles) and all(v.shape == (4,) for v in got.values())

    def cosine(a, b):
        a, b = got[a].astype(np.float64), got[b].astype(np.float64)
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    assert cosine(4, 5) > cosine(4, 1) and cosine(1, 3) > cosine(1, 6)
    again = features.text_vectors(titles, 4, seed=0)
    assert all(np.array_equal(got[k], again[k]) for k in titles)
    # An SVD keeps at most (texts - 1) columns.
    assert features.text_vectors({1: "a b", 2: "c d"}, 8)[1].shape == (1,)
    message = error_of(features.text_vectors, {1: " ", 2: "!"}, 4, where="titles")
    assert message == "titles: no text has a word; expected text to encode"


# ------------------------------------------------------------------ encoding


def test_encode_against_a_float64_reference():
    feats = {
        "genres": {1: ("Drama",), 2: ("Action", "Drama"), 4: ()},
        "gender": {1: "M", 2: "F", 3: "M"},
        "occupation": {1: 7, 3: 2},
        "year": {1: 1995, 2: 1977, 3: 1999},
        "emb": {2: np.array([1.0, 0.0], np.float32), 3: np.array([3.0, 4.0], np.float32)},
    }
    enc = features.encode(feats, 5, categorical=("occupation",))
    assert enc.num_rows == 5
    assert enc.vocab == {"gender": ["F", "M"], "genres": ["Action", "Drama"], "occupation": [2, 7]}
    np.testing.assert_array_equal(enc.bags["genres"], [[0, 0], [2, 0], [1, 2], [0, 0], [0, 0]])
    np.testing.assert_array_equal(enc.bags["gender"], [[0], [2], [1], [2], [0]])
    np.testing.assert_array_equal(enc.bags["occupation"], [[0], [2], [0], [1], [0]])
    years = np.array([1995, 1977, 1999], np.float64)
    want = np.zeros(5)
    want[1:4] = (years - years.mean()) / years.std()
    assert enc.numeric_names == ("year",)
    np.testing.assert_allclose(enc.numeric[:, 0], want, rtol=1e-6)
    assert enc.dense_names == (("emb", 2),)
    emb = np.array([[1.0, 0.0], [3.0, 4.0]])
    want = np.zeros((5, 2))
    want[2:4] = (emb - emb.mean(0)) / emb.std(0)
    np.testing.assert_allclose(enc.dense, want, rtol=1e-6)
    assert enc.coverage["genres"] == 0.75 and enc.coverage["emb"] == 0.5
    assert enc.bags["genres"].dtype == np.int32 and enc.numeric.dtype == np.float32
    assert "genres: 2 categories, up to 2 a row (75% of rows)" in enc.describe()


def test_encode_with_no_features_gives_empty_arrays():
    enc = features.encode({}, 3)
    assert enc.bags == {} and enc.numeric.shape == (3, 0) and enc.dense.shape == (3, 0)


def test_a_constant_numeric_feature_stays_finite():
    enc = features.encode({"year": {1: 2000, 2: 2000}}, 3)
    np.testing.assert_array_equal(enc.numeric[:, 0], [0, 0, 0])


@pytest.mark.parametrize(
    "feats, match",
    [
        ({"year": {0: 1995}}, r"feature 'year' has row id 0; expected 1..3"),
        ({"year": {4: 1995}}, r"row id 4"),
        ({"year": {1: 1995, 2: "old"}}, r"feature 'year' mixes \['category', 'number'\]"),
        ({"year": {1: float("inf")}}, r"feature 'year' of row 1 is inf"),
        ({"x": {1: np.ones(2), 2: np.ones(3)}}, r"feature 'x' has vectors of shapes"),
        ({"x": {1: np.array([np.nan])}}, r"feature 'x' of row 1 is not finite"),
        ({"x": {1: {"a": 1}}}, r"feature 'x' has a value of type dict"),
    ],
)
def test_bad_feature_values_are_named(feats, match):
    message = error_of(features.encode, feats, 4, where="items of test")
    assert message.startswith("items of test: ") and re.search(match, message)


# ------------------------------------------------------------------ sources


def test_movielens_100k_release_years(tmp_path):
    raw = sources.read_movielens(ml100k(tmp_path / "ml-100k"))
    assert raw.item_features["year"] == {1: 1995, 2: 1995}  # movie 3 has no date


def test_a_bad_release_date_names_the_line(tmp_path):
    folder = ml100k(tmp_path / "ml-100k")
    text = (folder / "u.item").read_bytes().replace(b"|01-Jan-1995|", b"|01-Jan-95|", 1)
    write(folder / "u.item", text)
    message = error_of(sources.read_movielens, folder)
    assert "u.item:1: expected a release date 'dd-Mon-yyyy'" in message


def test_side_feature_files_join_a_source(tmp_path):
    raw = sources.read_s3rec(write(tmp_path / "s.txt", "1 3 4\n2 4\n"))
    attrs = write(tmp_path / "attrs.json", json.dumps({"3": [1], "4": [2, 1]}))
    users = write(tmp_path / "users.csv", "user_id,age\n1,30\n2,40\n")
    raw = sources.add_side_features(raw, item_features_path=attrs, user_features_path=users)
    assert raw.item_features == {"attributes": {3: (1,), 4: (2, 1)}}
    assert raw.user_features == {"age": {1: 30, 2: 40}}
    assert raw.files[-2:] == [str(attrs), str(users)]
    again = sources.read_movielens(ml100k(tmp_path / "ml-100k"))
    table = write(tmp_path / "items.csv", "item_id,genres\n1,x\n")
    message = error_of(sources.add_side_features, again, item_features_path=table)
    assert "items.csv: item feature(s) ['genres'] are already given by movielens-100k" in message


def test_real_beauty_attributes():
    attrs = features.read_item_attributes(real("amazon-beauty/Beauty_item2attributes.json"))
    assert len(attrs) == 12_101 and set(attrs) == set(range(1, 12_102))
    assert len({a for v in attrs.values() for a in v}) == 637
    assert 3.6 < np.mean([len(v) for v in attrs.values()]) < 3.8
    enc = features.encode({"attributes": attrs}, 12_102)
    assert len(enc.vocab["attributes"]) == 637 and enc.coverage["attributes"] == 1.0


def test_real_movielens_100k_years_and_titles():
    raw = sources.read_movielens(real("ml-100k"))
    years = raw.item_features["year"]
    assert len(years) == 1681 and years[1] == 1995 and min(years.values()) >= 1920
    titles = features.text_vectors(raw.item_features["title"], 32)
    assert len(titles) == 1682 and titles[1].shape == (32,)


def test_an_attribute_file_is_cached_with_the_data_and_its_changes_rebuild(tmp_path, monkeypatch):
    import os

    from configs import beauty
    from distill_jax.data import builders, cache, dataset

    lines = [f"{u} " + " ".join(str(1 + (u * 3 + t) % 9) for t in range(5)) for u in range(1, 21)]
    attrs = write(tmp_path / "attrs.json", json.dumps({str(i): [1 + i % 3] for i in range(1, 10)}))
    config = beauty.get_config("tiny")
    config.data.update(
        path=str(write(tmp_path / "b.txt", "\n".join(lines) + "\n")),
        item_features_path=str(attrs),
    )
    work = str(tmp_path / "work")
    dataset.load(config, work)
    (name,) = os.listdir(tmp_path / "work" / "data" / "sequences")
    data, ts = builders.read(name, tmp_path / "work" / "data")
    got = cache.processed(builders.metadata(name, tmp_path / "work" / "data"), data, ts)
    ids = got.item_original_to_id
    assert got.item_features["attributes"] == {ids[i]: (1 + i % 3,) for i in range(1, 10)}
    calls = []
    real_read = sources.read_source
    monkeypatch.setattr(
        sources, "read_source", lambda *a, **k: calls.append(1) or real_read(*a, **k)
    )
    dataset.load(config, work)
    assert not calls  # current: nothing read
    write(attrs, json.dumps({str(i): [1] for i in range(1, 10)}))
    dataset.load(config, work)
    assert calls  # the attribute file is part of the fingerprint
    config.data.item_features_path = str(tmp_path / "none.json")
    with pytest.raises(
        DataError, match=r"config.data.item_features_path='.*none.json' is not a file"
    ):
        dataset.load(config, work)


def test_offline_vectors_join_the_items_by_id(tmp_path):
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(item_vectors_path="", text="", text_dim=4, categorical=""))
    cfg.item_vectors_path = str(_vectors(tmp_path, [[1.0, 0.0], [0.0, 1.0]], "2\n9\n"))
    got = features.catalogue_features({}, 3, [np.array([1, 2])], cfg)
    assert got.encoded.dense_names == (("vectors", 2),) and got.encoded.coverage["vectors"] == 1 / 3
    np.testing.assert_array_equal(got.known_items, [1, 2])
    cfg.item_vectors_path = str(_vectors(tmp_path, [[1.0]], "a7\n"))
    message = error_of(features.catalogue_features, {}, 3, [np.array([1])], cfg)
    assert "none of its 1 ids (e.g. 'a7') is an item id" in message
