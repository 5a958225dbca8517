"""Readers of raw interaction data into one in-memory form, `RawInteractions`.

Every reader stops on bad input with a `DataError` naming the file, the line
and what was expected.

Readers (all return rows in file order: no cleaning, sorting or de-duplication;
`preprocess.py` does that and counts it):
  read_movielens(folder)      MovieLens 100K, 1M, 10M, 20M, 25M, latest.
  read_s3rec(file)            S3-Rec sequence files ('user item1 item2 ...').
  read_interactions(file)     CSV or Parquet tables with named columns.
  read_source(kind, path)     one of the above by name.
and `download_movielens(name, dest_dir)` fetches a MovieLens zip.
"""

import itertools
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from distill_jax.data import readers_util as ru
from distill_jax.data.types import DataError, RawInteractions

PathLike = str | os.PathLike

_BASE_URL = "https://files.grouplens.org/datasets/movielens"
MOVIELENS_URLS = {
    "ml-100k": f"{_BASE_URL}/ml-100k.zip",
    "ml-1m": f"{_BASE_URL}/ml-1m.zip",
    "ml-10m": f"{_BASE_URL}/ml-10m.zip",
    "ml-20m": f"{_BASE_URL}/ml-20m.zip",
    "ml-25m": f"{_BASE_URL}/ml-25m.zip",
    "ml-latest-small": f"{_BASE_URL}/ml-latest-small.zip",
}

_LAYOUTS = (
    "a MovieLens folder: 100K (u.data, u.item, u.genre, u.user), 1M/10M (ratings.dat, "
    "movies.dat, and users.dat in 1M) or 20M/25M/latest (ratings.csv, movies.csv)"
)
_NO_GENRES = "(no genres listed)"  # MovieLens' marker for a movie without genres


# ------------------------------------------------------------------ MovieLens


