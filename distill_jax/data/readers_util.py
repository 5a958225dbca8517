"""Helpers for `sources.py`: decode, split and convert raw files with located errors.

The readers parse whole columns at once (str.split over lines, Arrow casts) and
only when that fails go back to find the first bad line, so that the fast path
stays fast and every error still names the file, the line and what was
expected.
"""

import csv
import datetime
import io
import itertools
import math
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from distill_jax.data.types import DataError

SEPARATOR_NAMES = {
    "\t": "tab",
    "::": "'::'",
    "|": "pipe",
    ",": "comma",
    ";": "semicolon",
    " ": "space",
}
PARQUET_SUFFIXES = (".parquet", ".pq")
# An id written as a plain integer: no sign '+', no leading zero ('007' is a name).
_CANONICAL_INT = r"^(0|-?[1-9][0-9]*)$"
# What a number column may hold where integers are expected: decimal digits.
# Arrow's parser alone also takes hex ('0x10' -> 16).
_DECIMAL_INT = r"^-?[0-9]+$"


def error(message: str) -> Exception:
    """A `DataError` with `message`."""
    return DataError(message)


def excerpt(line: str, limit: int = 100) -> str:
    """`repr(line)`, shortened to about `limit` characters."""
    return repr(line if len(line) <= limit else line[:limit] + "...")


class BadValue(Exception):
    """Raised by `cast` with the index of the first value that does not convert."""

    def __init__(self, index: int, value: Any):
        super().__init__(index, value)
        self.index = index
        self.value = value


def _first_failure(array: pa.Array, convert: Callable[[pa.Array], Any]) -> int:
    """Index of the first element of `array` on which `convert` raises.

    Bisection over slices keeps the search in Arrow (O(n) work in all) and uses
    exactly the conversion that failed, so the reported value is the real culprit.
    """
    lo, hi = 0, len(array)  # invariant: the first failure lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(array.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, ValueError, OverflowError):
            hi = mid
    return lo


def cast(values: Sequence[str] | pa.Array | pa.ChunkedArray, to: pa.DataType) -> np.ndarray:
    """Converts strings to numbers with Arrow's strict parser.

    Raises:
      BadValue: with the index and text of the first value that does not parse.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif not isinstance(values, pa.Array):
        values = pa.array(values, type=pa.string())
    if pa.types.is_integer(to) and _is_text(values.type):
        decimal = pc.fill_null(pc.match_substring_regex(values, _DECIMAL_INT), True)
        if not pc.all(decimal).as_py():
            index = int(np.argmin(decimal.to_numpy(zero_copy_only=False)))
            raise BadValue(index, values[index].as_py())
    try:
        return pc.cast(values, to).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        index = _first_failure(values, lambda part: pc.cast(part, to))
        raise BadValue(index, values[index].as_py()) from None


def plain_integer(text: str) -> int | None:
    """The value of an id written as a plain int64 integer ('12', not '012' or '+12'), else None.

    The rule `ids` types a table's id column by, for files of ids one a line.
    """
    if not re.fullmatch(_CANONICAL_INT, text):
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def range_hint(value: Any) -> str:
    """' (outside the 64-bit range ...)' for an integer too large to read, else ''."""
    if isinstance(value, str) and re.fullmatch(_DECIMAL_INT, value):
        return " (outside the 64-bit integer range -2**63..2**63-1)"
    return ""


def check_finite(values: np.ndarray) -> int | None:
    """Index of the first +-inf (NaN stands for a missing value and passes)."""
    bad = np.isinf(values)
    return int(np.argmax(bad)) if bad.any() else None


# ------------------------------------------------------------------ text files


def read_bytes(path: Path) -> bytes:
    """The file's bytes; a file that cannot be read is a `DataError` naming it."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from e


