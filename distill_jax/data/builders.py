"""Users' sequences stored as a TFDS data set in ArrayRecord files, without TensorFlow.

One record per user, `{'user': int64, 'items': int32[None]}` (and
`'timestamps': int64[None]` when given), in user order, in a single split
named `SPLIT`: the leave-one-out split is made later, per user, from the
whole sequences. TFDS reserves the split name 'all' (it means "every split"
when reading), hence 'users'.

Layout: `<data_dir>/sequences/<name>/1.0.0/` holding `dataset_info.json`,
`features.json`, `metadata.json` (num_items, the source's name, the
fingerprint, and any JSON metadata the caller adds, e.g. the id mappings and
cleaning counts) and `sequences-users.array_record-00000-of-00001`.

Atomicity: TFDS writes everything into a sibling `incomplete.XXXXXX_1.0.0/`
directory and renames it to `1.0.0/` only after the last file is written; an
exception removes the temporary directory, a killed process leaves it behind
under a name no reader looks at. A data set directory therefore exists only
when complete, and `build` and `load` look for nothing else.
"""

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from distill_jax.data.types import SequenceData
from distill_jax.train import preemption

DATASET_VERSION = "1.0.0"
SPLIT = "users"
_CONFIG_NAME = re.compile(r"^[\w+\-.]+$")  # What TFDS accepts as a config name.

_Lazy = Any  # A value, or a zero-argument callable returning it.


def _resolve(value: _Lazy) -> Any:
    return value() if callable(value) else value


@dataclasses.dataclass(eq=False)
class SequenceConfig(tfds.core.BuilderConfig):
    """One data set: its name, its inputs and their fingerprint.

    Attributes:
      data: a `SequenceData`, or a callable producing it (called only when
        the data set has to be built).
      timestamps: None, or one int64 array per user aligned with its items
        (or a callable producing them).
      fingerprint: identifies the inputs (see `fingerprint`); a data set built
        from other inputs is rebuilt.
    """

    # Not in the repr: TFDS logs the config, and the data can be large.
    data: _Lazy = dataclasses.field(default=None, repr=False)
    timestamps: _Lazy = dataclasses.field(default=None, repr=False)
    fingerprint: str = ""
    # int64 (seconds) unless the source's times are fractional.
    timestamp_dtype: Any = np.int64
    extra_metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)


class SequenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes users' sequences, one record per user, in user order.

    Not registered with TFDS (it is built only through `build`, with its
    data in the config), so `tfds.load('sequences')` does not know it; read
    it back with `load` or `tfds.builder_from_directory`.
    """

    name = "sequences"
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "One record per user: user, items (and timestamps)."}
    # TFDS 4.9.10 locates a builder's source (only to find its download
    # checksums) through `importlib_resources`, which it declares only for
    # Python < 3.9, so `download_and_prepare` fails with "No module named
    # 'importlib_resources'" for builders defined in an installed package
    # (tensorflow/datasets#11212). Nothing is downloaded here: no code path.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = {
            "user": tfds.features.Scalar(np.int64),
            "items": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }
        if cfg is not None and cfg.timestamps is not None:
            features["timestamps"] = tfds.features.Tensor(shape=(None,), dtype=cfg.timestamp_dtype)
        # Not `dataset_info_from_configs`: that expects a TFDS dataset package
        # (README.md, CITATIONS.bib, TAGS.txt beside the builder's module).
        return tfds.core.DatasetInfo(
            builder=self,
            description="Users' time-ordered item sequences (ids 1..num_items).",
            features=tfds.features.FeaturesDict(features),
            # Keep the generator's (user) order in the file.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the data are in memory.
        cfg = self.builder_config
        data = _resolve(cfg.data)
        if not isinstance(data, SequenceData):
            raise TypeError(
                f"Data set {cfg.name!r}: expected a SequenceData (or a callable "
                f"returning one), got {type(data).__name__}."
            )
        timestamps = _resolve(cfg.timestamps)
        if timestamps is None and cfg.timestamps is not None:
            # `_info` declared the feature from the callable's presence.
            raise ValueError(f"Data set {cfg.name!r}: the timestamps callable returned None.")
        _check(data, timestamps, cfg.name)
        self.info.metadata.update(
            dict(cfg.extra_metadata),
            num_items=int(data.num_items),
            source=data.name,
            fingerprint=cfg.fingerprint,
        )
        return {SPLIT: self._generate_examples(data, timestamps)}

    def _generate_examples(self, data: SequenceData, timestamps: Sequence[np.ndarray] | None):
        for user, seq in enumerate(data.sequences):
            # Stopping here raises through TFDS, which removes its temporary directory.
            preemption.stop_point("while writing the data set")
            example = {"user": user, "items": np.asarray(seq, np.int32)}
            if timestamps is not None:
                example["timestamps"] = np.asarray(
                    timestamps[user], self.builder_config.timestamp_dtype
                )
            yield user, example


def _check(data: SequenceData, timestamps: Sequence[np.ndarray] | None, name: str) -> None:
    """Stops on ids outside 1..num_items and on timestamps that do not align."""
    for user, seq in enumerate(data.sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(
                f"Data set {name!r}, user {user}: expected a 1-D integer array of "
                f"item ids, got dtype {seq.dtype} and shape {seq.shape}."
            )
        if seq.size and (seq.min() < 1 or seq.max() > data.num_items):
            raise ValueError(
                f"Data set {name!r}, user {user}: item ids must lie in "
                f"1..{data.num_items} (0 is padding), got {seq.min()}..{seq.max()}."
            )
    if timestamps is not None:
        if len(timestamps) != data.num_users:
            raise ValueError(
                f"Data set {name!r}: {len(timestamps)} timestamp arrays for "
                f"{data.num_users} users; expected one per user."
            )
        for user, (seq, ts) in enumerate(zip(data.sequences, timestamps, strict=True)):
            if len(ts) != len(seq):
                raise ValueError(
                    f"Data set {name!r}, user {user}: {len(ts)} timestamps for "
                    f"{len(seq)} items; expected one per item."
                )


def fingerprint(files: Sequence[os.PathLike | str] = (), **options: Any) -> str:
    """A short digest of input files' CONTENTS and of the options applied to them.

    Args:
      files: the raw files read (their contents count, not their paths, so a
        moved file does not trigger a rebuild).
      **options: JSON-serializable settings (e.g. `config.data.to_dict()`).

    Returns:
      16 hex digits, which also change with the builder's VERSION.
    """
    digest = hashlib.sha256(f"sequences:{DATASET_VERSION}".encode())
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def dataset_dir(name: str, data_dir: os.PathLike | str) -> epath.Path:
    """Where data set `name` lives (or would live) under `data_dir`."""
    if not _CONFIG_NAME.match(name):
        raise ValueError(
            f"Data set name {name!r} is invalid: expected letters, digits and '_+-.' only."
        )
    return epath.Path(data_dir) / SequenceBuilder.name / name / DATASET_VERSION


def metadata(name: str, data_dir: os.PathLike | str) -> Mapping[str, Any] | None:
    """The metadata of finished data set `name`, or None when there is none."""
    return read_metadata(dataset_dir(name, data_dir))


def read_metadata(path: epath.Path) -> Mapping[str, Any] | None:
    """The finished data set's metadata, or None when there is no finished data set."""
    # `dataset_info.json` and `metadata.json` appear together, with the
    # records, when TFDS renames the complete directory into place.
    meta = path / "metadata.json"
    if not (path / "dataset_info.json").exists() or not meta.exists():
        return None
    return json.loads(meta.read_text())


