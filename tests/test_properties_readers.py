"""Property tests of the raw-data readers (distill_jax/data/sources.py) on generated files.

For every generated file a reader either returns exactly what a plain Python
reading of the format gives, or raises a `DataError` that names the file and
a line that really is bad; never another exception, never a wrong value.
"""

import datetime
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from distill_jax.data import sources
from distill_jax.data.types import DataError

INT64 = (-(2**63), 2**63 - 1)
# Text made of the characters that make numbers, separators and line ends go wrong.
NOISE = st.text(alphabet="0123456789-+.,:|\t xXeE_nainf\r\ufeff\u00e9\u0663", max_size=8)


# Removed when the module's tests end (the object's finaliser).
_ROOT = tempfile.TemporaryDirectory(prefix="distill_jax_properties_")


def _written(name: str, data: bytes) -> Path:
    """`data` as file `name` in a folder of its own."""
    folder = Path(tempfile.mkdtemp(dir=_ROOT.name))
    path = folder / name
    path.write_bytes(data)
    return path


def _lines(data: bytes) -> list[str] | int:
    """The lines the format defines (see readers_util.read_lines), or the line of a bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data.count(b"\n", 0, e.start) + 1
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _int(text: str, low: int = INT64[0]) -> int | None:
    """The value of a decimal integer field in [low, 2**63), else None."""
    if not re.fullmatch(r"-?[0-9]+", text):
        return None
    value = int(text)
    return value if low <= value <= INT64[1] else None


def _rating(text: str) -> float | None:
    """The float32 value of a rating field (NaN: missing), else None."""
    if not text.isascii() or "_" in text or text != text.strip():
        return None
    try:
        with np.errstate(over="ignore"):
            value = np.float32(float(text))
    except ValueError:
        return None
    return None if np.isinf(value) else float(value)


def _named_line(message: str, path: Path) -> int | None:
    """The line number a DataError names after the file, or None when it names none."""
    assert message.startswith(str(path)), message
    m = re.match(re.escape(str(path)) + r":(\d+):", message)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ S3-Rec

IDS = st.integers(0, INT64[1])
S3REC_LINE = st.one_of(
    st.lists(IDS, min_size=2, max_size=5).map(lambda ids: " ".join(map(str, ids))),
    # Negative ids and ids beyond 64 bits.
    st.lists(st.integers(-(2**70), 2**70), min_size=2, max_size=3).map(
        lambda ids: " ".join(map(str, ids))
    ),
    NOISE,
    st.text(max_size=12).filter(lambda t: "\n" not in t),
)


def _s3rec_reference(data: bytes) -> tuple[list, list] | set[int] | None:
    """(users, items) rows; or the bad lines; None for a file without lines."""
    lines = _lines(data)
    if isinstance(lines, int):
        return {lines}
    if not lines:
        return None
    bad, users, items, first = set(), [], [], {}
    for n, line in enumerate(lines, 1):
        fields = line.strip().split(" ")
        ids = [_int(f, 0) for f in fields]
        if not line.strip() or len(fields) < 2 or None in ids:
            bad.add(n)
            continue
        if ids[0] in first:
            bad.add(n)
        first.setdefault(ids[0], n)
        users += [ids[0]] * (len(ids) - 1)
        items += ids[1:]
    return bad or (users, items)


@settings(max_examples=150)
@given(
    st.lists(S3REC_LINE, max_size=6),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
    st.binary(max_size=2),
)
def test_s3rec_reads_right_or_names_a_bad_line(lines, end, bom, junk):
    data = ("\ufeff" if bom else "").encode() + end.join(lines).encode() + end.encode()
    if junk:
        data = data[: len(data) // 2] + junk + data[len(data) // 2 :]
    path = _written("seq.txt", data)
    expected = _s3rec_reference(data)
    try:
        raw = sources.read_s3rec(path)
    except DataError as e:
        event("DataError")
        assert not isinstance(expected, tuple), (str(e), expected)
        line = _named_line(str(e), path)
        assert (line is None) if expected is None else (line in expected), (str(e), expected)
        return
    assert isinstance(expected, tuple), expected
    assert raw.user_ids.dtype == raw.item_ids.dtype == np.int64
    assert raw.user_ids.tolist() == expected[0] and raw.item_ids.tolist() == expected[1]


@settings(max_examples=40)
@given(st.dictionaries(IDS, st.lists(IDS, min_size=1, max_size=6), min_size=1, max_size=6))
def test_s3rec_round_trip_of_well_formed_files(sequences):
    text = "".join(f"{u} {' '.join(map(str, items))}\n" for u, items in sequences.items())
    raw = sources.read_s3rec(_written("seq.txt", text.encode()))
    assert raw.user_ids.tolist() == [u for u, items in sequences.items() for _ in items]
    assert raw.item_ids.tolist() == [i for items in sequences.values() for i in items]


# ------------------------------------------------------------------ MovieLens u.data

U_ITEM = b"1|A|01-Jan-1995||http://x|0|1\n"
U_GENRE = b"unknown|0\nAction|1\n"
U_USER = b"1|24|M|technician|85711\n"

RATING_TEXT = st.one_of(st.floats(width=32).map(repr), NOISE)
INT_TEXT = st.one_of(st.integers(*INT64).map(str), st.integers(2**63, 2**70).map(str), NOISE)
UDATA_LINE = st.one_of(
    st.tuples(INT_TEXT, INT_TEXT, RATING_TEXT, INT_TEXT).map("\t".join),
    st.tuples(IDS.map(str), IDS.map(str), RATING_TEXT, IDS.map(str)).map("\t".join),
    NOISE,
)


def _udata_reference(data: bytes):
    lines = _lines(data)
    if isinstance(lines, int):
        return {lines}
    if not lines:
        return None
    bad, rows = set(), []
    for n, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) != 4:
            bad.add(n)
            continue
        user, item, time = _int(fields[0]), _int(fields[1]), _int(fields[3])
        rating = _rating(fields[2])
        if None in (user, item, time, rating):
            bad.add(n)
        rows.append((user, item, rating, time))
    return bad or rows


@settings(max_examples=120)
@given(st.lists(UDATA_LINE, max_size=5), st.binary(max_size=1))
def test_movielens_ratings_read_right_or_name_a_bad_line(lines, junk):
    data = "\n".join(lines).encode() + b"\n" + junk
    folder = _written("u.data", data).parent
    for name, content in (("u.item", U_ITEM), ("u.genre", U_GENRE), ("u.user", U_USER)):
        (folder / name).write_bytes(content)
    expected = _udata_reference(data)
    try:
        raw = sources.read_movielens(folder)
    except DataError as e:
        event("DataError")
        assert not isinstance(expected, list), (str(e), expected)
        line = _named_line(str(e), folder / "u.data")
        assert (line is None) if expected is None else (line in expected), (str(e), expected)
        return
    assert isinstance(expected, list), expected
    users, items, ratings, times = (list(c) for c in zip(*expected, strict=True))
    assert raw.user_ids.tolist() == users and raw.item_ids.tolist() == items
    assert raw.timestamps.tolist() == times
    np.testing.assert_array_equal(raw.ratings, np.asarray(ratings, np.float32))


# ------------------------------------------------------------------ interactions CSV / Parquet

ID_VALUE = st.one_of(
    st.integers(*INT64),
    st.integers(2**63, 2**70),
    st.text(alphabet='u0123456789-+ ,"\n\u00e9', max_size=5),
)
TIME_VALUE = st.one_of(st.integers(-(10**12), 10**12), st.just(""), NOISE)


def _csv_ids(values: list[str]):
    """The ids as read_interactions types them: all plain int64 integers -> int, else str."""
    present = [v for v in values if v != ""]
    plain = all(re.fullmatch(r"0|-?[1-9][0-9]*", v) for v in present)
    as_int = present and plain and all(INT64[0] <= int(v) <= INT64[1] for v in present)
    return [None if v == "" else (int(v) if as_int else v) for v in values]


def _csv_field(value: str) -> str:
    """`value` as a CSV field: quoted where it holds a comma, a quote or a line end."""
    return '"' + value.replace('"', '""') + '"' if re.search(r'[,"\r\n]', value) else value


def _number(text: str) -> float | None:
    """A number field's value as Arrow reads it (inf and NaN included), else None."""
    if not text.isascii() or "_" in text or text != text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _csv_times(values: list[str]) -> tuple[list | None, set[int]]:
    """(the times as read_interactions reads them, the rows that are bad).

    Numbers when the first present time is one (then all must be finite
    numbers; int64 when all are integers and none is missing), else ISO-8601
    text; a missing time is NaN.
    """
    present = [i for i, v in enumerate(values) if v != ""]
    if not present:
        return [math.nan] * len(values), set()
    if _number(values[present[0]]) is not None:
        parsed = {i: _number(values[i]) for i in present}
        bad = {i for i, x in parsed.items() if x is None or math.isinf(x)}
        whole = len(present) == len(values) and all(_int(values[i]) is not None for i in present)
        if whole:
            return [_int(v) for v in values], bad
        return [parsed.get(i, math.nan) for i in range(len(values))], bad
    seconds, bad = {}, set()
    for i in present:
        try:
            when = datetime.datetime.fromisoformat(values[i])
        except ValueError:
            bad.add(i)
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds[i] = math.floor(when.timestamp())
    return [seconds.get(i, math.nan) for i in range(len(values))], bad


