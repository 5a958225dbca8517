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
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from distill_jax import faults
from distill_jax.data import builders, cache, preprocess, sources, splits, synthetic, types
from distill_jax.data import features as features_lib
from distill_jax.progress import Progress
from distill_jax.train import preemption

log = logging.getLogger(__name__)
SOURCES = ("synthetic", "movielens", "s3rec", "interactions")


@dataclasses.dataclass
class Dataset:
    """A split ready for training, and what the report says about the data.

    Attributes:
      split: leave-one-out, or cold-start when a cold fraction is set.
      info: name, users, items, interactions, and per-step counts (`steps`).
      eval_splits: the splits to report ('test', 'valid', and cold slices).
      item_id_to_original: [V+1] item id -> the data's own item id (entry 0 a
        placeholder); the synthetic data's own ids are the item ids.
      item_features: the encoded item features, where a model uses them
        (`config.<model>.use_features`); else None.
      user_id_to_original: [U+1] user id -> the data's own user id (entry 0
        a placeholder), for an artefact that reads user features.
    """

    split: types.LeaveOneOut | types.ColdStartSplit
    info: dict
    eval_splits: tuple[str, ...]
    item_id_to_original: np.ndarray
    item_features: features_lib.CatalogueFeatures | None = None
    user_id_to_original: np.ndarray | None = None


def _reader_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    if cfg.source != "interactions":
        return {}
    return {
        "user_col": cfg.user_col,
        "item_col": cfg.item_col,
        "time_col": cfg.time_col or None,
        "rating_col": cfg.rating_col or None,
        **_side_files(cfg),
        "delimiter": cfg.delimiter,
    }


# data.item_features_path=AUTO: the S3-Rec layout's attribute file beside
# the sequence file (NAME.txt -> NAME_item2attributes.json).
AUTO = "auto"


def _side_files(cfg: ml_collections.ConfigDict) -> dict:
    """The item/user feature files of `config.data` (None where not set)."""
    items = cfg.item_features_path or None
    if items == AUTO:
        if cfg.source != "s3rec":
            raise types.DataError(
                f"config.data.item_features_path='{AUTO}' names the S3-Rec attribute file "
                f"beside data.path, and data.source={cfg.source!r} has none; give the "
                "feature file's path"
            )
        path = Path(cfg.path).expanduser()
        items = str(path.with_name(f"{path.stem}_item2attributes.json"))
    return {"item_features_path": items, "user_features_path": cfg.user_features_path or None}


