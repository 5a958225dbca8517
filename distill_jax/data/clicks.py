"""Click data: (user, item, context) feature rows with a click label, split by time.

From interactions as read (`RawInteractions`, any source):

* Labels. With ratings and a `click_threshold`, a rating at or above it is a
  click (1) and a lower one a non-click (0); without ratings (implicit data,
  e.g. Beauty) every interaction is a click.
* Sampled non-clicks. For each interaction, `negatives` (user, item) pairs the
  log never shows, drawn uniformly from the catalogue with the seed; each
  takes the time (and so the context) of the interaction it was drawn for.
* The split is by time, as a click model is used: rows sorted by time (ties
  by file order), the first `train_fraction` train, the next
  `valid_fraction` validate, the rest test. Data with an order but no times
  (S3-Rec files) use each row's relative place in its user's history. Test
  rows whose user (item) has no training row form the `cold_users`
  (`cold_items`) slices.
* Features. Categorical fields: the user and item ids, every categorical side
  feature (a bag such as genres becomes one multi-hot numeric column per
  value), and with timestamps the hour and weekday (UTC). Numbers (age,
  release year) are numeric columns. Vocabularies come from the training rows
  only: a value first seen later is out of vocabulary (id 0). Numeric columns
  are standardised with the training rows' mean and deviation; a missing
  number is the training mean (0 after standardising).
* History (`history` > 0): per row, the items of the user's last `history`
  clicks strictly before the row's time (real interactions only, never a
  sampled pair, never the row itself), as ids of the item field (0: none, or
  an item out of vocabulary). A row and the non-clicks sampled for it share
  a history, so a model learns from it how the candidate relates to what the
  user clicked before; at serving time that history is known.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from distill_jax.data import builders
from distill_jax.data.types import DataError, RawInteractions

__all__ = ["ClickData", "ClickSplit", "build", "read", "write"]

SPLITS = ("train", "valid", "test")
FORMAT = 4  # of the stored rows: a change rebuilds every stored click data set


@dataclasses.dataclass(frozen=True)
class ClickSplit:
    """One split's rows.

    Attributes:
      categorical: ``[R, F]`` int32 field ids (0: out of vocabulary or missing).
      numeric: ``[R, n]`` float32 standardised columns.
      labels: ``[R]`` int8 clicks.
      users, items: ``[R]`` the rows' original ids (for slices and reports).
      times: ``[R]`` float64 times (the order where the data has no times).
      history: ``[R, K]`` int32 item-field ids of the user's last K clicks
        before the row (0: none); K = 0 without a history.
    """

    categorical: np.ndarray
    numeric: np.ndarray
    labels: np.ndarray
    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    history: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> ClickSplit:
        return ClickSplit(*(a[rows] for a in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class ClickData:
    """The three splits, the feature layout and the cold slices of the test split.

    Attributes:
      splits: 'train', 'valid', 'test' -> rows.
      fields: the categorical fields' names, in column order.
      vocab_sizes: per field, its training vocabulary size (ids 1..size).
      numeric_names: the numeric columns' names.
      cold: 'cold_users' / 'cold_items' -> row indices into the test split.
      name: the data's name.
      counts: rows, clicks and sampled non-clicks per split.
      history_field: the field (index into `fields`) whose ids the rows'
        history holds; -1: the rows have no history.
    """

    splits: dict[str, ClickSplit]
    fields: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    numeric_names: tuple[str, ...]
    cold: dict[str, np.ndarray]
    name: str
    counts: dict[str, dict[str, int]]
    history_field: int = -1

    def slice(self, name: str) -> ClickSplit:
        """'train', 'valid', 'test', 'cold_users' or 'cold_items'."""
        if name in self.splits:
            return self.splits[name]
        if name in self.cold:
            return self.splits["test"].take(self.cold[name])
        raise ValueError(
            f"unknown click slice {name!r}; expected one of {SPLITS + tuple(self.cold)}"
        )


def _labels(raw: RawInteractions, click_threshold: float | None) -> np.ndarray:
    if click_threshold is None or raw.ratings is None:
        return np.ones(len(raw), np.int8)
    ratings = np.asarray(raw.ratings, np.float64)
    if np.isnan(ratings).any():
        row = int(np.flatnonzero(np.isnan(ratings))[0])
        raise DataError(f"{raw.name}: interaction {row} has no rating; a click label needs one")
    return (ratings >= click_threshold).astype(np.int8)


def _negatives(raw: RawInteractions, ratio: int, seed: int) -> tuple[np.ndarray, ...]:
    """(users, items, times, source rows) of `ratio` unseen pairs per interaction."""
    users, items = raw.user_ids, raw.item_ids
    catalogue = np.unique(items)
    seen = set(zip(users.tolist(), items.tolist(), strict=True))
    rng = np.random.default_rng([seed, 0xC11C])
    n = len(raw) * ratio
    src = np.repeat(np.arange(len(raw)), ratio)
    out_items = catalogue[rng.integers(len(catalogue), size=n)]
    # Redraw pairs the log shows (few: a user sees a small share of the catalogue).
    for _ in range(100):
        clash = np.fromiter(
            ((u, i) in seen for u, i in zip(users[src].tolist(), out_items.tolist(), strict=True)),
            bool,
            count=n,
        )
        if not clash.any():
            break
        out_items[clash] = catalogue[rng.integers(len(catalogue), size=int(clash.sum()))]
    else:
        keep = ~clash
        src, out_items = src[keep], out_items[keep]
    times = _times(raw)[src]
    return users[src], out_items, times, src


def _times(raw: RawInteractions) -> np.ndarray:
    """The rows' times; order-only data (S3-Rec files): each row's place in its user's history.

    Without times, row j of a user with n rows gets (j + 0.5) / n, so the time
    split gives every user's earliest share to training and their latest to
    the test split, as a split by time does for users active throughout.
    """
    if raw.timestamps is not None:
        return np.asarray(raw.timestamps, np.float64)
    _, user_index, counts = np.unique(raw.user_ids, return_inverse=True, return_counts=True)
    order = np.argsort(user_index, kind="stable")  # file order within each user
    place = np.empty(len(raw), np.float64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    place[order] = np.arange(len(raw)) - np.repeat(starts, counts)
    return (place + 0.5) / counts[user_index]


def _kind(values: list) -> str:
    if all(isinstance(v, tuple | list) for v in values):
        return "bag"
    if all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        for v in values
    ):
        return "number"
    return "category"


def _columns(
    raw: RawInteractions,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    categorical: set[str],
) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """Per row: the categorical fields' raw values and the numeric columns (NaN = missing)."""
    cats: dict[str, list] = {"user": users.tolist(), "item": items.tolist()}
    nums: dict[str, np.ndarray] = {}
    for side, keys, table in (
        ("user", users, raw.user_features),
        ("item", items, raw.item_features),
    ):
        for name in sorted(table):
            values = table[name]
            kind = "category" if name in categorical else _kind(list(values.values()))
            column = [values.get(k) for k in keys.tolist()]
            label = f"{side}_{name}"
            if kind == "category":
                cats[label] = column
            elif kind == "number":
                nums[label] = np.array([np.nan if v is None else float(v) for v in column])
            else:  # a bag: one 0/1 column per value
                for value in sorted({v for row in values.values() for v in row}, key=str):
                    nums[f"{label}={value}"] = np.array(
                        [float(row is not None and value in row) for row in column]
                    )
    if raw.timestamps is not None:
        seconds = times.astype(np.int64)
        cats["hour"] = ((seconds // 3600) % 24).tolist()
        cats["weekday"] = ((seconds // 86400 + 3) % 7).tolist()  # 1970-01-01 was a Thursday
    return cats, nums


def build(
    raw: RawInteractions,
    *,
    click_threshold: float | None = 4.0,
    negatives: int = 1,
    train_fraction: float = 0.8,
    valid_fraction: float = 0.1,
    categorical: Mapping[str, Any] | set[str] = frozenset(),
    drop_features: set[str] = frozenset(),
    history: int = 0,
    seed: int = 0,
) -> ClickData:
    """Click rows of `raw`, split by time (see the module docstring).

    Args:
      raw: the interactions as read, with their side features.
      click_threshold: ratings at or above it are clicks; None: every
        interaction is one (implicit data).
      negatives: sampled unseen pairs per interaction (0: none).
      train_fraction, valid_fraction: the earliest shares of the rows for
        training and validation; the rest is the test split.
      categorical: integer side features to read as categories, not numbers.
      drop_features: side features left out (e.g. free text such as titles).
      history: the clicks before each row to give it (0: no history).
      seed: the sampling of non-clicks.
    """
    _check_fractions(train_fraction, valid_fraction)
    if negatives < 0:
        raise ValueError(f"negatives={negatives}; expected an integer >= 0")
    if len(raw) == 0:
        raise DataError(f"{raw.name}: no interactions")
    raw = dataclasses.replace(
        raw,
        item_features={k: v for k, v in raw.item_features.items() if k not in drop_features},
        user_features={k: v for k, v in raw.user_features.items() if k not in drop_features},
    )
    labels = _labels(raw, click_threshold)
    users, items, times = raw.user_ids, raw.item_ids, _times(raw)
    sampled = 0
    if negatives:
        n_users, n_items, n_times, _ = _negatives(raw, negatives, seed)
        sampled = len(n_users)
        users = np.concatenate([users, n_users])
        items = np.concatenate([items, n_items])
        times = np.concatenate([times, n_times])
        labels = np.concatenate([labels, np.zeros(sampled, np.int8)])
    is_sampled = np.arange(len(labels)) >= len(raw)
    order = np.argsort(times, kind="stable")
    users, items, times, labels, is_sampled = (
        a[order] for a in (users, items, times, labels, is_sampled)
    )
    cats, nums = _columns(raw, users, items, times, set(categorical))
    return _assemble(
        users,
        items,
        times,
        labels,
        is_sampled,
        cats,
        nums,
        raw.name,
        train_fraction,
        valid_fraction,
        history_rows(users, times, (labels == 1) & ~is_sampled, history),
    )


def history_rows(users: np.ndarray, times: np.ndarray, clicked: np.ndarray, k: int) -> np.ndarray:
    """``[R, k]`` int64: per row (sorted by time), its user's last k clicked rows before it.

    Only rows with `clicked` count, and only those strictly earlier in time
    (rows at the same time never see each other); -1 pads. Oldest first.
    """
    out = np.full((len(users), k), -1, np.int64)
    if k <= 0 or len(users) == 0:
        return out
    keys = np.unique(users, return_inverse=True)[1]
    by_user = np.argsort(keys, kind="stable")  # each user's rows, in time order
    bounds = np.flatnonzero(np.diff(keys[by_user])) + 1
    for group in np.split(by_user, bounds):
        recent: list[int] = []  # the user's clicked rows so far (the last k)
        pending: list[int] = []  # clicked rows at the current time, not yet visible
        now = None
        for row in group.tolist():
            if times[row] != now:
                recent = (recent + pending)[-k:]
                pending, now = [], times[row]
            if recent:
                out[row, k - len(recent) :] = recent
            if clicked[row]:
                pending.append(row)
    return out


def _check_fractions(train_fraction: float, valid_fraction: float) -> None:
    if not 0 < train_fraction < 1 or not 0 < valid_fraction < 1 - train_fraction:
        raise ValueError(
            f"train_fraction={train_fraction}, valid_fraction={valid_fraction}: expected "
            "both in (0, 1) with a test share left"
        )


def _assemble(
    users,
    items,
    times,
    labels,
    is_sampled,
    cats,
    nums,
    name,
    train_fraction,
    valid_fraction,
    hist_rows: np.ndarray | None = None,
    item_field: str = "item",
) -> ClickData:
    """Rows sorted by time -> the split, training vocabularies and statistics, cold slices."""
    n = len(labels)
    cut1, cut2 = int(train_fraction * n), int((train_fraction + valid_fraction) * n)
    parts = {"train": slice(0, cut1), "valid": slice(cut1, cut2), "test": slice(cut2, n)}
    train = parts["train"]
    fields, vocab_sizes, cat_cols = [], [], []
    for field, column in cats.items():
        values = column[train]
        vocab = {
            v: i + 1 for i, v in enumerate(sorted({v for v in values if v is not None}, key=str))
        }
        fields.append(field)
        vocab_sizes.append(len(vocab))
        cat_cols.append(np.array([vocab.get(v, 0) for v in column], np.int32))
    num_names, num_cols = [], []
    for column_name, column in nums.items():
        known = column[train][~np.isnan(column[train])]
        if known.size == 0:
            continue  # no training row has it: nothing to learn from
        mean, std = known.mean(), known.std()
        scaled = (column - mean) / (std if std > 0 else 1.0)
        num_names.append(column_name)
        num_cols.append(np.where(np.isnan(scaled), 0.0, scaled).astype(np.float32))
    categorical_m = np.stack(cat_cols, axis=1)
    numeric_m = np.stack(num_cols, axis=1) if num_cols else np.zeros((n, 0), np.float32)
    history_field = -1
    if hist_rows is None or hist_rows.shape[1] == 0:
        history = np.zeros((n, 0), np.int32)
    else:
        history_field = fields.index(item_field)
        item_ids = cat_cols[history_field]
        history = np.where(hist_rows >= 0, item_ids[np.maximum(hist_rows, 0)], 0).astype(np.int32)
    splits = {
        k: ClickSplit(
            categorical_m[s], numeric_m[s], labels[s], users[s], items[s], times[s], history[s]
        )
        for k, s in parts.items()
    }
    train_users, train_items = set(users[train].tolist()), set(items[train].tolist())
    test = splits["test"]
    cold = {
        "cold_users": np.flatnonzero([u not in train_users for u in test.users.tolist()]),
        "cold_items": np.flatnonzero([i not in train_items for i in test.items.tolist()]),
    }
    counts = {
        k: {
            "rows": int(s.stop - s.start),
            "clicks": int(labels[s].sum()),
            "sampled_non_clicks": int(is_sampled[s].sum()),
        }
        for k, s in parts.items()
    }
    counts["cold"] = {k: len(v) for k, v in cold.items()}
    return ClickData(
        splits=splits,
        fields=tuple(fields),
        vocab_sizes=tuple(vocab_sizes),
        numeric_names=tuple(num_names),
        cold=cold,
        name=name,
        counts=counts,
        history_field=history_field,
    )


def from_table(
    path: str,
    *,
    label_col: str,
    time_col: str = "",
    user_col: str = "",
    item_col: str = "",
    categorical: set[str] = frozenset(),
    delimiter: str = ",",
    train_fraction: float = 0.8,
    valid_fraction: float = 0.1,
    history: int = 0,
) -> ClickData:
    """Click rows of a CSV/Parquet table whose rows are examples: features and a 0/1 label.

    Every column but the label (and the time) is a feature: text columns, and
    integer columns named in `categorical`, are categorical fields (their
    vocabulary from the training rows; a value first seen later, or a missing
    one, is out of vocabulary, id 0); other number columns are standardised
    with the training rows' statistics (a missing number is their mean).
    `time_col` orders the rows for the split (none: the file's order);
    `user_col` / `item_col`, where given, are fields like the others and name
    the test rows' cold slices; a `history` needs both (every row with label 1
    is a click of its user).
    """
    from pathlib import Path

    import pyarrow as pa

    from distill_jax.data import readers_util as ru

    _check_fractions(train_fraction, valid_fraction)
    if history > 0 and not (user_col and item_col):
        raise ValueError(
            f"config.click.history={history} needs config.click.user_col and "
            "config.click.item_col: a history is the items a user clicked"
        )
    path = Path(path)
    columns = ru.table_columns(path, delimiter)
    named = {
        "label_col": label_col,
        "time_col": time_col,
        "user_col": user_col,
        "item_col": item_col,
    }
    ru.require_columns(
        path, columns, {v: f"config.click.{k}" for k, v in named.items() if v}, delimiter
    )
    table, locate = ru.read_table(path, columns, delimiter, text=[])
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    labels = ru.numbers(table[label_col], label_col, pa.int64(), "a 0/1 label", locate)
    if not np.isin(labels, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0])
        raise DataError(
            f"{locate(row)}: expected a 0/1 label in column {label_col!r}, got {labels[row]}"
        )
    n = len(labels)
    times = (
        np.asarray(ru.timestamps(table[time_col], time_col, locate), np.float64)
        if time_col
        else np.arange(n, dtype=np.float64)
    )
    order = np.argsort(times, kind="stable")
    cats, nums = {}, {}
    for name in columns:
        if name in (label_col, time_col):
            continue
        column = table[name]
        if ru.is_text_column(column) or name in categorical or name in (user_col, item_col):
            cats[name] = ru.categories(column)
        else:
            nums[name] = ru.numbers(column, name, pa.float64(), "a number", locate)
    cats = {k: [v[i] for i in order.tolist()] for k, v in cats.items()}
    nums = {k: v[order] for k, v in nums.items()}
    users = np.array(cats[user_col], object) if user_col else np.zeros(n, np.int64)
    items = np.array(cats[item_col], object) if item_col else np.zeros(n, np.int64)
    labels = labels[order].astype(np.int8)
    return _assemble(
        users,
        items,
        times[order],
        labels,
        np.zeros(n, bool),
        cats,
        nums,
        str(path),
        train_fraction,
        valid_fraction,
        history_rows(users.astype(str), times[order], labels == 1, history) if history else None,
        item_field=item_col,
    )


# The TFDS data set of click rows: one record per CHUNK rows of a split, the
# arrays stored as raw bytes; the original user and item ids as indices into
# lists in the metadata (they may be strings). Layout as builders.py's:
# `<data_dir>/click_rows/<name>/1.0.0/`, written atomically.
CHUNK = 8192


@dataclasses.dataclass(eq=False)
class ClickRowsConfig(tfds.core.BuilderConfig):
    data: Any = dataclasses.field(default=None, repr=False)  # ClickData
    fingerprint: str = ""


class ClickRowsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Click rows per split, CHUNK rows a record (see `write`)."""

    name = "click_rows"
    VERSION = tfds.core.Version(builders.DATASET_VERSION)
    RELEASE_NOTES = {builders.DATASET_VERSION: "Chunks of click rows per split."}
    code_path = None  # as builders.SequenceBuilder: nothing is downloaded

    def _info(self) -> tfds.core.DatasetInfo:
        raw = tfds.features.Encoding.BYTES
        data = self.builder_config.data if self.builder_config is not None else None
        f = len(data.fields) if data is not None else None
        n = len(data.numeric_names) if data is not None else None
        k = data.splits["train"].history.shape[1] if data is not None else None
        features = {
            "chunk": tfds.features.Scalar(np.int64),
            "categorical": tfds.features.Tensor(shape=(None, f), dtype=np.int32, encoding=raw),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.int8, encoding=raw),
            "users": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=raw),
            "items": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=raw),
            "times": tfds.features.Tensor(shape=(None,), dtype=np.float64, encoding=raw),
        }
        if n != 0:  # (zero columns do not decode from raw bytes; read() makes them)
            features["numeric"] = tfds.features.Tensor(
                shape=(None, n), dtype=np.float32, encoding=raw
            )
        if k != 0:
            features["history"] = tfds.features.Tensor(
                shape=(None, k), dtype=np.int32, encoding=raw
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Click rows with their fields, numeric columns and labels.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        data: ClickData = self.builder_config.data
        users = _unique(np.concatenate([s.users for s in data.splits.values()]))
        items = _unique(np.concatenate([s.items for s in data.splits.values()]))
        self.info.metadata.update(
            fingerprint=self.builder_config.fingerprint,
            name=data.name,
            fields=list(data.fields),
            vocab_sizes=list(data.vocab_sizes),
            numeric_names=list(data.numeric_names),
            history_field=data.history_field,
            history_len=int(data.splits["train"].history.shape[1]),
            cold={k: v.tolist() for k, v in data.cold.items()},
            counts=data.counts,
            users=[_json(u) for u in users],
            items=[_json(i) for i in items],
        )
        index = (
            {_key(u): k for k, u in enumerate(users)},
            {_key(i): k for k, i in enumerate(items)},
        )
        return {k: self._generate_examples(s, index) for k, s in data.splits.items()}

    def _generate_examples(self, split: ClickSplit, index):
        users, items = index
        for c, start in enumerate(range(0, len(split), CHUNK)):
            rows = split.take(np.arange(start, min(start + CHUNK, len(split))))
            record = {
                "chunk": c,
                "categorical": rows.categorical,
                "labels": rows.labels,
                "users": np.array([users[_key(u)] for u in rows.users.tolist()], np.int32),
                "items": np.array([items[_key(i)] for i in rows.items.tolist()], np.int32),
                "times": rows.times.astype(np.float64),
            }
            if rows.numeric.shape[1]:
                record["numeric"] = rows.numeric
            if rows.history.shape[1]:
                record["history"] = rows.history
            yield c, record


def _key(value: Any) -> tuple[str, Any]:
    return (type(value).__name__, value)


def _json(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _unique(values: np.ndarray) -> list:
    seen, out = set(), []
    for v in values.tolist():
        if _key(v) not in seen:
            seen.add(_key(v))
            out.append(v)
    return out


def write(data: ClickData, name: str, data_dir: str, fingerprint: str) -> None:
    """Writes `data` as the TFDS data set `name` (replacing one of another fingerprint)."""
    path = _path(name, data_dir)
    if path.exists():
        path.rmtree()
    cfg = ClickRowsConfig(
        name=name, description=f"fingerprint {fingerprint}", data=data, fingerprint=fingerprint
    )
    builder = ClickRowsBuilder(config=cfg, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))


def _path(name: str, data_dir: str):
    from etils import epath

    return epath.Path(data_dir) / "click_rows" / name / builders.DATASET_VERSION


def read(name: str, data_dir: str, fingerprint: str | None = None) -> ClickData | None:
    """The stored click rows, or None when there are none with `fingerprint`."""
    path = _path(name, data_dir)
    meta = builders.read_metadata(path)
    if meta is None or (fingerprint is not None and meta.get("fingerprint") != fingerprint):
        return None
    users, items = np.array(meta["users"], object), np.array(meta["items"], object)
    builder = tfds.builder_from_directory(os.fspath(path))
    splits = {}
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        chunks = source.__getitems__(list(range(len(source))))
        width = {
            "categorical": len(meta["fields"]),
            "numeric": len(meta["numeric_names"]),
            "history": meta["history_len"],
        }
        arrays = {
            k: np.concatenate([np.asarray(c[k]) for c in chunks])
            if chunks and k in chunks[0]
            else np.zeros((0, width[k]) if k in width else (0,))
            for k in ("categorical", "numeric", "labels", "users", "items", "times", "history")
        }
        for k in ("numeric", "history"):
            if not width[k]:
                arrays[k] = np.zeros((len(arrays["labels"]), 0), np.float32)
        splits[split] = ClickSplit(
            categorical=arrays["categorical"].astype(np.int32),
            numeric=arrays["numeric"].astype(np.float32),
            labels=arrays["labels"].astype(np.int8),
            users=users[arrays["users"].astype(np.int64)],
            items=items[arrays["items"].astype(np.int64)],
            times=arrays["times"].astype(np.float64),
            history=arrays["history"].astype(np.int32),
        )
    return ClickData(
        splits=splits,
        fields=tuple(meta["fields"]),
        vocab_sizes=tuple(meta["vocab_sizes"]),
        numeric_names=tuple(meta["numeric_names"]),
        cold={k: np.asarray(v, np.int64) for k, v in meta["cold"].items()},
        name=meta["name"],
        counts=meta["counts"],
        history_field=meta["history_field"],
    )