def read_movielens(path: PathLike) -> RawInteractions:
    """Reads a MovieLens folder, detecting its layout from the ratings file.

    Layouts:
      100K: `u.data` (tab: user item rating timestamp), `u.item` (pipe,
        latin-1: id|title|release date|video release date|IMDb URL|19 genre
        flags), `u.genre` (name|index), `u.user` (id|age|gender|occupation|zip).
      1M/10M: `ratings.dat` (user::item::rating::timestamp), `movies.dat`
        (id::title::Genre1|Genre2), and in 1M only `users.dat`
        (id::gender::age::occupation::zip). 1M is latin-1; 10M is read as UTF-8.
      20M/25M/latest: `ratings.csv` (userId,movieId,rating,timestamp) and
        `movies.csv` (movieId,title,genres), UTF-8 with a header row.

    Item features are 'title' (str) and 'genres' (tuple of str; '(no genres
    listed)' gives ()), and in 100K 'year' (int, the release date's year;
    movies without a date have none). User features, where the layout has them, are 'age'
    (int; in 1M an age-group code), 'gender' (str) and 'occupation' (str in
    100K, an int code in 1M), and in 100K 'zip_prefix' (str, the zip code's
    first character). Ids are int64, ratings float32, timestamps int64
    seconds since the epoch.

    Args:
      path: the folder holding the files (e.g. the 'ml-100k' folder of the zip).

    Returns:
      The ratings in file order.

    Raises:
      DataError: a missing folder or file, or a bad line (named with its number).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory; expected {_LAYOUTS}")
    if (folder / "u.data").is_file():
        return _read_ml100k(folder)
    if (folder / "ratings.dat").is_file():
        return _read_ml_dat(folder)
    if (folder / "ratings.csv").is_file():
        return _read_ml_csv(folder)
    raise DataError(f"no u.data, ratings.dat or ratings.csv in {folder}; expected {_LAYOUTS}")


def _lines_of(path: Path):
    return lambda row: f"{path}:{row + 1}"


def _ratings_lines(path: Path, sep: str, encoding: str) -> list[np.ndarray]:
    """user, item, rating, timestamp columns of `u.data` or `ratings.dat`."""
    layout = sep.join(["user", "item", "rating", "timestamp"]).replace("\t", " ")
    lines = ru.read_lines(path, encoding)
    if not lines:
        wanted = ru.fields_wanted(4, sep, layout)
        raise DataError(f"{path}: no interactions (empty file); expected lines of {wanted}")
    users, items, ratings, times = ru.split_lines(path, lines, sep, layout, 4)
    return [
        ru.column_values(path, lines, users, pa.int64(), "an integer user id", 1),
        ru.column_values(path, lines, items, pa.int64(), "an integer item id", 2),
        ru.column_values(path, lines, ratings, pa.float32(), "a number (rating)", 3),
        ru.column_values(path, lines, times, pa.int64(), "an integer timestamp (seconds)", 4),
    ]


def _read_ml100k(folder: Path) -> RawInteractions:
    expected = "the MovieLens 100K layout (u.data, u.item, u.genre, u.user)"
    files = [folder / name for name in ("u.data", "u.item", "u.genre", "u.user")]
    for file in files:
        ru.require_file(file, expected)
    data, item_file, genre_file, user_file = files
    users, items, ratings, times = _ratings_lines(data, "\t", "utf-8")

    # u.genre: 'name|index' lines; the index is the flag's position in u.item.
    lines = ru.read_lines(genre_file, "latin-1")
    if not lines:
        raise DataError(f"{genre_file}: no genres (empty file); expected lines 'name|index'")
    names, index = ru.split_lines(genre_file, lines, "|", "name|index", 2)
    index = ru.column_values(genre_file, lines, index, pa.int64(), "an integer genre index", 2)
    if sorted(index.tolist()) != list(range(len(names))):
        raise DataError(
            f"{genre_file}: expected genre indices 0..{len(names) - 1}, each once; "
            f"got {index.tolist()}"
        )
    genres = [names[i] for i in np.argsort(index)]

    lines = ru.read_lines(item_file, "latin-1")  # latin-1 by the data set's spec
    layout = f"id|title|release date|video release date|IMDb URL|{len(genres)} genre flags"
    columns = ru.split_lines(item_file, lines, "|", layout, 5 + len(genres))
    ids = ru.column_values(item_file, lines, columns[0], pa.int64(), "an integer movie id", 1)
    flags = columns[5:]
    for j, column in enumerate(flags):
        if not set(column) <= {"0", "1"}:
            row = next(i for i, flag in enumerate(column) if flag not in ("0", "1"))
            raise DataError(
                f"{item_file}:{row + 1}: expected a genre flag 0 or 1 in field {6 + j}, "
                f"got {column[row]!r}: {ru.excerpt(lines[row])}"
            )
    movie_genres = [
        tuple(g for g, flag in zip(genres, row, strict=True) if flag == "1")
        for row in zip(*flags, strict=True)
    ]
    keys = ids.tolist()
    item_features = {
        "title": ru.keyed(keys, columns[1], "movie id", _lines_of(item_file)),
        "genres": ru.keyed(keys, movie_genres, "movie id", _lines_of(item_file)),
        "year": _release_years(item_file, lines, keys, columns[2]),
    }

    lines = ru.read_lines(user_file, "latin-1")
    layout = "id|age|gender|occupation|zip code"
    ids, ages, genders, jobs, zips = ru.split_lines(user_file, lines, "|", layout, 5)
    keys = ru.column_values(user_file, lines, ids, pa.int64(), "an integer user id", 1).tolist()
    ages = ru.column_values(user_file, lines, ages, pa.int64(), "an integer age", 2).tolist()
    user_features = {
        "age": ru.keyed(keys, ages, "user id", _lines_of(user_file)),
        "gender": dict(zip(keys, genders, strict=True)),
        "occupation": dict(zip(keys, jobs, strict=True)),
        # The zip code's first character: the US region (0-9), or a letter
        # for the few Canadian codes; none where the file has no code.
        "zip_prefix": {k: z.strip()[:1] or None for k, z in zip(keys, zips, strict=True)},
    }
    return RawInteractions(
        name=f"movielens-100k:{folder}",
        user_ids=users,
        item_ids=items,
        timestamps=times,
        ratings=ratings,
        item_features=item_features,
        user_features=user_features,
        files=[str(f) for f in files],
    )


def _release_years(path: Path, lines: list[str], keys: list, dates: list[str]) -> dict:
    """{movie id: release year} from u.item's 'dd-Mon-yyyy' dates; an empty date is missing."""
    years = {}
    for i, (key, date) in enumerate(zip(keys, dates, strict=True)):
        if not date.strip():
            continue
        year = date.strip().rsplit("-", 1)[-1]
        if not (len(year) == 4 and year.isdigit()):
            raise DataError(
                f"{path}:{i + 1}: expected a release date 'dd-Mon-yyyy' or nothing in "
                f"field 3, got {date!r}: {ru.excerpt(lines[i])}"
            )
        years[key] = int(year)
    return years


