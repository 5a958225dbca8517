"""Side features of items and users: the files they come from, and their encoding as arrays.

Readers (keys are the data's own ids, as in `sources.py`; each stops on bad
input with a `DataError` naming the file and the key or line):

  read_item_attributes(path)   a JSON object {"item id": [attribute id, ...]},
                               e.g. S3-Rec's `Beauty_item2attributes.json`.
  read_vectors(path)           a float matrix `NAME.npy` (one row per id) and
                               `NAME.ids.txt` beside it (one id per line, in
                               row order): embeddings computed offline by any
                               encoder (text, image, audio).
  text_vectors(texts, dim)     TF-IDF + truncated SVD (scikit-learn) of a text
                               feature, as such vectors; no downloaded weights.

`encode(features, num_rows)` turns `{feature: {row id: value}}` (the remapped
features of `types.Processed`, ids 1..N) into the arrays a model reads, one row
per id and row 0 (padding) empty:

  a str, or an int named in `categorical`   one category: a bag of one
  a tuple or list of categories              a bag (e.g. genres, attributes)
  an int or float                            a numeric column, standardised
  a vector (from `read_vectors`/`text_vectors`)  dense columns, standardised

Bags hold category ids 1..C (0 = none), in the order of the sorted category
values, so the encoding is a function of the values alone. A missing numeric
value or vector is the mean (0 after standardising); a missing category is an
empty bag.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from distill_jax.data import readers_util as ru
from distill_jax.data.types import DataError

PathLike = str | os.PathLike

__all__ = [
    "CatalogueFeatures",
    "EncodedFeatures",
    "encode",
    "read_item_attributes",
    "read_vectors",
    "text_vectors",
    "vectors_ids_path",
]


# ------------------------------------------------------------------ readers


def read_item_attributes(path: PathLike) -> dict[int, tuple[int, ...]]:
    """Reads `{"item id": [attribute id, ...], ...}`: each item's attribute ids.

    Args:
      path: the JSON file; keys are integer item ids written as strings (JSON
        keys are strings), values lists of integer attribute ids (>= 1).

    Returns:
      item id -> its attribute ids, in file order (duplicates dropped).

    Raises:
      DataError: a missing file, invalid JSON (with its line), or a key or
        value of another form (named).
    """
    path = Path(path)
    layout = 'a JSON object {"item id": [attribute id, ...], ...}'
    ru.require_file(path, layout)
    text = ru.decode(path, ru.read_bytes(path), "utf-8")
    try:
        stored = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected {layout}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply; expected {layout}") from None
    if not isinstance(stored, dict) or not stored:
        raise DataError(f"{path}: expected {layout}, got {type(stored).__name__} {_short(stored)}")
    out = {}
    for key, values in stored.items():
        try:
            item = int(key)
        except ValueError:
            raise DataError(
                f"{path}: key {key!r} is not an integer item id; expected {layout}"
            ) from None
        if str(item) != key.strip():
            raise DataError(f"{path}: key {key!r} is not an integer item id; expected {layout}")
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
        ):
            raise DataError(
                f"{path}: key {key!r}: expected a list of integer attribute ids >= 1, "
                f"got {_short(values)}"
            )
        if item in out:
            raise DataError(f"{path}: item id {item} appears twice (key {key!r})")
        out[item] = tuple(dict.fromkeys(values))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def vectors_ids_path(path: PathLike) -> Path:
    """`NAME.ids.txt` beside `NAME.npy`: the ids of the matrix's rows."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".npy") + ".ids.txt")


