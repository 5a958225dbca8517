"""Cached soft labels: the teacher run once over every training slot, stored as ArrayRecord.

The `soft_labels` stage of the main job (`config.distill.method='cached'`)
builds the student's training windows (`pipeline.TrainBatches`, with the
teacher-only last-item slot where `config.distill.last_item_slot` is on),
runs the finished teacher over them once (eval mode, no dropout) and writes,
per window and per target slot in position order,

  ids    int32   [slots, K]  the teacher's K most probable items,
  log_p  float32 [slots, K]  their log-probabilities at config.distill.temperature,
  rest   float32 [slots]     the log of the probability of every other item,
  hidden float32 [slots, D]  the teacher's hidden state (only with
                             config.distill.hidden_weight > 0),

with the student's history exclusion applied to the teacher's softmax as the
online soft target applies it (`losses/cached.py` says what the student
learns from them). K is `config.distill.cache_k`.

Storage: a TFDS data set in ArrayRecord files, one record per window, under
`WORKDIR/soft_labels/` (`soft_labels/<name>/<version>/`). TFDS writes it into a
temporary directory renamed into place when complete, so a run killed during
the stage leaves no half data set: the re-run writes it again (a teacher
forward pass over the training windows, the cheapest stage of a run). The
fingerprint (teacher checkpoint, data, windows, K, T, exclusion, hidden)
decides whether a stored data set is current, as for the sequence data: a
changed teacher or setting rebuilds it, and a student stage refuses a data
set with another fingerprint.

Reading: `SoftLabels` fetches a batch's windows by random access and lays
them out in the batch's packed slot order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from distill_jax.data import builders
from distill_jax.data.pipeline import TrainBatches
from distill_jax.losses import cached as cached_loss
from distill_jax.progress import Progress
from distill_jax.train import preemption

log = logging.getLogger(__name__)
DATASET_VERSION = "1.1.0"
SPLIT = "windows"
NAME = "teacher"
# Windows per teacher forward pass of the stage.
CHUNK = 256


def directory(workdir: str) -> str:
    return os.path.join(workdir, "soft_labels")


def dataset_dir(root: str) -> epath.Path:
    return epath.Path(root) / SoftLabelBuilder.name / NAME / DATASET_VERSION


def hidden_dim(config: ml_collections.ConfigDict) -> int:
    """Width of the stored hidden states: the teacher's, with hidden matching on; else 0."""
    return int(config.teacher.embed_dim) if config.distill.hidden_weight > 0 else 0


def options(config: ml_collections.ConfigDict) -> dict:
    """What the stored labels depend on besides the teacher and the training sequences."""
    d = config.distill
    return {
        "k": int(d.cache_k),
        "temperature": float(d.temperature),
        "exclude_history": bool(config.student.exclude_history),
        "last_item_slot": bool(d.last_item_slot),
        "max_len": int(config.student.max_len),
        "hidden_dim": hidden_dim(config),
    }


def fingerprint(config: ml_collections.ConfigDict, train: list, teacher_dir: str) -> str:
    """16 hex digits over the teacher's result, the training sequences and `options`."""
    digest = hashlib.sha256(f"soft_labels:{DATASET_VERSION}".encode())
    with open(os.path.join(teacher_dir, "result.json"), "rb") as f:
        digest.update(f.read())
    digest.update(np.asarray([len(s) for s in train], np.int64).tobytes())
    for seq in train:
        digest.update(np.asarray(seq, np.int32).tobytes())
    digest.update(json.dumps(options(config), sort_keys=True).encode())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class SoftLabelConfig(tfds.core.BuilderConfig):
    records: Any = dataclasses.field(default=None, repr=False)  # () -> iterator of records
    k: int = 0
    hidden_dim: int = 0
    fingerprint: str = ""
    extra_metadata: dict = dataclasses.field(default_factory=dict, repr=False)


class SoftLabelBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One record per training window: the teacher's top-K per slot (module docstring)."""

    name = "soft_labels"
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {
        "1.0.0": "Per window: top-K ids, their log-probabilities, the rest.",
        "1.1.0": "The arrays stored as raw bytes.",
    }
    code_path = None  # as builders.SequenceBuilder: nothing is downloaded

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        k = cfg.k if cfg is not None else None
        # Raw bytes, not protobuf number lists (less to parse when the student
        # reads the data set in; `SoftLabels`).
        raw = tfds.features.Encoding.BYTES
        features = {
            "window": tfds.features.Scalar(np.int64),
            "ids": tfds.features.Tensor(shape=(None, k), dtype=np.int32, encoding=raw),
            "log_p": tfds.features.Tensor(shape=(None, k), dtype=np.float32, encoding=raw),
            "rest": tfds.features.Tensor(shape=(None,), dtype=np.float32, encoding=raw),
        }
        if cfg is not None and cfg.hidden_dim:
            features["hidden"] = tfds.features.Tensor(
                shape=(None, cfg.hidden_dim), dtype=np.float32, encoding=raw
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description="The teacher's top-K soft labels per training slot.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        self.info.metadata.update(dict(cfg.extra_metadata), fingerprint=cfg.fingerprint)
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        for record in self.builder_config.records():
            yield int(record["window"]), record


def _teacher_fn(teacher, k: int, temperature: float, exclude: bool, with_hidden: bool):
    """jit(params, batch) -> (ids, log_p, rest[, hidden]) at the batch's packed slots."""
    from distill_jax.losses import exclude_columns  # Late: the losses import this package.
    from distill_jax.train import steps

    def fn(params, batch):
        h = steps.hidden_at_targets(
            teacher,
            params,
            batch["inputs"],
            batch["target_index"],
            train=False,
            users=batch.get("users"),
        )
        z = teacher.apply({"params": params}, h, method=teacher.logits)
        z = z[:, : teacher.num_items + 1]  # a sharded table's padding rows are no items
        if exclude:
            z = exclude_columns(z, steps.history_columns(batch))
        out = cached_loss.top_k_soft_labels(z, k, temperature)
        return (*out, h.astype(jnp.float32)) if with_hidden else out

    return jax.jit(fn)


def write(
    config: ml_collections.ConfigDict,
    batches: TrainBatches,
    teacher,
    teacher_params,
    fp: str,
    root: str,
    mesh,
) -> dict:
    """Builds the soft-label data set under `root` unless a current one is there.

    Returns:
      The stage's summary: fingerprint, windows, slots, K, bytes, seconds.
    """
    k = int(config.distill.cache_k)
    num_items = teacher.num_items
    if k > num_items:
        raise ValueError(
            f"config.distill.cache_k={k} is invalid: expected at most the catalogue's "
            f"{num_items} items."
        )
    width = hidden_dim(config)
    opts = options(config)
    path = dataset_dir(root)
    meta = builders.read_metadata(path)
    if meta is not None and meta.get("fingerprint") == fp:
        log.info("[soft_labels] reusing %s (fingerprint %s)", path, fp)
        return dict(meta["summary"])
    if path.exists():
        log.info(
            "[soft_labels] removing %s: fingerprint %s != %s",
            path,
            meta and meta.get("fingerprint"),
            fp,
        )
        path.rmtree()
    counts = batches.slot_counts()
    fn = _teacher_fn(
        teacher, k, float(config.distill.temperature), opts["exclude_history"], bool(width)
    )
    t0 = time.time()
    chunk = min(CHUNK, batches.batch_size)
    bar = Progress("[soft_labels]", batches.num_windows, logger=log)

    def records():
        for start in range(0, batches.num_windows, chunk):
            # Stopping here raises through TFDS, which removes its temporary directory.
            preemption.stop_point("during stage soft_labels")
            rows = np.arange(start, min(start + chunk, batches.num_windows))
            batch = batches.window_batch(rows)
            with jax.set_mesh(mesh):
                outs = jax.device_get(fn(teacher_params, batch))
            offset = 0
            for r in rows:
                n = int(counts[r])
                rec = {
                    "window": int(r),
                    "ids": outs[0][offset : offset + n],
                    "log_p": outs[1][offset : offset + n],
                    "rest": outs[2][offset : offset + n],
                }
                if width:
                    rec["hidden"] = outs[3][offset : offset + n]
                offset += n
                yield rec
            if offset != int(batch["kd_where" if "kd_where" in batch else "where"].sum()):
                raise RuntimeError("soft_labels: the slots of a batch and its windows disagree.")
            bar.update(len(rows))

    summary = {
        "fingerprint": fp,
        "windows": int(batches.num_windows),
        "slots": int(counts.sum()),
        "k": k,
        "hidden_dim": width,
        "options": opts,
    }
    cfg = SoftLabelConfig(
        name=NAME,
        description=f"fingerprint {fp}",
        records=records,
        k=k,
        hidden_dim=width,
        fingerprint=fp,
        extra_metadata={"summary": summary},
    )
    builder = SoftLabelBuilder(config=cfg, data_dir=root, file_format="array_record")
    # The summary's timing and size are known only once written: they go in
    # a file beside the data set (the data set's metadata is its fingerprint).
    builder.download_and_prepare(download_dir=os.path.join(root, "downloads"))
    bar.close()
    summary["seconds"] = time.time() - t0
    summary["bytes"] = int(sum(f.stat().length for f in dataset_dir(root).glob("*array_record*")))
    log.info(
        "[soft_labels] %d slots of %d windows, K=%d: %.1f MB in %.1fs",
        summary["slots"],
        summary["windows"],
        k,
        summary["bytes"] / 1e6,
        summary["seconds"],
    )
    return summary


def is_current(root: str, fp: str) -> bool:
    """Whether `root` holds a finished soft-label data set with fingerprint `fp`."""
    meta = builders.read_metadata(dataset_dir(root))
    return meta is not None and meta.get("fingerprint") == fp


# A data set up to this size is read into memory when the student starts (a
# batch is then a few array copies: ~0.3 ms on Beauty); a larger one is read
# record by record, ~0.1 ms a window on the input thread.
IN_MEMORY_BYTES = 4 << 30


class SoftLabels:
    """Random access to a stored soft-label data set, in a batch's packed slot order.

    Args:
      root: the stage's directory (`WORKDIR/soft_labels`).
      fingerprint: the fingerprint the student expects; another is refused.
      in_memory_bytes: read the arrays into memory at once when they take at
        most this many bytes (else record by record, per batch).
    """

    def __init__(self, root: str, fingerprint: str, in_memory_bytes: int = IN_MEMORY_BYTES):
        path = dataset_dir(root)
        meta = builders.read_metadata(path)
        if meta is None:
            raise FileNotFoundError(
                f"No finished soft-label data set at {path}: add 'soft_labels' to config.stages "
                "before the distillation stage."
            )
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(
                f"The soft labels at {path} have fingerprint {meta.get('fingerprint')!r}, the "
                f"student expects {fingerprint!r} (another teacher, data or setting): run the "
                "soft_labels stage again."
            )
        self._path = path
        self._source = tfds.builder_from_directory(os.fspath(path)).as_data_source(split=SPLIT)
        summary = meta["summary"]
        self.k = int(summary["k"])
        self.hidden_dim = int(summary["hidden_dim"])
        self._fields = [("cache_ids", "ids"), ("cache_log_p", "log_p"), ("cache_rest", "rest")]
        if self.hidden_dim:
            self._fields.append(("cache_hidden", "hidden"))
        slot_bytes = 8 * self.k + 4 + 4 * self.hidden_dim
        self._arrays = None
        if int(summary["slots"]) * slot_bytes <= in_memory_bytes:
            self._load()

    def _load(self, chunk: int = 2048) -> None:
        """Every record into one array per field; `self._starts[w]`: window w's first slot."""
        n = len(self._source)
        lengths = np.zeros(n, np.int64)
        parts = {name: [] for _, name in self._fields}
        for lo in range(0, n, chunk):
            for w, rec in enumerate(self._source.__getitems__(range(lo, min(lo + chunk, n))), lo):
                if int(rec["window"]) != w:
                    raise ValueError(
                        f"{self._path}: record {w} holds window {int(rec['window'])}; the "
                        "data set is damaged: run the soft_labels stage again."
                    )
                lengths[w] = len(rec["rest"])
                for _, name in self._fields:
                    parts[name].append(rec[name])
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._arrays = {name: np.concatenate(parts[name]) for _, name in self._fields}

    def _mismatch(self, r: int, count: int, window: int, expected: int) -> ValueError:
        return ValueError(
            f"soft labels of window {r}: {count} slots stored (record {window}), "
            f"{expected} in the data: the stored labels do not match these windows; "
            "run soft_labels again."
        )

    def packed(
        self, rows: np.ndarray, counts: np.ndarray, num_shards: int, rows_per_shard: int, n: int
    ) -> dict[str, np.ndarray]:
        """The stored outputs of windows `rows`, laid out as `pack_positions` packs their slots.

        `counts` are the windows' slot counts (`TrainBatches.slot_counts`),
        checked against the stored ones. Shard s holds batch rows
        `[s * rows_per_shard, (s + 1) * rows_per_shard)` and its slots fill
        block s of the `n` packed slots, window by window.
        Filler slots get finite values (they are masked out of the loss).
        """
        rows = np.asarray(rows, np.int64)
        per_shard = n // num_shards
        out = {
            "cache_ids": np.zeros((n, self.k), np.int32),
            "cache_log_p": np.full((n, self.k), -np.inf, np.float32),
            "cache_rest": np.zeros((n,), np.float32),
        }
        if self.hidden_dim:
            out["cache_hidden"] = np.zeros((n, self.hidden_dim), np.float32)
        if self._arrays is None:
            records = self._source.__getitems__([int(r) for r in rows])
            for rec, r in zip(records, rows, strict=True):
                if int(rec["window"]) != r or len(rec["rest"]) != counts[r]:
                    raise self._mismatch(int(r), len(rec["rest"]), int(rec["window"]), counts[r])
            get = lambda name, block: np.concatenate([records[b][name] for b in block])  # noqa: E731
        else:
            begins, ends = self._starts[rows], self._starts[rows + 1]
            bad = np.flatnonzero(ends - begins != counts[rows])
            if bad.size:
                r = int(rows[bad[0]])
                raise self._mismatch(r, int(ends[bad[0]] - begins[bad[0]]), r, counts[r])

            def get(name, block):
                lo, hi = begins[block.start : block.stop], ends[block.start : block.stop]
                lengths = hi - lo
                # Slot i of the block: its window's first stored slot + its place in it.
                offsets = np.cumsum(lengths) - lengths
                index = np.arange(lengths.sum()) + np.repeat(lo - offsets, lengths)
                return self._arrays[name][index]

        for s in range(num_shards):
            block = range(s * rows_per_shard, min((s + 1) * rows_per_shard, len(rows)))
            if not block:
                continue
            at = s * per_shard
            for key, name in self._fields:
                part = get(name, block)
                out[key][at : at + len(part)] = part
        return out
