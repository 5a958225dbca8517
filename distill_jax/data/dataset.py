"""From config to a split: read, clean, build the TFDS dataset, load it, split it.

    raw files --sources--> RawInteractions --preprocess--> Processed
      --builders (TFDS, ArrayRecord, cached by fingerprint)--> SequenceData
      --splits--> LeaveOneOut | ColdStartSplit

The synthetic generator skips the first two steps. Training and evaluation
read the sequences that the TFDS dataset holds, so the cached artifact is
what every later run uses.
"""

import dataclasses
import logging
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from distill_jax.data import builders, preprocess, sources, splits, synthetic, types

log = logging.getLogger(__name__)
SOURCES = ("synthetic", "movielens", "s3rec", "interactions")


@dataclasses.dataclass
class Dataset:
    """A split ready for training, and what the report says about the data.

    Attributes:
      split: leave-one-out, or cold-start when a cold fraction is set.
      info: name, users, items, interactions, and per-step counts (`steps`).
      eval_splits: the splits to report ('test', 'valid', and cold slices).
    """

    split: types.LeaveOneOut | types.ColdStartSplit
    info: dict
    eval_splits: tuple[str, ...]


def _reader_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    if cfg.source != "interactions":
        return {}
    return {
        "user_col": cfg.user_col,
        "item_col": cfg.item_col,
        "time_col": cfg.time_col or None,
        "rating_col": cfg.rating_col or None,
        "item_features_path": cfg.item_features_path or None,
        "user_features_path": cfg.user_features_path or None,
        "delimiter": cfg.delimiter,
    }


def _source_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def _preprocess_options(cfg: ml_collections.ConfigDict) -> dict:
    return {
        "rating_threshold": cfg.rating_threshold if cfg.rating_threshold > 0 else None,
        "k_core": cfg.k_core,
        "min_user_interactions": cfg.min_user_interactions,
        # Repeats of an item are real events in order-only sequence files.
        "drop_duplicates": cfg.source != "s3rec",
    }


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load(config: ml_collections.ConfigDict, workdir: str) -> Dataset:
    """Loads the data `config.data` describes (see configs/base.py)."""
    cfg = config.data
    if cfg.source == "synthetic":
        data = synthetic.generate(cfg.synthetic, config.seed)
        info = {"name": data.name, "steps": {}}
        processed = None
    else:
        if not cfg.path:
            raise types.DataError(
                f"config.data.path is empty: data.source={cfg.source!r} needs the path of "
                "its file or folder (--config.data.path=...)."
            )
        path = Path(cfg.path).expanduser()
        if cfg.source == "movielens" and cfg.download and not path.exists():
            path = sources.download_movielens(cfg.download, path)
        raw = sources.read_source(cfg.source, path, **_reader_kwargs(cfg))
        options = _preprocess_options(cfg)
        processed = preprocess.preprocess(raw, **options)
        cache = cfg.cache_dir or os.path.join(workdir, "data")
        name = f"{cfg.source}_{path.stem or path.name}".replace("-", "_").lower()
        fp = builders.fingerprint(
            _source_files(path), source=cfg.source, **options, **_reader_kwargs(cfg)
        )
        tfds.display_progress_bar(False)  # one line per build, not a progress bar per split
        if jax.process_index() == 0:
            builders.build(
                processed.to_sequence_data(),
                name=name,
                data_dir=cache,
                fingerprint=fp,
                timestamps=processed.timestamps,
            )
        _sync("distill_jax_data_built")
        data = builders.load(name, cache, fingerprint=fp)
        if data.num_items != processed.num_items or len(data.sequences) != len(processed.sequences):
            raise types.DataError(
                f"{cache}: the built dataset {name} does not match the "
                "source; delete it to rebuild."
            )
        info = {"name": raw.name, "steps": processed.stats}
    info.update(users=data.num_users, items=data.num_items, interactions=data.num_interactions)
    if cfg.cold_user_fraction > 0 or cfg.cold_item_fraction > 0:
        if processed is None:
            raise types.DataError(
                "config.data.cold_user_fraction/cold_item_fraction need "
                "a real data source with timestamps, not 'synthetic'."
            )
        split = splits.cold_start_split(
            processed,
            cold_user_fraction=cfg.cold_user_fraction,
            cold_item_fraction=cfg.cold_item_fraction,
            seed=config.seed,
        )
        info["split_counts"] = dict(split.counts)
        eval_splits = ["test", "valid"]
        if len(split.cold_user_targets):
            eval_splits.append("cold_users")
        if len(split.cold_item_targets):
            eval_splits.append("cold_items")
        return Dataset(split, info, tuple(eval_splits))
    return Dataset(splits.leave_one_out(data), info, ("test", "valid"))


def num_eval_users(split, name: str) -> int:
    return int(len(np.asarray(split.eval_examples(name)[1])))