def read_vectors(path: PathLike) -> dict[Any, np.ndarray]:
    """Reads a `[n, E]` float matrix and the `n` ids of its rows (see `vectors_ids_path`).

    Ids that are plain integers are int, others str, as `sources.read_interactions`
    types the ids of a table ('12' is 12; '012', '+12' and '١٢' are names). The
    matrix is read without pickle.

    Args:
      path: the `.npy` file.

    Returns:
      id -> its float32 row `[E]`.

    Raises:
      DataError: a missing file, a matrix that is not 2-D float or is empty, a
        row count that differs from the id count, a repeated id, a value that
        is not a finite float32.
    """
    path = Path(path)
    ids_path = vectors_ids_path(path)
    ru.require_file(path, "a float matrix saved with numpy.save, one row per id")
    ru.require_file(ids_path, f"the ids of the rows of {path.name}, one per line")
    try:
        # Never unpickles: an object array is refused (ValueError), not loaded.
        matrix = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a NumPy .npy matrix ({e})") from None
    if not isinstance(matrix, np.ndarray):  # an .npz archive
        raise DataError(f"{path}: a NumPy archive of several arrays; expected one .npy matrix")
    if matrix.ndim != 2 or matrix.dtype.kind not in "fiu" or 0 in matrix.shape:
        raise DataError(
            f"{path}: expected a 2-D float matrix [ids, dims] with a row and a column at "
            f"least, got {matrix.dtype} {matrix.shape}"
        )
    lines = ru.read_lines(ids_path)
    if len(lines) != matrix.shape[0]:
        raise DataError(
            f"{ids_path}: {len(lines)} ids for the {matrix.shape[0]} rows of {path.name}; "
            "expected one id per row, in row order"
        )
    texts = [line.strip() for line in lines]
    for i, text in enumerate(texts):
        if not text:
            raise DataError(f"{ids_path}:{i + 1}: empty line; expected an id")
    numbers = [ru.plain_integer(t) for t in texts]
    ids = texts if None in numbers else numbers
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
        matrix = matrix.astype(np.float32)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise DataError(
            f"{path}: row {bad} (id {ids[bad]!r}, {ids_path.name}:{bad + 1}) is not finite "
            f"({matrix[bad][~np.isfinite(matrix[bad])][0]}); expected float32 numbers"
        )
    return ru.keyed(ids, list(matrix), "id", lambda i: f"{ids_path}:{i + 1}")


def text_vectors(
    texts: Mapping[Any, str], dim: int, *, seed: int = 0, where: str = "text feature"
) -> dict[Any, np.ndarray]:
    """TF-IDF (words and word pairs) reduced to `dim` columns by truncated SVD.

    A classic text encoder that needs no downloaded weights; its vectors go
    through the same path as `read_vectors`'. For fewer distinct terms or texts
    than `dim`, fewer columns come out (an SVD keeps at most that many).

    Args:
      texts: id -> text (e.g. MovieLens titles).
      dim: columns wanted.
      seed: the SVD's random state.
      where: what the texts are, for the error message.

    Returns:
      id -> float32 `[dim']` row, dim' <= dim.

    Raises:
      DataError: no text has a word.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    keys = list(texts)
    if not keys:
        return {}
    # Every word counts, one letter or digit included (titles are short).
    tfidf = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
    try:
        matrix = tfidf.fit_transform([str(texts[k]) for k in keys])
    except ValueError:  # no word in any text
        raise DataError(f"{where}: no text has a word; expected text to encode") from None
    rank = min(dim, matrix.shape[1] - 1, len(keys) - 1)
    if rank < 1:
        dense = matrix.toarray()[:, :dim]
    else:
        dense = TruncatedSVD(n_components=rank, random_state=seed).fit_transform(matrix)
    return dict(zip(keys, dense.astype(np.float32), strict=True))


# ------------------------------------------------------------------ encoding


@dataclasses.dataclass(frozen=True)
class EncodedFeatures:
    """Features of rows 0..N as arrays (row 0, padding, is empty).

    Attributes:
      bags: categorical feature -> `[N+1, K]` int32 category ids 1..C of each
        row, 0-padded (K the most categories any row has, at least 1).
      vocab: categorical feature -> its C category values; category id c is
        `vocab[name][c - 1]`.
      numeric: `[N+1, n]` float32 standardised numeric features (0 = missing).
      numeric_names: the n numeric features, in column order.
      dense: `[N+1, E]` float32 standardised vector features, concatenated.
      dense_names: (feature, width) of each vector feature, in column order.
      coverage: feature -> the share of rows 1..N that have a value.
    """

    bags: dict[str, np.ndarray]
    vocab: dict[str, list]
    numeric: np.ndarray
    numeric_names: tuple[str, ...]
    dense: np.ndarray
    dense_names: tuple[tuple[str, int], ...]
    coverage: dict[str, float]

    @property
    def num_rows(self) -> int:
        return self.numeric.shape[0]

    def describe(self) -> str:
        """One line per feature: its kind, its size and how many rows have it."""
        lines = [
            f"{name}: {len(self.vocab[name])} categories, up to {bag.shape[1]} a row"
            for name, bag in self.bags.items()
        ]
        lines += [f"{name}: numeric" for name in self.numeric_names]
        lines += [f"{name}: {width}-d vector" for name, width in self.dense_names]
        return "; ".join(
            f"{line} ({self.coverage[line.split(':')[0]]:.0%} of rows)" for line in lines
        )


def _kind(name: str, values: Collection, categorical: Collection[str], where: str) -> str:
    kinds = set()
    for v in values:
        if isinstance(v, tuple | list):
            kinds.add("bag")
        elif isinstance(v, np.ndarray):
            kinds.add("vector")
        elif isinstance(v, str | bool | np.bool_):
            kinds.add("category")
        elif isinstance(v, int | np.integer):
            kinds.add("category" if name in categorical else "number")
        elif isinstance(v, float | np.floating):
            kinds.add("number")
        else:
            raise DataError(
                f"{where}: feature {name!r} has a value of type {type(v).__name__}: {v!r}"
            )
    if len(kinds) > 1:
        raise DataError(
            f"{where}: feature {name!r} mixes {sorted(kinds)} values; expected one kind per feature"
        )
    return kinds.pop() if kinds else "bag"


def _float(value: Any, name: str, row: int, where: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise DataError(
            f"{where}: feature {name!r} of row {row} is {value}; expected a number within "
            "the float64 range"
        ) from None


def _sort_key(value: Any) -> tuple[str, Any]:
    return (type(value).__name__, value)


def _standardise(columns: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Columns at mean 0 and standard deviation 1 over the present rows; missing rows 0."""
    out = np.zeros_like(columns, dtype=np.float32)
    if present.any():
        values = columns[present].astype(np.float64)
        # Standardising is shift- and scale-free. Subtracting the first row is
        # exact for close values, so a column of equal values gives exactly 0
        # and a spread of a few ulps is not lost to the mean's rounding; where
        # that overflows (a spread beyond 1e308) the values are scaled instead.
        with np.errstate(over="ignore", invalid="ignore"):
            shifted = values - values[0]
        if not np.isfinite(shifted).all():
            shifted = values
        peak = np.abs(shifted).max(axis=0)
        shifted = shifted / np.where(peak > 0, peak, 1.0)
        std = shifted.std(axis=0)
        scaled = (shifted - shifted.mean(axis=0)) / np.where(std > 0, std, 1.0)
        out[present] = scaled.astype(np.float32)
    return out


