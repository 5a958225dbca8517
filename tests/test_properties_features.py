"""Property tests of the side-feature files and their encoding (distill_jax/data/features.py).

Each generated file or feature set is either read/encoded exactly as a plain
float64 / pure-Python reference says, or refused with a `DataError` naming
the file (and line) or the feature; never another exception, never a NaN.
"""

import json
import math
import re
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distill_jax.data import features, sources
from distill_jax.data.types import DataError

_ROOT = tempfile.TemporaryDirectory(prefix="distill_jax_properties_")


def _folder() -> Path:
    return Path(tempfile.mkdtemp(dir=_ROOT.name))


# ------------------------------------------------------------------ attribute JSON

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
KEY = st.one_of(
    st.integers(-5, 2**64).map(str),
    st.sampled_from(["007", " 12", "+3", "1_0", "\u0661", "", "x"]),
)
ATTRIBUTES = st.one_of(
    st.lists(st.integers(-2, 2**65), max_size=4),
    JSON,
)


def _attributes_reference(stored) -> dict | None:
    """What read_item_attributes returns for a decoded JSON value; None if it must refuse."""
    if not isinstance(stored, dict) or not stored:
        return None
    out = {}
    for key, values in stored.items():
        if not re.fullmatch(r"\s*-?[0-9]+\s*", key) or str(int(key)) != key.strip():
            return None
        ok = isinstance(values, list) and all(
            type(v) is int and v >= 1  # bools are not ids
            for v in values
        )
        if not ok or int(key) in out:
            return None
        out[int(key)] = tuple(dict.fromkeys(values))
    return out


@settings(max_examples=150)
@given(st.one_of(st.dictionaries(KEY, ATTRIBUTES, max_size=4), JSON), st.booleans())
@example({"1": [2]}, False)
@example("[" * 100_000, True)  # nested deeper than the JSON parser recurses
def test_attribute_files_read_right_or_are_refused(stored, raw_text):
    path = _folder() / "items.json"
    text = stored if raw_text and isinstance(stored, str) else json.dumps(stored)
    path.write_text(text, encoding="utf-8")
    try:
        expected = _attributes_reference(json.loads(text))
    except (ValueError, RecursionError):
        expected = None
    try:
        got = features.read_item_attributes(path)
    except DataError as e:
        event("DataError")
        assert expected is None and str(e).startswith(str(path)), (str(e), expected)
        return
    assert got == expected


# ------------------------------------------------------------------ vector files

MATRIX = hnp.arrays(
    dtype=st.sampled_from(
        [np.float16, np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64]
    ),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
)
ID_LINE = st.one_of(
    st.integers(-(2**64), 2**64).map(str),
    st.sampled_from(["007", "+3", "\u0663", "\u00b2", " ", "a b", "-"]),
    st.text(alphabet="ab1-", max_size=3),
)


def _vector_ids(lines: list[str]) -> list | None:
    """The ids of an ids file as read_vectors types them; None if one is empty."""
    texts = [line.strip() for line in lines]
    if not all(texts):
        return None
    ints = [
        int(t) if re.fullmatch(r"0|-?[1-9][0-9]*", t) and -(2**63) <= int(t) < 2**63 else None
        for t in texts
    ]
    return texts if None in ints else ints


@settings(max_examples=150)
@given(MATRIX, st.lists(ID_LINE, max_size=5), st.booleans())
def test_vector_files_read_right_or_are_refused(matrix, lines, pickled):
    folder = _folder()
    path = folder / "emb.npy"
    if pickled:  # an object array: only loadable by unpickling
        matrix = np.array([[1.0, "x"]], dtype=object)
    np.save(path, matrix, allow_pickle=True)
    features.vectors_ids_path(path).write_text("".join(f"{line}\n" for line in lines))
    ids = _vector_ids(lines)
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = matrix.astype(np.float32) if matrix.dtype.kind in "fiu" else None
    ok = (
        not pickled
        and as32 is not None
        and matrix.ndim == 2
        and 0 not in matrix.shape
        and len(lines) == matrix.shape[0]
        and ids is not None
        and len(set(ids)) == len(ids)
        and np.isfinite(as32).all()
    )
    try:
        got = features.read_vectors(path)
    except DataError as e:
        event("DataError")
        assert not ok, str(e)
        assert str(e).startswith((str(path), str(features.vectors_ids_path(path)))), str(e)
        return
    assert ok
    assert list(got) == ids
    np.testing.assert_array_equal(np.stack(list(got.values())), as32)


# ------------------------------------------------------------------ feature tables