@settings(max_examples=150)
@given(st.lists(st.tuples(ID_VALUE, ID_VALUE, TIME_VALUE), min_size=1, max_size=5))
def test_interaction_tables_read_right_or_name_a_bad_line(rows):
    rows = [tuple(str(v) for v in row) for row in rows]
    text = "user_id,item_id,timestamp\n"
    starts, line = [], 2  # the line each row starts on (a CR alone ends a CSV line too)
    for row in rows:
        text += ",".join(map(_csv_field, row)) + "\n"
        starts.append(line)
        line += sum(len(re.findall(r"\r\n|\r|\n", v)) for v in row) + 1
    path = _written("log.csv", text.encode())
    times, bad = _csv_times([row[2] for row in rows])
    try:
        raw = sources.read_interactions(path)
    except DataError as e:
        event("DataError")
        assert _named_line(str(e), path) in {starts[i] for i in bad}, (str(e), rows)
        return
    assert not bad, rows
    assert raw.user_ids.tolist() == _csv_ids([row[0] for row in rows])
    assert raw.item_ids.tolist() == _csv_ids([row[1] for row in rows])
    np.testing.assert_array_equal(raw.timestamps, np.asarray(times, raw.timestamps.dtype))


@settings(max_examples=60)
@given(
    st.lists(st.one_of(st.none(), st.integers(*INT64)), min_size=1, max_size=6),
    st.lists(st.one_of(st.none(), st.text(max_size=4)), min_size=1, max_size=6),
    st.lists(
        st.one_of(st.none(), st.floats(), st.sampled_from([math.inf, -math.inf, math.nan])),
        min_size=1,
        max_size=6,
    ),
)
def test_parquet_tables_read_right_or_name_a_bad_row(users, items, times):
    n = min(len(users), len(items), len(times))
    users, items, times = users[:n], items[:n], times[:n]
    table = pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.string()),
            "timestamp": pa.array(times, pa.float64()),
        }
    )
    path = _written("log.parquet", b"")
    pq.write_table(table, path)
    infinite = [r + 1 for r, t in enumerate(times) if t is not None and math.isinf(t)]
    try:
        raw = sources.read_interactions(path)
    except DataError as e:
        event("DataError")
        assert re.match(re.escape(f"{path}: row ") + r"(\d+):", str(e)), str(e)
        assert int(str(e).split(": row ")[1].split(":")[0]) in infinite, str(e)
        return
    assert not infinite
    assert raw.user_ids.tolist() == users
    assert raw.item_ids.tolist() == [None if i in (None, "") else i for i in items]
    expected = [math.nan if t is None else t for t in times]
    np.testing.assert_array_equal(raw.timestamps, expected)


@pytest.mark.parametrize("reader", [sources.read_s3rec, sources.read_interactions])
def test_a_folder_or_a_missing_file_is_a_data_error(tmp_path, reader):
    for path in (tmp_path, tmp_path / "absent.txt"):
        with pytest.raises(DataError, match=re.escape(str(path))):
            reader(path)