def _source_files(path: Path, cfg: ml_collections.ConfigDict) -> list[Path]:
    """The files the dataset is built from: the source's, then the feature files."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for key, extra in _side_files(cfg).items():
        if extra is None:
            continue
        extra = Path(extra).expanduser()
        if not extra.is_file():
            raise types.DataError(f"config.data.{key}={str(extra)!r} is not a file")
        files.append(extra)
    return files


def _preprocess_options(cfg: ml_collections.ConfigDict) -> dict:
    return {
        "rating_threshold": cfg.rating_threshold if cfg.rating_threshold > 0 else None,
        "k_core": cfg.k_core,
        "min_user_interactions": cfg.min_user_interactions,
        # Repeats of an item are real events in order-only sequence files.
        "drop_duplicates": cfg.source != "s3rec",
    }


def _cached_or_built(cfg: ml_collections.ConfigDict, path: Path, workdir: str):
    """The cleaned data of a real source, from the built dataset when it is current.

    The raw files are read and cleaned only when the dataset is missing or
    stale (other file contents or options); otherwise neither is touched.
    """
    if not path.exists():
        raise types.DataError(
            f"config.data.path={str(path)!r} does not exist: expected the "
            f"{cfg.source} file or folder."
        )
    options = {**_preprocess_options(cfg), **_reader_kwargs(cfg), "source": cfg.source}
    # Only where set: a source without feature files keeps its fingerprint.
    options.update({k: str(v) for k, v in _side_files(cfg).items() if v is not None})
    files = _source_files(path, cfg)
    listed = cache.manifest(files)
    data_dir = cfg.cache_dir or os.path.join(workdir, "data")
    name = f"{cfg.source}_{path.stem or path.name}".replace("-", "_").lower()
    meta = builders.metadata(name, data_dir)
    if cache.unchanged(meta, listed, options):
        fp = meta["fingerprint"]  # same files, sizes, times and options: no hash needed
    else:
        fp = builders.fingerprint(files, cache_format=cache.FORMAT, **options)
    current = meta is not None and meta.get("fingerprint") == fp
    tfds.display_progress_bar(False)  # one line per build, not a progress bar per split
    if current:
        log.info("data: %s is current; the raw files are not read", name)
    # Phases of a fresh build: read, clean + split, write; then every run reads back.
    phases = Progress(f"[data] {name}", 1 if current else 4, unit="phase", logger=log)
    t0 = time.time()

    def done(what: str) -> None:
        nonlocal t0
        preemption.stop_point("while preparing the data")
        phases.update()
        phases.note("data: %s %s in %.1fs", what, name, time.time() - t0)
        t0 = time.time()

    if not current and jax.process_index() == 0:
        raw = raw_interactions(cfg, path)
        done("read the raw files of")
        fresh = preprocess.preprocess(raw, **_preprocess_options(cfg))
        done("cleaned and split")
        builders.build(
            fresh.to_sequence_data(),
            name=name,
            data_dir=data_dir,
            fingerprint=fp,
            timestamps=fresh.timestamps,
            extra_metadata=cache.metadata(fresh, listed, options),
        )
        done("wrote the ArrayRecord dataset of")
    sync("distill_jax_data_built")
    # Fresh or cached, the run reads the dataset back: one path, the same data.
    data, timestamps = builders.read(name, data_dir, fingerprint=fp)
    done("read back")
    phases.close()
    return cache.processed(builders.metadata(name, data_dir), data, timestamps), fp


def source_files(cfg: ml_collections.ConfigDict) -> tuple[Path, list[Path], dict]:
    """`config.data`'s path, the files it is read from and the reading options (a fingerprint's)."""
    path = movielens_path(cfg)
    options = {**_reader_kwargs(cfg), "source": cfg.source}
    options.update({k: str(v) for k, v in _side_files(cfg).items() if v is not None})
    return path, _source_files(path, cfg), options


def raw_interactions(cfg: ml_collections.ConfigDict, path: Path | None = None):
    """The interactions of `config.data` as read, with their side feature files joined."""
    path = movielens_path(cfg) if path is None else path
    raw = sources.read_source(cfg.source, path, **_reader_kwargs(cfg))
    if cfg.source != "interactions":
        raw = sources.add_side_features(
            raw,
            **_side_files(cfg),
            item_col=cfg.item_col,
            user_col=cfg.user_col,
            delimiter=cfg.delimiter,
        )
    return raw


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def movielens_path(cfg: ml_collections.ConfigDict) -> Path:
    """`config.data.path`, or with `data.download` the MovieLens folder fetched into it.

    The download lands in `path/<download>` once; later runs find it there (and
    a `path` that already is a MovieLens folder is read as it is).
    """
    path = Path(cfg.path).expanduser()
    if cfg.source != "movielens" or not cfg.download:
        return path
    if any((path / f).is_file() for f in ("u.data", "ratings.dat", "ratings.csv")):
        return path
    return sources.download_movielens(cfg.download, path)  # no download if already there


def load(config: ml_collections.ConfigDict, workdir: str) -> Dataset:
    """Loads the data `config.data` describes (see configs/base.py)."""
    cfg = config.data
    preemption.stop_point("while preparing the data")
    if cfg.source == "synthetic":
        data = synthetic.generate(cfg.synthetic, config.seed)
        fp = builders.fingerprint(seed=config.seed, **cfg.synthetic.to_dict())
        info = {"name": data.name, "steps": {}, "fingerprint": fp}
        processed = None
        item_ids = np.arange(data.num_items + 1, dtype=np.int64)
        item_ids[0] = -1
        user_ids = np.arange(data.num_users + 1, dtype=np.int64)
        user_ids[0] = -1
    else:
        if not cfg.path:
            raise types.DataError(
                f"config.data.path is empty: data.source={cfg.source!r} needs the path of "
                "its file or folder (--config.data.path=...)."
            )
        path = movielens_path(cfg)
        processed, fp = _cached_or_built(cfg, path, workdir)
        data = processed.to_sequence_data()
        info = {"name": processed.name, "steps": processed.stats, "fingerprint": fp}
        item_ids = processed.item_id_to_original
        user_ids = processed.user_id_to_original
    info.update(users=data.num_users, items=data.num_items, interactions=data.num_interactions)
    faults.kill_point("data_prepare")
    preemption.stop_point("while preparing the data")
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
            cold_item_rule=cfg.cold_item_rule,
            cold_valid_fraction=cfg.cold_valid_fraction,
            seed=config.seed,
        )
        info["split_counts"] = dict(split.counts)
        eval_splits = ["test", "valid"]
        for name in ("cold_users", "cold_items"):
            if len(split.eval_examples(name)[1]):
                eval_splits.append(name)
            if name in split.cold_valid and split.cold_valid[name].any():
                eval_splits.append(f"{name}_valid")
    else:
        split, eval_splits = splits.leave_one_out(data), ["test", "valid"]
    item_features = None
    if any(config[m].use_features for m in ("teacher", "student")):
        ignore = {f.strip() for f in config.features.ignore.split(",") if f.strip()}
        item_features = features_lib.catalogue_features(
            _without(
                processed.item_features if processed is not None else data.item_features, ignore
            ),
            data.num_items,
            split.train,
            config.features,
            item_original_to_id=processed.item_original_to_id if processed is not None else None,
            user_features=_without(
                processed.user_features if processed is not None else data.user_features, ignore
            ),
            num_users=data.num_users,
            seed=config.seed,
            where=f"item features of {info['name']}",
        )
        info["item_features"] = item_features.describe()
        log.info("data: %s", info["item_features"])
        split = dataclasses.replace(split, item_features=item_features)
    return Dataset(split, info, tuple(eval_splits), item_ids, item_features, user_ids)


def _without(features: dict | None, names: set[str]) -> dict | None:
    """`features` without the named ones (`config.features.ignore`)."""
    if features is None or not names:
        return features
    return {k: v for k, v in features.items() if k not in names}