def build(
    data: SequenceData | Callable[[], SequenceData],
    *,
    name: str,
    data_dir: os.PathLike | str,
    fingerprint: str,
    timestamps: Sequence[np.ndarray] | Callable[[], Sequence[np.ndarray]] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> str:
    """Builds data set `name` unless it exists with the same fingerprint.

    Args:
      data: the sequences, or a callable producing them (called only if the
        data set has to be built, so a cached build skips reading raw files).
      name: the data set's name (letters, digits, '_+-.').
      data_dir: the root of the TFDS data directory.
      fingerprint: identifies the inputs, e.g. `fingerprint(files, **options)`.
      timestamps: optional per-user timestamps aligned with the items (stored
        as int64, or float64 when given as floats).
      extra_metadata: JSON-serializable values stored with the records and
        written in the same atomic step (see `metadata`).

    Returns:
      The data set's directory.

    Raises:
      ValueError: on item ids outside 1..num_items or misaligned timestamps.
    """
    path = dataset_dir(name, data_dir)
    meta = read_metadata(path)
    if meta is not None and meta.get("fingerprint") == fingerprint:
        logging.info("Reusing data set %s (fingerprint %s).", path, fingerprint)
        return os.fspath(path)
    if path.exists():
        # Stale (other inputs) or not a finished data set: remove it FIRST, so
        # that a failed rebuild leaves no data set rather than the stale one.
        logging.info("Removing %s: fingerprint %s != %s.", path, meta, fingerprint)
        path.rmtree()
    fractional = (
        timestamps is not None
        and not callable(timestamps)
        and any(np.asarray(t).dtype.kind == "f" for t in timestamps)
    )
    config = SequenceConfig(
        name=name,
        description=f"fingerprint {fingerprint}",
        data=data,
        timestamps=timestamps,
        fingerprint=fingerprint,
        timestamp_dtype=np.float64 if fractional else np.int64,
        extra_metadata=dict(extra_metadata or {}),
    )
    builder = SequenceBuilder(
        config=config, data_dir=os.fspath(data_dir), file_format="array_record"
    )
    builder.download_and_prepare(download_dir=os.path.join(os.fspath(data_dir), "downloads"))
    return os.fspath(builder.data_dir)


def read(
    name: str, data_dir: os.PathLike | str, *, fingerprint: str | None = None
) -> tuple[SequenceData, list[np.ndarray] | None]:
    """The data set's sequences, and its timestamps when it stores them (else None).

    Raises as `load` does.
    """
    path = dataset_dir(name, data_dir)
    meta = read_metadata(path)
    if meta is None:
        raise FileNotFoundError(
            f"No finished data set {name!r} at {path}; run builders.build first."
        )
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"Data set {path} was built with fingerprint {meta.get('fingerprint')!r}, "
            f"expected {fingerprint!r}; rebuild it with builders.build."
        )
    source = tfds.builder_from_directory(os.fspath(path)).as_data_source(split=SPLIT)
    records = source.__getitems__(list(range(len(source))))
    users = np.array([r["user"] for r in records], np.int64)
    if not np.array_equal(users, np.arange(len(records))):
        raise ValueError(f"{path}: records are not users 0..{len(records) - 1} in order.")
    data = SequenceData(
        num_items=int(meta["num_items"]),
        sequences=[np.asarray(r["items"], np.int32) for r in records],
        name=str(meta["source"]),
    )
    if "timestamps" not in source.dataset_info.features:
        return data, None
    return data, [np.asarray(r["timestamps"]) for r in records]


def load(name: str, data_dir: os.PathLike | str, *, fingerprint: str | None = None) -> SequenceData:
    """Reads data set `name` back by random access (ArrayRecord, no TensorFlow).

    Args:
      name: the data set's name.
      data_dir: the root of the TFDS data directory.
      fingerprint: when given, the data set must have been built with it.

    Returns:
      The users' sequences, in user order, with the catalogue size and the
      source's name they were built from.

    Raises:
      FileNotFoundError: no finished data set `name` under `data_dir`.
      ValueError: it was built with another fingerprint.
    """
    return read(name, data_dir, fingerprint=fingerprint)[0]