def encode(
    features: Mapping[str, Mapping[int, Any]],
    num_rows: int,
    *,
    categorical: Collection[str] = (),
    where: str = "features",
) -> EncodedFeatures:
    """Encodes `{feature: {row id 1..num_rows-1: value}}` as arrays (see the module doc).

    Args:
      features: per feature, the values of the rows that have one.
      num_rows: N+1 (row 0 is padding and stays empty).
      categorical: integer-valued features to read as categories rather than
        numbers (e.g. an occupation code).
      where: what the features are, for error messages (e.g. the data's name).

    Returns:
      The arrays, every feature in name order within its kind.

    Raises:
      DataError: a row id outside 1..N, a non-finite number or vector value,
        vectors of different widths, or a feature mixing kinds.
    """
    bags, vocab, coverage = {}, {}, {}
    numeric, numeric_names, dense, dense_names = [], [], [], []
    for name in sorted(features):
        values = features[name]
        rows = np.fromiter(values, dtype=np.int64, count=len(values))
        if len(rows) and (rows.min() < 1 or rows.max() >= num_rows):
            bad = int(rows[(rows < 1) | (rows >= num_rows)][0])
            raise DataError(
                f"{where}: feature {name!r} has row id {bad}; expected 1..{num_rows - 1}"
            )
        coverage[name] = len(rows) / max(num_rows - 1, 1)
        kind = _kind(name, values.values(), categorical, where)
        present = np.zeros(num_rows, bool)
        present[rows] = True
        if kind in ("bag", "category"):
            lists = [tuple(v) if kind == "bag" else (v,) for v in values.values()]
            cats = sorted({c for row in lists for c in row}, key=_sort_key)
            index = {c: i + 1 for i, c in enumerate(cats)}
            width = max([len(row) for row in lists] + [1])
            bag = np.zeros((num_rows, width), np.int32)
            for r, row in zip(rows, lists, strict=True):
                bag[r, : len(row)] = [index[c] for c in row]
            bags[name], vocab[name] = bag, cats
        elif kind == "number":
            column = np.zeros((num_rows, 1), np.float64)
            # float(): Python ints beyond float64 fail here, not inside numpy.
            column[rows, 0] = [
                _float(v, name, r, where) for r, v in zip(rows, values.values(), strict=True)
            ]
            if not np.isfinite(column).all():
                r = int(np.flatnonzero(~np.isfinite(column[:, 0]))[0])
                raise DataError(
                    f"{where}: feature {name!r} of row {r} is {column[r, 0]}; "
                    "expected a finite number"
                )
            numeric.append(_standardise(column, present))
            numeric_names.append(name)
        else:
            widths = {np.shape(v) for v in values.values()}
            if len(widths) != 1 or len(next(iter(widths))) != 1:
                raise DataError(
                    f"{where}: feature {name!r} has vectors of shapes {sorted(widths)}; "
                    "expected one width"
                )
            width = next(iter(widths))[0]
            matrix = np.zeros((num_rows, width), np.float64)
            matrix[rows] = np.stack(list(values.values()))
            if not np.isfinite(matrix).all():
                r = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
                raise DataError(f"{where}: feature {name!r} of row {r} is not finite")
            dense.append(_standardise(matrix, present))
            dense_names.append((name, width))
    return EncodedFeatures(
        bags=bags,
        vocab=vocab,
        numeric=np.concatenate(numeric, axis=1) if numeric else np.zeros((num_rows, 0), np.float32),
        numeric_names=tuple(numeric_names),
        dense=np.concatenate(dense, axis=1) if dense else np.zeros((num_rows, 0), np.float32),
        dense_names=tuple(dense_names),
        coverage=coverage,
    )