def _split_genres(text: str) -> tuple[str, ...]:
    return () if text in ("", _NO_GENRES) else tuple(text.split("|"))


def _read_ml_dat(folder: Path) -> RawInteractions:
    ratings_file, movie_file, user_file = (
        folder / f"{n}.dat" for n in ("ratings", "movies", "users")
    )
    ru.require_file(movie_file, "the MovieLens 1M/10M layout (ratings.dat, movies.dat)")
    # Only 1M has users.dat, and 1M is latin-1 encoded (10M is UTF-8).
    is_1m = user_file.is_file()
    encoding = "latin-1" if is_1m else "utf-8"
    users, items, ratings, times = _ratings_lines(ratings_file, "::", encoding)

    lines = ru.read_lines(movie_file, encoding)
    ids, titles, genres = ru.split_lines(movie_file, lines, "::", "id::title::genres", 3)
    keys = ru.column_values(movie_file, lines, ids, pa.int64(), "an integer movie id", 1).tolist()
    item_features = {
        "title": ru.keyed(keys, titles, "movie id", _lines_of(movie_file)),
        "genres": dict(zip(keys, map(_split_genres, genres), strict=True)),
    }
    user_features, files = {}, [ratings_file, movie_file]
    if is_1m:
        lines = ru.read_lines(user_file, encoding)
        layout = "id::gender::age::occupation::zip code"
        ids, genders, ages, jobs, _ = ru.split_lines(user_file, lines, "::", layout, 5)
        keys = ru.column_values(user_file, lines, ids, pa.int64(), "an integer user id", 1)
        keys = keys.tolist()
        ages = ru.column_values(user_file, lines, ages, pa.int64(), "an integer age code", 3)
        jobs = ru.column_values(user_file, lines, jobs, pa.int64(), "an occupation code", 4)
        user_features = {
            "age": ru.keyed(keys, ages.tolist(), "user id", _lines_of(user_file)),
            "gender": dict(zip(keys, genders, strict=True)),
            "occupation": dict(zip(keys, jobs.tolist(), strict=True)),
        }
        files.append(user_file)
    return RawInteractions(
        name=f"movielens-{'1m' if is_1m else '10m'}:{folder}",
        user_ids=users,
        item_ids=items,
        timestamps=times,
        ratings=ratings,
        item_features=item_features,
        user_features=user_features,
        files=[str(f) for f in files],
    )