def decode(path: Path, raw: bytes, encoding: str) -> str:
    """Decodes a whole file; a bad byte is reported with its line and offset."""
    if encoding != "utf-8":
        return raw.decode(encoding)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(
            f"{path}:{line}: byte 0x{raw[e.start]:02x} at offset {e.start} (column {column}) "
            "is not valid UTF-8; expected a UTF-8 text file"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not data


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The file's lines without line ends; trailing blank lines are dropped.

    Splits on '\\n' only: str.splitlines would also split latin-1 text at
    \\x85 and \\x1c-\\x1e, which are characters there, not line breaks.
    """
    text = decode(path, read_bytes(path), encoding).replace("\r\n", "\n")
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def require_file(path: Path, expected: str) -> None:
    """Raises a `DataError` naming `path` and the `expected` layout if it is absent."""
    if not path.is_file():
        raise error(f"{path}: no such file; expected {expected}")


def guess_separator(line: str, sep: str, expected: int | None) -> str | None:
    """Another separator that splits `line` (one field at `sep`) as expected, if any.

    Args:
      line: a line that has one field only when split at `sep`.
      sep: the separator the format requires.
      expected: how many fields the line should have; None: any number above 1.
    """
    for other in SEPARATOR_NAMES:
        if other == sep or other not in line:
            continue
        fields = len(line.split() if other == " " else line.split(other))
        if (expected is None and fields > 1) or fields == expected:
            return other
    return None


def separator_hint(line: str, sep: str, expected: int | None) -> str:
    """' (it looks comma-separated; this file must be tab-separated)', or ''."""
    other = guess_separator(line, sep, expected)
    if other is None:
        return ""
    return (
        f" (it looks {SEPARATOR_NAMES[other]}-separated; "
        f"this file must be {SEPARATOR_NAMES.get(sep, repr(sep))}-separated)"
    )


def fields_wanted(n: int, sep: str, layout: str) -> str:
    """'4 tab-separated fields (user item rating timestamp)'."""
    return f"{n} {SEPARATOR_NAMES.get(sep, repr(sep))}-separated fields ({layout})"


def field_count_error(path: Path, number: int, line: str, sep: str, layout: str, n: int):
    """The error for line `number` (1-based) not having `n` `sep`-separated fields."""
    if not line.strip():
        return error(f"{path}:{number}: expected {fields_wanted(n, sep, layout)}, got a blank line")
    got = len(line.split(sep))
    hint = separator_hint(line, sep, n) if got == 1 else ""
    return error(
        f"{path}:{number}: expected {fields_wanted(n, sep, layout)}, "
        f"got {got}: {excerpt(line)}{hint}"
    )


def split_lines(path: Path, lines: list[str], sep: str, layout: str, n: int) -> list[list[str]]:
    """Splits every line into `n` fields and returns the `n` columns (lists of str)."""
    rows = [line.split(sep) for line in lines]
    if any(len(row) != n for row in rows):
        number = next(i for i, row in enumerate(rows) if len(row) != n)
        raise field_count_error(path, number + 1, lines[number], sep, layout, n)
    flat = list(itertools.chain.from_iterable(rows))  # cheaper than zip(*rows) for 10M rows
    return [flat[j::n] for j in range(n)]


def column_values(
    path: Path, lines: list[str], values: Sequence[str], to: pa.DataType, what: str, field: int
) -> np.ndarray:
    """`values` (field `field` of each line) converted to `to`, or a located error."""
    try:
        out = cast(values, to)
    except BadValue as e:
        raise error(
            f"{path}:{e.index + 1}: expected {what} in field {field}, got {e.value!r}"
            f"{range_hint(e.value)}: {excerpt(lines[e.index])}"
        ) from None
    if out.dtype.kind == "f" and (bad := check_finite(out)) is not None:
        raise error(
            f"{path}:{bad + 1}: expected {what} in field {field}, got {values[bad]!r}: "
            f"{excerpt(lines[bad])}"
        )
    return out


def keyed(keys: Sequence, values: Sequence, what: str, locate: Callable[[int], str]) -> dict:
    """{key: value}; a repeated key is an error located by `locate(row)`."""
    table = dict(zip(keys, values, strict=True))
    if len(table) != len(keys):
        seen = set()
        for i, key in enumerate(keys):
            if key in seen:
                raise error(f"{locate(i)}: {what} {key!r} appears twice; expected one row each")
            seen.add(key)
    return table


# ------------------------------------------------------------------ tables


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def table_columns(path: Path, delimiter: str) -> list[str]:
    """The column names of a CSV header row or a Parquet schema."""
    if not path.is_file():
        raise error(f"{path}: no such file; expected a CSV (with a header row) or Parquet table")
    if is_parquet(path):
        try:
            return pq.read_schema(path).names
        except (pa.ArrowException, OSError) as e:
            raise error(f"{path}: not a readable Parquet file ({e})") from e
    with path.open("rb") as f:
        first = f.readline()
    header = decode(path, first, "utf-8").strip("\r\n")
    if not header.strip():
        raise error(f"{path}:1: empty file; expected a header row naming the columns")
    return next(csv.reader([header], delimiter=delimiter))


def require_columns(path: Path, found: list[str], wanted: dict[str, str], delimiter: str) -> None:
    """Raises unless every column of `wanted` (name -> why it is needed) is in `found`."""
    for column, why in wanted.items():
        if column not in found:
            hint = ""
            if len(found) == 1 and not is_parquet(path):
                other = guess_separator(found[0], delimiter, None)
                if other is not None:
                    hint = (
                        f" (the header looks {SEPARATOR_NAMES[other]}-separated; "
                        f"pass delimiter={other!r})"
                    )
            raise error(f"{path}: no column {column!r} ({why}); columns found: {found}{hint}")


def _csv_line(path: Path, delimiter: str, row: int) -> int:
    """The 1-based line where data row `row` (0-based, after the header) starts."""
    text = decode(path, read_bytes(path), "utf-8")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    next(reader)
    end, index = reader.line_num, -1
    for fields in reader:
        start, end = end + 1, reader.line_num
        if fields:  # Arrow skips blank lines, so they are not rows
            index += 1
            if index == row:
                return start
    return end


def _diagnose_csv(path: Path, delimiter: str, header: list[str], cause: Exception):
    """After Arrow failed to parse a CSV file: the error for its first bad line."""
    text = decode(path, read_bytes(path), "utf-8")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    next(reader)
    end = reader.line_num
    for fields in reader:
        start, end = end + 1, reader.line_num
        if fields and len(fields) != len(header):
            # Lines as the csv module counts them: a CR alone ends one too.
            line = re.split(r"\r\n|\r|\n", text, maxsplit=start)[start - 1]
            wanted = fields_wanted(len(header), delimiter, delimiter.join(header))
            hint = separator_hint(line, delimiter, len(header)) if len(fields) == 1 else ""
            return error(
                f"{path}:{start}: expected {wanted}, got {len(fields)}: {excerpt(line)}{hint}"
            )
    return error(f"{path}: cannot parse as CSV: {cause}")


def read_table(
    path: Path, columns: list[str], delimiter: str, text: Sequence[str] | None = None
) -> tuple[pa.Table, Callable]:
    """Reads `columns` of a CSV or Parquet file.

    Args:
      path: the file; '.parquet' or '.pq' means Parquet, anything else CSV.
      columns: the columns to read.
      delimiter: the CSV field separator.
      text: CSV columns read as text (default: all of `columns`); Arrow infers
        the types of the others.

    Returns:
      The table and `locate(row) -> str`, the 'file:line' (CSV) or 'file: row N'
      (Parquet) prefix for an error about data row `row` (0-based).
    """
    if is_parquet(path):
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise error(f"{path}: not a readable Parquet file ({e})") from e
        return table, lambda row: f"{path}: row {row + 1}"
    # Text columns, so ids keep their spelling ('007'), ISO times stay parseable
    # by our rules, and empty cells stay '' (missing; the preprocessing step
    # counts them) while a bad value is reported with its line.
    options = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in (columns if text is None else text)},
        include_columns=columns,
        strings_can_be_null=False,
    )
    try:
        table = pacsv.read_csv(
            path, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=options
        )
    except pa.ArrowInvalid as e:
        raise _diagnose_csv(path, delimiter, table_columns(path, delimiter), e) from e
    return table, lambda row: f"{path}:{_csv_line(path, delimiter, row)}"


def _missing(column: pa.Array) -> np.ndarray:
    """bool [N]: null or empty-string entries."""
    missing = pc.is_null(column)
    if _is_text(column.type):
        missing = pc.or_(missing, pc.equal(pc.utf8_length(pc.fill_null(column, "")), 0))
    return missing.to_numpy(zero_copy_only=False)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _parses(values: pa.Array, to: pa.DataType) -> bool:
    try:
        pc.cast(values, to)
    except pa.ArrowInvalid:
        return False
    return True


def _flat(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column


def is_text_column(column) -> bool:
    """Whether a table column holds text."""
    return _is_text(_flat(column).type)


def categories(column) -> list:
    """A column's values as Python objects, None where missing (null or '')."""
    column = _flat(column)
    return [None if m else v for v, m in zip(column.to_pylist(), _missing(column), strict=True)]


def numbers(column, name: str, to: pa.DataType, what: str, locate: Callable) -> np.ndarray:
    """A numeric or text column as numbers; missing entries become NaN if `to` is float.

    Args:
      column: the column (Arrow).
      name: its name, for messages.
      to: pa.int64() (every entry required) or a float type.
      what: what was expected, for messages ('a number (rating)').
      locate: row -> 'file:line' prefix.
    """
    column = _flat(column)
    missing = _missing(column)
    floating = pa.types.is_floating(to)
    if missing.any() and not floating:
        row = int(np.argmax(missing))
        raise error(f"{locate(row)}: expected {what} in column {name!r}, got a missing value")
    if _is_text(column.type):
        # Missing text becomes 'nan' so one cast handles the whole column.
        column = pc.if_else(pa.array(missing), pa.scalar("nan", column.type), column)
    elif not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise error(f"{locate(0)}: expected {what} in column {name!r}, found type {column.type}")
    try:
        out = cast(column, to)
    except BadValue as e:
        raise error(
            f"{locate(e.index)}: expected {what} in column {name!r}, got {e.value!r}"
            f"{range_hint(e.value)}"
        ) from None
    if floating and (bad := check_finite(out)) is not None:
        raise error(
            f"{locate(bad)}: expected {what} in column {name!r}, got {column[bad].as_py()!r}"
        )
    return out


def feature_values(column, name: str, locate: Callable) -> list:
    """A side-feature column's values, None where missing (null, blank, NaN).

    Text cells (a CSV's) are trimmed and become numbers when every present
    cell of the column is one (int when all are integers), else stay text.
    An infinite number is an error located by `locate(row)`.
    """
    column = _flat(column)
    if not _is_text(column.type):
        values = column.to_pylist()
        rows = range(len(values))
    else:
        column = pc.utf8_trim_whitespace(column)
        missing = _missing(column)
        rows = np.flatnonzero(~missing)
        present = pc.filter(column, pa.array(~missing))
        if not (len(present) and _parses(present, pa.float64())):
            return [None if m else v for v, m in zip(column.to_pylist(), missing, strict=True)]
        whole = pc.all(pc.match_substring_regex(present, _DECIMAL_INT)).as_py()
        kind = pa.int64() if whole and _parses(present, pa.int64()) else pa.float64()
        values = pc.cast(present, kind).to_pylist()
    out = [None] * len(column)
    for row, value in zip(rows, values, strict=True):
        if isinstance(value, float) and not math.isfinite(value):
            if math.isnan(value):
                continue
            raise error(
                f"{locate(int(row))}: expected a finite number (or nothing) in column "
                f"{name!r}, got {value}"
            )
        out[row] = value
    return out


def ids(column, name: str, locate: Callable) -> np.ndarray:
    """Ids as read: int64 when every one is an integer, else an object array of str.

    Text ids count as integers only when all of them are written as plain
    integers, so '007' and 'u1' keep their spelling. Missing ids (null or '')
    become None in an object array; the preprocessing step drops and counts them.
    """
    column = _flat(column)
    missing = _missing(column)
    present = pc.filter(column, pa.array(~missing))
    if pa.types.is_integer(column.type):
        values = present.cast(pa.int64()).to_numpy()
    elif _is_text(column.type):
        values = np.asarray(present.to_numpy(zero_copy_only=False), dtype=object)
        plain_ints = pc.all(pc.match_substring_regex(present, _CANONICAL_INT)).as_py()
        if len(present) and plain_ints and _parses(present, pa.int64()):  # else beyond int64
            values = pc.cast(present, pa.int64()).to_numpy()
    else:
        raise error(
            f"{locate(0)}: expected integer or text ids in column {name!r}, found {column.type}"
        )
    if not missing.any():
        return values
    out = np.full(len(missing), None, dtype=object)
    out[~missing] = values.tolist()
    return out


TIME = "a timestamp (seconds since the epoch, or an ISO-8601 date/time like 2020-01-31T12:00:00Z)"


def timestamps(column, name: str, locate: Callable) -> np.ndarray:
    """Seconds since the epoch (UTC): int64, or float64 when fractional or missing (NaN).

    Accepts numbers, Arrow timestamps/dates, or ISO-8601 text ('2020-01-31',
    '2020-01-31T12:00:00', '2020-01-31 12:00:00+02:00', '...Z'); text without a
    zone is read as UTC.
    """
    column = _flat(column)
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        if column.null_count:
            row = int(np.argmax(pc.is_null(column).to_numpy(zero_copy_only=False)))
            raise error(f"{locate(row)}: expected {TIME} in column {name!r}, got a missing value")
        if pa.types.is_date(kind):
            return column.cast(pa.date32()).cast(pa.int32()).to_numpy().astype(np.int64) * 86400
        per_second = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[kind.unit]
        return np.floor_divide(column.cast(pa.int64()).to_numpy(), per_second)
    missing = _missing(column)
    present = pc.filter(column, pa.array(~missing))
    if not _is_text(kind) or (len(present) and _parses(present.slice(0, 1), pa.float64())):
        # Numbers (or text whose first entry is a number, so all must be one).
        whole = not missing.any() and _parses(present, pa.int64())
        return numbers(column, name, pa.int64() if whole else pa.float64(), TIME, locate)
    if not len(present):
        return np.full(len(missing), np.nan)
    rows = np.flatnonzero(~missing)
    seconds = _iso_seconds(present, lambda i: locate(int(rows[i])), name)
    if not missing.any():
        return seconds
    out = np.full(len(missing), np.nan)
    out[rows] = seconds
    return out


def _iso_seconds(text: pa.Array, locate: Callable, name: str) -> np.ndarray:
    """ISO-8601 strings -> int64 seconds since the epoch, UTC."""
    # Arrow's vectorised parser first: all without a zone (read as UTC), or all
    # with one ('Z', '+02:00').
    for kind in (pa.timestamp("s"), pa.timestamp("s", tz="UTC")):
        if _parses(text, kind):
            return pc.cast(pc.cast(text, kind), pa.int64()).to_numpy()
    # Otherwise (mixed forms, fractions of seconds, a bad value) Python's
    # parser, once per distinct string.
    encoded = text.dictionary_encode()
    codes = encoded.indices.to_numpy()
    seconds = np.empty(len(encoded.dictionary), np.int64)
    for j, value in enumerate(encoded.dictionary.to_pylist()):
        try:
            when = datetime.datetime.fromisoformat(value)
        except ValueError:
            row = int(np.argmax(codes == j))
            raise error(
                f"{locate(row)}: expected {TIME} in column {name!r}, got {value!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds[j] = math.floor(when.timestamp())
    return seconds[codes]


def keys(column, name: str, integer: bool, what: str, locate: Callable) -> list:
    """The key column of a feature table, typed like the interactions' ids."""
    if integer:
        expected = f"an integer {what} id (the interactions' ids are integers)"
        return numbers(column, name, pa.int64(), expected, locate).tolist()
    column = _flat(column)
    missing = _missing(column)
    if missing.any():
        row = int(np.argmax(missing))
        raise error(
            f"{locate(row)}: expected the {what} id in column {name!r}, got a missing value"
        )
    return [str(key) for key in column.to_pylist()]


def fetch_zip(url: str, final: Path) -> None:
    """Downloads the zip at `url` and unpacks it as folder `final`, atomically.

    The zip goes to a temporary file and is unpacked into a temporary folder
    next to `final` (same file system, so the closing rename is atomic): an
    interrupted download never leaves a half-written `final`. A zip holding a
    single folder (GroupLens' do) gives that folder's contents.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}-download-") as tmp:
        archive, unpacked = Path(tmp) / "archive.zip", Path(tmp) / "unpacked"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            raise error(f"could not download {url}: {e}") from e
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(unpacked)  # drops '..' and absolute parts: members stay inside
        except (zipfile.BadZipFile, OSError) as e:
            raise error(f"{url}: the download is not a readable zip archive ({e})") from e
        entries = list(unpacked.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else unpacked
        try:
            root.rename(final)
        except OSError as e:
            if not final.is_dir():  # else another process finished the same download first
                raise error(f"{url}: cannot move the unpacked files to {final} ({e})") from e
