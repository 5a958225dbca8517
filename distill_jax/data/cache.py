"""What the built dataset keeps beside the sequences, so a cached run never reads raw files.

A real source is read, cleaned and written once as a TFDS ArrayRecord dataset
(`builders.py`). Everything later steps need from the cleaning (the counts per
step for the report, the id mappings back to the original ids, the side
features, the source's name) is stored in the dataset's metadata, in the same
atomic write as the records; the sequences and timestamps are the records.
`processed(...)` puts a `Processed` back together from those, so the splits and
the report are the same whether the dataset was built in this run or earlier.

Whether the cache is current: the fingerprint hashes the source files'
contents and the options (`builders.fingerprint`). Hashing is skipped when
every file's path, size and modification time and the options equal those the
dataset was built from (the manifest below), so an unchanged source costs
neither a parse nor a hash.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distill_jax.data.types import Processed, SequenceData

FORMAT = (
    4  # Bumped when what is stored changes: older datasets are rebuilt (4: MovieLens zip prefix).
)
_KIND = {"i": "int64", "u": "int64", "f": "float64"}


def manifest(files: Sequence[os.PathLike | str]) -> list[dict[str, Any]]:
    """Path, size and modification time of each source file, in order."""
    out = []
    for f in files:
        stat = os.stat(f)
        out.append({"path": os.path.abspath(f), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def unchanged(meta: Mapping[str, Any] | None, files: list[dict], options: dict) -> bool:
    """True when `meta` was built by this format from these very files and options."""
    return (
        meta is not None
        and meta.get("cache_format") == FORMAT
        and meta.get("files") == files
        and meta.get("options") == _json(options)
    )


def _json(value: Any) -> Any:
    """`value` with numpy scalars as Python ones and tuples as tagged lists."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [_json(v) for v in value]}
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _unjson(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_unjson(v) for v in value["__tuple__"])
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value


def _table(table: np.ndarray) -> dict[str, Any]:
    return {"dtype": _KIND.get(table.dtype.kind, "object"), "values": _json(table.tolist())}


def _untable(stored: Mapping[str, Any]) -> np.ndarray:
    values = stored["values"]
    if stored["dtype"] == "object":
        out = np.empty(len(values), object)
        out[:] = values
        return out
    return np.asarray(values, stored["dtype"])


def _features(features: dict[str, dict[int, Any]]) -> dict[str, Any]:
    # JSON keys are strings; the ids are ints, restored by `_unfeatures`.
    return {name: _json({int(k): v for k, v in f.items()}) for name, f in features.items()}


def _unfeatures(stored: Mapping[str, Any]) -> dict[str, dict[int, Any]]:
    return {name: {int(k): _unjson(v) for k, v in f.items()} for name, f in stored.items()}


def metadata(processed: Processed, files: list[dict], options: dict) -> dict[str, Any]:
    """The JSON metadata that `processed(...)` turns back into `processed`."""
    return {
        "cache_format": FORMAT,
        "files": files,
        "options": _json(options),
        "stats": _json(processed.stats),
        "item_id_to_original": _table(processed.item_id_to_original),
        "user_id_to_original": _table(processed.user_id_to_original),
        "item_features": _features(processed.item_features),
        "user_features": _features(processed.user_features),
    }


def _inverse(table: np.ndarray) -> dict[Any, int]:
    return {value: new for new, value in enumerate(table.tolist()) if new > 0}


def processed(
    meta: Mapping[str, Any], data: SequenceData, timestamps: list[np.ndarray] | None
) -> Processed:
    """The cleaned data the dataset was built from, from its records and metadata."""
    items = _untable(meta["item_id_to_original"])
    users = _untable(meta["user_id_to_original"])
    return Processed(
        name=data.name,
        num_items=data.num_items,
        sequences=data.sequences,
        timestamps=timestamps,
        item_id_to_original=items,
        item_original_to_id=_inverse(items),
        user_id_to_original=users,
        user_original_to_id=_inverse(users),
        item_features=_unfeatures(meta["item_features"]),
        user_features=_unfeatures(meta["user_features"]),
        stats={step: dict(counts) for step, counts in meta["stats"].items()},
    )