def _read_ml_csv(folder: Path) -> RawInteractions:
    ratings_file, movie_file = folder / "ratings.csv", folder / "movies.csv"
    ru.require_file(movie_file, "the MovieLens 20M/25M/latest layout (ratings.csv, movies.csv)")
    why = "MovieLens ratings.csv: userId,movieId,rating,timestamp"
    wanted = ["userId", "movieId", "rating", "timestamp"]
    ru.require_columns(
        ratings_file, ru.table_columns(ratings_file, ","), dict.fromkeys(wanted, why), ","
    )
    table, locate = ru.read_table(ratings_file, wanted, ",")
    if not table.num_rows:
        raise DataError(f"{ratings_file}: no interactions (only a header row)")
    users = ru.numbers(table["userId"], "userId", pa.int64(), "an integer user id", locate)
    items = ru.numbers(table["movieId"], "movieId", pa.int64(), "an integer movie id", locate)
    ratings = ru.numbers(table["rating"], "rating", pa.float32(), "a number (rating)", locate)
    times = ru.numbers(table["timestamp"], "timestamp", pa.int64(), "an integer timestamp", locate)

    why = "MovieLens movies.csv: movieId,title,genres"
    wanted = ["movieId", "title", "genres"]
    ru.require_columns(
        movie_file, ru.table_columns(movie_file, ","), dict.fromkeys(wanted, why), ","
    )
    movies, locate = ru.read_table(movie_file, wanted, ",")
    ids = ru.numbers(movies["movieId"], "movieId", pa.int64(), "an integer movie id", locate)
    keys = ids.tolist()
    item_features = {
        "title": ru.keyed(keys, movies["title"].to_pylist(), "movie id", locate),
        "genres": dict(zip(keys, map(_split_genres, movies["genres"].to_pylist()), strict=True)),
    }
    return RawInteractions(
        name=f"movielens-csv:{folder}",
        user_ids=users,
        item_ids=items,
        timestamps=times,
        ratings=ratings,
        item_features=item_features,
        user_features={},
        files=[str(ratings_file), str(movie_file)],
    )


def download_movielens(name: str, dest_dir: PathLike) -> Path:
    """Downloads and unpacks a MovieLens zip from GroupLens into `dest_dir`/`name`.

    Atomic: the zip goes to a temporary file and is unpacked into a temporary
    folder inside `dest_dir`, which is then renamed into place, so an
    interrupted download never leaves a half-written `dest_dir/name`. Hence a
    folder already there is complete and is returned without a download. The
    zip's top folder (e.g. 'ml-10M100K') becomes `dest_dir/name`.

    Args:
      name: a key of `MOVIELENS_URLS`, e.g. 'ml-100k'.
      dest_dir: where to put the folder (created if needed).

    Returns:
      The folder for `read_movielens`.

    Raises:
      DataError: an unknown name, or a failed download or unpacking (with the URL).
    """
    if name not in MOVIELENS_URLS:
        raise DataError(
            f"unknown MovieLens data set {name!r}; expected one of {list(MOVIELENS_URLS)}"
        )
    final = Path(dest_dir) / name
    if not final.is_dir():
        ru.fetch_zip(MOVIELENS_URLS[name], final)
    return final


# ------------------------------------------------------------------ S3-Rec


def read_s3rec(path: PathLike) -> RawInteractions:
    """Reads an S3-Rec sequence file: one 'user item1 item2 ...' line per user.

    The integers are separated by single spaces and the items are in time order,
    so there are no timestamps (the position in the line stands in) and no
    ratings. Rows come out user by user, each user's items in line order.

    Args:
      path: the file, e.g. 'Beauty.txt'.

    Returns:
      One row per (user, item) pair in the file, in file order; int64 ids.

    Raises:
      DataError: a missing or empty file, or a bad line (named with its number):
        too few fields, an id that is not a plain integer in 0..2**63-1 (a
        sign, a hex or decimal point, a double space), or a user already given
        by an earlier line.
    """
    path = Path(path)
    layout = "'user item1 item2 ...' (a user id, then at least one item id, space-separated)"
    ru.require_file(path, f"an S3-Rec sequence file, one {layout} per line")
    lines = ru.read_lines(path)
    if not lines:
        raise DataError(f"{path}: no interactions (empty file); expected lines {layout}")
    rows = [line.strip().split(" ") for line in lines]
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    counts[[not line.strip() for line in lines]] = 0
    if (counts < 2).any():
        i = int(np.argmax(counts < 2))
        hint = ru.separator_hint(lines[i], " ", None) if counts[i] == 1 else ""
        raise DataError(
            f"{path}:{i + 1}: expected {layout}, got {counts[i]} field(s): "
            f"{ru.excerpt(lines[i])}{hint}"
        )
    starts = np.cumsum(counts) - counts

    def located(index: int) -> tuple[int, int, str]:
        """(line, field, what it should be) of the `index`-th integer of the file."""
        i = int(np.searchsorted(starts, index, side="right")) - 1
        field = index - int(starts[i]) + 1
        return i, field, "user id" if field == 1 else "item id"

    try:
        values = ru.cast(list(itertools.chain.from_iterable(rows)), pa.int64())
    except ru.BadValue as e:
        i, field, what = located(e.index)
        raise DataError(
            f"{path}:{i + 1}: expected an integer {what} in field {field}, got {e.value!r}"
            f"{ru.range_hint(e.value)}: {ru.excerpt(lines[i])}"
        ) from None
    if (values < 0).any():
        i, field, what = located(int(np.argmax(values < 0)))
        raise DataError(
            f"{path}:{i + 1}: expected a non-negative integer {what} in field {field}, "
            f"got {int(values[starts[i] + field - 1])}: {ru.excerpt(lines[i])}"
        )
    users = values[starts]
    if len(np.unique(users)) != len(users):
        # One line per user: a repeated user is a damaged or concatenated file,
        # and silently joining the two lines would invent an order between them.
        first: dict[int, int] = {}
        for i, user in enumerate(users.tolist()):
            if user in first:
                raise DataError(
                    f"{path}:{i + 1}: user {user} already has line {first[user] + 1}; "
                    f"expected one line per user: {ru.excerpt(lines[i])}"
                )
            first[user] = i
    is_item = np.ones(len(values), dtype=bool)
    is_item[starts] = False
    return RawInteractions(
        name=f"s3rec:{path}",
        user_ids=np.repeat(users, counts - 1),
        item_ids=values[is_item],
        timestamps=None,
        ratings=None,
        files=[str(path)],
    )