@dataclasses.dataclass(frozen=True)
class CatalogueFeatures:
    """What a model with side features needs from the data.

    Attributes:
      encoded: the item features, rows 0..V.
      known_items: the item ids the training sequences hold (their ids are
        trained; the others are scored by features alone).
      users: the user features, rows 0..U (user ids 1..U), where the data
        has some and `config.features.users` is on; else None.
    """

    encoded: EncodedFeatures
    known_items: np.ndarray
    users: EncodedFeatures | None = None

    def describe(self) -> str:
        cold = self.encoded.num_rows - 1 - len(self.known_items)
        text = f"{self.encoded.describe()}; {cold} items never in training"
        if self.users is not None:
            text += f"; users: {self.users.describe()}"
        return text


def catalogue_features(
    item_features: Mapping[str, Mapping[int, Any]],
    num_items: int,
    train: list[np.ndarray],
    cfg: Any,
    *,
    item_original_to_id: Mapping[Any, int] | None = None,
    user_features: Mapping[str, Mapping[int, Any]] | None = None,
    num_users: int = 0,
    seed: int = 0,
    where: str = "item features",
) -> CatalogueFeatures:
    """The data's item features (ids 1..V) encoded as `config.features` says.

    Args:
      item_features: feature -> {item id: value}, e.g. `Processed.item_features`.
      num_items: V.
      train: the training sequences (which items are known).
      cfg: `config.features`.
      item_original_to_id: the data's own ids -> item ids (for the vectors of
        `cfg.item_vectors_path`, keyed by the data's own ids); None: the same.
      user_features: feature -> {user id 1..U: value}, e.g.
        `Processed.user_features`; encoded like the items' where
        `cfg.users` is on and there is any.
      num_users: U.
      seed: the text encoder's seed.
      where: the data's name, for error messages.

    Raises:
      DataError: as `encode`, `read_vectors` and `text_vectors`, or a vector
        file none of whose ids is an item of the data.
    """
    feats = dict(item_features)
    for name in [t.strip() for t in cfg.text.split(",") if t.strip()]:
        if name in feats:
            feats[name] = text_vectors(
                feats[name], cfg.text_dim, seed=seed, where=f"{where}: text feature {name!r}"
            )
    if cfg.item_vectors_path:
        vectors = read_vectors(cfg.item_vectors_path)
        to_id = item_original_to_id
        kept = {
            to_id[k] if to_id is not None else k: v
            for k, v in vectors.items()
            if (k in to_id if to_id is not None else isinstance(k, int) and 1 <= k <= num_items)
        }
        if not kept:
            raise DataError(
                f"config.features.item_vectors_path={cfg.item_vectors_path!r}: none of its "
                f"{len(vectors)} ids (e.g. {next(iter(vectors))!r}) is an item id of {where}"
            )
        feats["vectors"] = kept
    categorical = [c.strip() for c in cfg.categorical.split(",") if c.strip()]
    encoded = encode(feats, num_items + 1, categorical=categorical, where=where)
    known = np.unique(np.concatenate([np.asarray(s) for s in train] or [np.zeros(0, np.int32)]))
    users = None
    if user_features and cfg.users:
        users = encode(
            user_features,
            num_users + 1,
            categorical=categorical,
            where=where.replace("item", "user", 1),
        )
    return CatalogueFeatures(encoded=encoded, known_items=known[known > 0], users=users)