@settings(max_examples=100)
@given(
    st.lists(
        st.one_of(
            st.just(""),
            st.floats(allow_nan=False, allow_infinity=False).map(repr),
            st.sampled_from(["nan", "inf", "-inf", "NaN", " "]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_numeric_feature_cells_are_values_missing_or_refused_at_their_line(cells):
    folder = _folder()
    interactions = folder / "log.csv"
    interactions.write_text("user_id,item_id\n1,1\n")
    table = folder / "items.csv"
    table.write_text("item_id,price\n" + "".join(f"{i},{c}\n" for i, c in enumerate(cells, 1)))
    infinite = [i for i, c in enumerate(cells) if c.strip() in ("inf", "-inf")]
    try:
        raw = sources.read_interactions(interactions, time_col=None, item_features_path=table)
    except DataError as e:
        event("DataError")
        assert infinite and str(e).startswith(f"{table}:{infinite[0] + 2}:"), (str(e), cells)
        return
    assert not infinite, cells
    expected = {
        i: float(c) for i, c in enumerate(cells, 1) if c.strip() and not math.isnan(float(c))
    }
    got = raw.item_features.get("price", {})
    assert {k: float(v) for k, v in got.items()} == expected


# ------------------------------------------------------------------ encode

NUMBER = st.one_of(
    st.integers(-(2**63), 2**63),
    st.floats(),
    st.sampled_from([1e308, -1e308, 5e-324]),
)
CATEGORY = st.one_of(st.text(max_size=3), st.integers(-3, 3), st.booleans())
KINDS = [
    NUMBER,
    CATEGORY,
    st.lists(CATEGORY, max_size=3).map(tuple),
    hnp.arrays(np.float64, st.integers(1, 3), elements=st.floats(width=64)),
]
# One feature's values: mostly of one kind (each kind in turn), sometimes mixed.
FEATURE = st.one_of(
    *[st.dictionaries(st.integers(0, 6), kind, max_size=5) for kind in KINDS],
    st.dictionaries(st.integers(0, 6), st.one_of(*KINDS), max_size=5),
)


def _standardised(column: list) -> list[float]:
    """(x - mean) / std over the values (std 1 where 0), in exact arithmetic, then float."""
    exact = [Fraction(x) for x in column]
    mean = sum(exact) / len(exact)
    var = sum((x - mean) ** 2 for x in exact) / len(exact)
    if var == 0:
        return [0.0] * len(exact)
    return [math.copysign(math.sqrt((x - mean) ** 2 / var), x - mean) for x in exact]


def _kind(value) -> str:
    if isinstance(value, tuple):
        return "bag"
    if isinstance(value, np.ndarray):
        return "vector"
    if isinstance(value, str | bool):
        return "category"
    return "number"


def _encode_reference(values: dict, num_rows: int):
    """The encoded arrays of one feature, or None where encode must refuse it."""
    rows = list(values)
    if any(not 1 <= r < num_rows for r in rows):
        return None
    kinds = {_kind(v) for v in values.values()}
    if len(kinds) > 1:
        return None
    kind = kinds.pop() if kinds else "bag"
    if kind in ("bag", "category"):
        lists = [v if kind == "bag" else (v,) for v in values.values()]
        cats = sorted({c for row in lists for c in row}, key=lambda c: (type(c).__name__, c))
        width = max([len(row) for row in lists] + [1])
        bag = np.zeros((num_rows, width), np.int32)
        for r, row in zip(rows, lists, strict=True):
            bag[r, : len(row)] = [cats.index(c) + 1 for c in row]
        return kind, bag
    if kind == "number":
        if any(abs(v) > 1.7976931348623157e308 for v in values.values()):
            return None
        numbers = [float(v) for v in values.values()]
        if not all(math.isfinite(x) for x in numbers):
            return None
        column = np.zeros((num_rows, 1))
        column[rows, 0] = _standardised(numbers)
        return kind, column
    widths = {v.shape for v in values.values()}
    if len(widths) != 1 or not all(np.isfinite(v).all() for v in values.values()):
        return None
    matrix = np.zeros((num_rows, next(iter(widths))[0]))
    for j in range(matrix.shape[1]):
        matrix[rows, j] = _standardised([float(v[j]) for v in values.values()])
    return kind, matrix


@settings(max_examples=150)
@given(FEATURE, st.integers(1, 7))
def test_encode_matches_the_reference_or_refuses_naming_the_feature(values, num_rows):
    expected = _encode_reference(values, num_rows)
    try:
        got = features.encode({"f": values}, num_rows, where="items")
    except DataError as e:
        event("DataError")
        assert expected is None and str(e).startswith("items: feature 'f'"), (str(e), values)
        return
    assert expected is not None, values
    kind, want = expected
    if kind in ("bag", "category"):
        np.testing.assert_array_equal(got.bags["f"], want)
        return
    out = got.numeric if kind == "number" else got.dense
    assert np.isfinite(out).all()
    # float32 output: a relative error of ~1e-6 of the column's spread, at least.
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