# ------------------------------------------------------------------ CSV / Parquet


def read_interactions(
    path: PathLike,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    item_features_path: PathLike | None = None,
    user_features_path: PathLike | None = None,
    delimiter: str = ",",
) -> RawInteractions:
    """Reads an interactions table: CSV with a header row, or Parquet.

    Ids keep their type: Parquet integer columns and CSV columns where every id
    is written as a plain integer ('12', not '+12' or '012') give int64; any
    other ids stay str (so '007' and 'u1' keep their spelling). Times are
    numbers (seconds since the epoch, int64 or float64) or ISO-8601 text
    ('2020-01-31', '2020-01-31T12:00:00Z', '... 12:00:00+02:00'; no zone means
    UTC), parsed to int64 seconds. A missing value (an empty cell or a null)
    is kept, as None for ids and NaN for times (then float64) and ratings, for
    the preprocessing step to drop and count; a value that does not parse is
    an error.

    Args:
      path: the file; '.parquet' or '.pq' means Parquet, anything else CSV.
      user_col: the user id column.
      item_col: the item id column.
      time_col: the time column; None if the table has none (file order is
        then the time order).
      rating_col: the rating column; None uses 'rating' if there is one.
      item_features_path: an optional table keyed by `item_col`; each other
        column becomes an item feature: numbers where every cell of the column
        is one, else text. An empty cell, a blank text or NaN is a missing
        value (left out); an infinite number is an error.
      user_features_path: likewise for users, keyed by `user_col`.
      delimiter: the CSV field separator (one character).

    Returns:
      The rows in file order; ratings float32.

    Raises:
      DataError: a missing file or column, no rows, or a bad value (with its line).
      ValueError: a delimiter that is not one character.
    """
    path = Path(path)
    if len(delimiter) != 1:
        raise ValueError(f"delimiter must be one character, got {delimiter!r}")
    found = ru.table_columns(path, delimiter)
    if rating_col is None and "rating" in found:
        rating_col = "rating"
    wanted = {user_col: "user_col", item_col: "item_col"}
    wanted.update({c: a for c, a in ((time_col, "time_col"), (rating_col, "rating_col")) if c})
    ru.require_columns(path, found, wanted, delimiter)
    table, locate = ru.read_table(path, list(wanted), delimiter)
    if not table.num_rows:
        raise DataError(
            f"{path}: no interactions ({'no rows' if ru.is_parquet(path) else 'only a header'}); "
            f"expected columns {list(wanted)}"
        )
    user_ids = ru.ids(table[user_col], user_col, locate)
    item_ids = ru.ids(table[item_col], item_col, locate)
    times = ru.timestamps(table[time_col], time_col, locate) if time_col else None
    ratings = None
    if rating_col:
        ratings = ru.numbers(
            table[rating_col], rating_col, pa.float32(), "a number (rating)", locate
        )
    files = [str(path)]
    features = {}
    for what, key, ids, extra in (
        ("item", item_col, item_ids, item_features_path),
        ("user", user_col, user_ids, user_features_path),
    ):
        if extra is not None:
            features[what] = _feature_table(Path(extra), key, _integer_ids(ids), what, delimiter)
            files.append(str(extra))
    return RawInteractions(
        name=f"interactions:{path}",
        user_ids=user_ids,
        item_ids=item_ids,
        timestamps=times,
        ratings=ratings,
        item_features=features.get("item", {}),
        user_features=features.get("user", {}),
        files=files,
    )


def _integer_ids(ids: np.ndarray) -> bool:
    if ids.dtype.kind in "iu":
        return True
    # Object arrays hold one type plus None for missing ids (see ru.ids).
    first = next((v for v in ids if v is not None), None)
    return isinstance(first, int | np.integer)


def _feature_table(path: Path, key: str, integer: bool, what: str, delimiter: str) -> dict:
    """{feature: {id: value}} from a table keyed by column `key`; missing values left out.

    CSV cells are read as text and typed per column (`readers_util.feature_values`),
    so a blank cell is missing wherever it is rather than turning a column of
    numbers into text.
    """
    found = ru.table_columns(path, delimiter)
    ru.require_columns(path, found, {key: f"the {what} id column"}, delimiter)
    table, locate = ru.read_table(path, found, delimiter)
    keys = ru.keys(table[key], key, integer, what, locate)
    ru.keyed(keys, keys, f"{what} id", locate)  # each id on one row
    out = {}
    for column in found:
        if column != key:
            values = ru.feature_values(table[column], column, locate)
            out[column] = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
    return out


def add_side_features(
    raw: RawInteractions,
    *,
    item_features_path: PathLike | None = None,
    user_features_path: PathLike | None = None,
    item_col: str = "item_id",
    user_col: str = "user_id",
    delimiter: str = ",",
) -> RawInteractions:
    """`raw` with the features of extra files added (for sources other than 'interactions').

    An item file is a JSON attribute file (`features.read_item_attributes`,
    giving the feature 'attributes') or a CSV/Parquet table keyed by
    `item_col`, each other column a feature; a user file is such a table keyed
    by `user_col`. A feature the source already has is an error, not replaced.

    Raises:
      DataError: what the readers raise, or a feature name given twice.
    """
    from distill_jax.data import features as features_lib

    for what, key, ids, extra, table in (
        ("item", item_col, raw.item_ids, item_features_path, raw.item_features),
        ("user", user_col, raw.user_ids, user_features_path, raw.user_features),
    ):
        if extra is None:
            continue
        extra = Path(extra)
        if what == "item" and extra.suffix.lower() == ".json":
            found = {"attributes": features_lib.read_item_attributes(extra)}
        else:
            found = _feature_table(extra, key, _integer_ids(ids), what, delimiter)
        clash = sorted(set(found) & set(table))
        if clash:
            raise DataError(
                f"{extra}: {what} feature(s) {clash} are already given by {raw.name}; "
                "rename the column(s)"
            )
        table.update(found)
        raw.files.append(str(extra))
    return raw


_READERS = {"movielens": read_movielens, "s3rec": read_s3rec, "interactions": read_interactions}


def read_source(kind: str, path: PathLike, **kwargs) -> RawInteractions:
    """Reads `path` with the reader for `kind`.

    Args:
      kind: 'movielens' (a folder), 's3rec' (a sequence file) or 'interactions'
        (a CSV/Parquet table).
      path: the file or folder.
      **kwargs: passed to the reader (only `read_interactions` takes any).

    Returns:
      The raw interactions.

    Raises:
      DataError: an unknown kind, or whatever the reader raises.
    """
    if kind not in _READERS:
        raise DataError(f"unknown data source kind {kind!r}; expected one of {list(_READERS)}")
    return _READERS[kind](path, **kwargs)
