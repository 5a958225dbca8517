"""Fixed-shape batches for training and evaluation.

Training batches are a pure function of (seed, step): the iterator's whole
state is the step number, which the checkpoint stores, so a resumed run sees
exactly the batches an uninterrupted one would.

Only positions that hold a target get catalogue logits, and they are packed:
a batch carries `inputs [B, S]` and, for the N target slots, `target_index
[N]` (flat indices into the `B x S` window positions), `targets [N]` and
`where [N]` (False on the few slots that only fill the bucket). Packing per
data shard keeps every shard's slots next to its own rows; N is rounded up to
a bucket (`_pack_bucket`: two sizes per octave, four from `FINE_PACK` slots)
and S to a power of two, so the step compiles for a handful of shapes only;
histories for evaluation likewise (at least `MIN_HISTORY`). The catalogue
product is `[N, D] x [D, V]`: a 2-D matrix product with no padded rows beyond
the bucket.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_POSITIONS = 8
# Packed batches of at least this many slots get four bucket sizes per octave.
FINE_PACK = 512
MIN_HISTORY = 32
# Kinds of causal training window (TrainBatches): labelled next-item slots
# only; those plus a teacher-only slot at the last item; that slot alone.
_LABELS, _LABELS_AND_LAST, _LAST_ONLY = 0, 1, 2


def _bucket(n: int, minimum: int, cap: int | None = None) -> int:
    """The smallest power-of-two multiple of `minimum` that holds n, capped."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, cap) if cap is not None else size


def _pack_bucket(n: int, minimum: int) -> int:
    """The smallest of minimum * {1, 1.5, 2, 3, 4, 6, ...} that holds n.

    Two sizes per octave below `FINE_PACK` slots: at most a third of the slots
    is padding, and the number of distinct shapes (compilations) stays small.
    From `FINE_PACK` on, four ({1, 1.25, 1.5, 1.75} times a power of two): at
    most a fifth is padding where the `[N, V]` loss costs most and a long run
    amortises one more compilation (Beauty's distilled student packs ~1,740
    slots a step: 2,048 before, 1,792 now).
    """
    size = minimum
    while True:
        if size >= n:
            return size
        quarters = (5, 6, 7) if size >= FINE_PACK else (6,)
        for q in quarters:
            if (size * q) % 4 == 0 and size * q // 4 >= n:
                return size * q // 4
        size *= 2


def pack_positions(
    target_pos: np.ndarray,
    targets: np.ndarray,
    where: np.ndarray,
    width: int,
    num_shards: int = 1,
    size: int | None = None,
    soft: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Packs the valid `[B, K]` target slots into flat `[N]` arrays.

    Args:
      target_pos: `[B, K]` window positions (columns of a `[B, width]` input).
      targets: `[B, K]` item ids.
      where: `[B, K]` True where a target sits.
      width: the input width S; `target_index = row * S + position`.
      num_shards: rows are split into this many contiguous blocks (the data
        shards); each block's targets fill its own contiguous block of N.
      size: slots per shard; None rounds the most targets of any shard up to
        a bucket (`_pack_bucket`).
      soft: optional `[B, K]`, True at slots with no label that only the
        teacher supervises (disjoint from `where`); they are packed too.

    Returns:
      `target_index [N]`, `targets [N]`, `where [N]` (slots with a label) with
      N a multiple of `num_shards`; with `soft`, also `kd_where [N]` (slots
      with a label or a teacher-only slot; teacher-only slots have target 0).
    """
    B = where.shape[0]
    if B % num_shards:
        raise ValueError(f"batch of {B} rows does not split into {num_shards} shards.")
    if soft is not None and np.any(soft & where):
        raise ValueError("pack_positions: a slot is both labelled (where) and teacher-only (soft).")
    slots = where if soft is None else where | soft
    rows_per = B // num_shards
    blocks = []
    for s in range(num_shards):
        r, c = np.nonzero(slots[s * rows_per : (s + 1) * rows_per])
        r = r + s * rows_per
        blocks.append(
            (r * width + target_pos[r, c], targets[r, c], where[r, c], s * rows_per * width)
        )
    most = max(len(b[0]) for b in blocks)
    n = _pack_bucket(most, MIN_POSITIONS) if size is None else size
    if n < most:
        raise ValueError(f"pack_positions: size={size} slots cannot hold a shard's {most} targets.")
    index = np.zeros((num_shards, n), np.int32)
    tgt = np.zeros((num_shards, n), np.int32)
    labelled = np.zeros((num_shards, n), bool)
    packed = np.zeros((num_shards, n), bool)
    for s, (idx, t, w, first) in enumerate(blocks):
        index[s] = first  # filler slots point at the shard's own first position
        index[s, : len(idx)] = idx
        tgt[s, : len(t)] = np.where(w, t, 0)
        labelled[s, : len(idx)] = w
        packed[s, : len(idx)] = True
    out = {
        "target_index": index.reshape(-1),
        "targets": tgt.reshape(-1),
        "where": labelled.reshape(-1),
    }
    if soft is not None:
        out["kd_where"] = packed.reshape(-1)
    return out


def _windows(seq: np.ndarray, length: int, overlap: int) -> list[np.ndarray]:
    """Splits `seq` into windows of at most `length` items, newest first.

    Consecutive windows share `overlap` items so that every item of a causal
    sequence serves once as a target.
    """
    out, end = [], len(seq)
    while end > overlap:
        out.append(seq[max(0, end - length) : end])
        end -= length - overlap
    return out


@dataclasses.dataclass
class TrainBatches:
    """Training batches for one model, indexed by step.

    Args:
      sequences: each user's training items, oldest first.
      num_items: catalogue size V (the mask token is V + 1).
      max_len: the model's window L.
      batch_size: the global batch size B.
      causal: True for next-item models (SASRec), False for masked-item
        models (BERT4Rec).
      mask_prob: masked-item models: share of the window's items masked.
      mask_last_prob: masked-item models: share of windows that mask their
        LAST item alone instead (the task the model is evaluated on: predict
        the item after the whole history); 0 masks every window at random.
      seed: fixes the epoch order and the masks.
      length_buckets: group windows of similar length into a batch.
      fixed_shapes: every batch has the same shapes (full `[B, L]` inputs and
        `B * L / num_shards` target slots per shard), so the train step
        compiles once. For short runs, where each extra batch shape costs a
        compilation (seconds on a CPU) that the padding never costs back.
      num_shards: pack target slots per block of `batch_size / num_shards`
        rows (the mesh's data axis), so each data shard's slots are its own.
      last_item_slot: causal models, distillation only: every user also gets
        a teacher-only slot at the position of its LAST training item, whose
        next item is held out (no label: only the teacher's distribution
        supervises it). A user whose whole sequence fits in one window (at
        most `max_len` items) gets it in that window, whose input then holds
        every item; a longer one gets one more window of its newest
        `max_len` items with that slot alone. Batches then carry `kd_where`.
      users: one user id per sequence, for models that read user features;
        batches then carry `users [B]` (0 on padding rows). None: no ids.
    """

    sequences: Sequence[np.ndarray]
    num_items: int
    max_len: int
    batch_size: int
    causal: bool
    mask_prob: float
    seed: int
    length_buckets: bool = True
    num_shards: int = 1
    fixed_shapes: bool = False
    last_item_slot: bool = False
    mask_last_prob: float = 0.0
    # The 'cached' method: stored teacher outputs per window
    # (distill_jax/data/soft_labels.py, `SoftLabels`); batches then carry
    # them for every packed slot (`cache_ids`, `cache_log_p`, `cache_rest`,
    # and `cache_hidden` when stored).
    soft_labels: Any = None
    users: Sequence[int] | None = None

    def __post_init__(self):
        if self.num_shards < 1 or self.batch_size % self.num_shards:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of num_shards="
                f"{self.num_shards} (the mesh's data axis)."
            )
        if self.last_item_slot and not self.causal:
            raise ValueError(
                "last_item_slot=True needs a causal (next-item) model: a masked-item "
                "model has no position after the last item."
            )
        # Window kinds: _LABELS (input = w[:-1], targets w[1:]), _LABELS_AND_LAST
        # (input = w, targets w[1:] and a teacher-only slot at w[-1]) and
        # _LAST_ONLY (input = w, the teacher-only slot alone).
        if self.users is not None and len(self.users) != len(self.sequences):
            raise ValueError(
                f"{len(self.users)} user ids for {len(self.sequences)} training sequences."
            )
        windows, kinds, owners = [], [], []
        for u, s in enumerate(self.sequences):
            if self.causal:
                ws = _windows(s, self.max_len + 1, 1)
            else:
                ws = _windows(s, self.max_len, 0)
            k = [_LABELS] * len(ws)
            if self.last_item_slot and len(s):
                if ws and len(s) <= self.max_len:
                    k[0] = _LABELS_AND_LAST  # ws[0] is the newest window: all of s
                else:
                    ws, k = ws + [s[-self.max_len :]], k + [_LAST_ONLY]
            windows += ws
            kinds += k
            owners += [u] * len(ws)
        if not windows:
            raise ValueError("No training windows: every training sequence is too short.")
        self._windows = windows
        self._kinds = np.array(kinds, np.int8)
        self._window_users = (
            None if self.users is None else np.asarray(self.users, np.int32)[np.array(owners)]
        )
        self._lengths = np.array([len(w) for w in windows])
        # Input items per window.
        self._input_lengths = self._lengths - ((self._kinds == _LABELS) & self.causal)
        self.steps_per_epoch = -(-len(windows) // self.batch_size)
        self._slot_counts = self.slot_counts() if self.soft_labels is not None else None
        self._plan_epoch, self._plan = -1, None

    @property
    def num_windows(self) -> int:
        return len(self._windows)

    def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._plan_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self._windows))
            if self.length_buckets:
                # Sort by length inside large shuffled chunks: batches hold
                # similar lengths, yet the epoch order stays random.
                chunk = self.batch_size * 16
                order = np.concatenate(
                    [
                        c[np.argsort(self._lengths[c], kind="stable")]
                        for c in np.array_split(order, max(1, len(order) // chunk))
                    ]
                )
            batches = [
                order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)
            ]
            self._plan = [batches[i] for i in rng.permutation(len(batches))]
            self._plan_epoch = epoch
        return self._plan

    def _width(self, n: int) -> int:
        """Columns for n positions: a power-of-two bucket, or L with fixed shapes."""
        return self.max_len if self.fixed_shapes else _bucket(n, MIN_POSITIONS, self.max_len)

    def slot_counts(self) -> np.ndarray:
        """`[num_windows]` target slots of each causal window (labelled and teacher-only).

        A window's slots appear in a batch in position order, and a batch's
        slots window by window in row order (`pack_positions`): what the
        soft_labels stage stores per window and `soft_labels` gives back.
        """
        if not self.causal:
            raise ValueError("slot_counts: masked-item windows draw new slots every epoch.")
        # _LABELS: len - 1 labelled; _LABELS_AND_LAST: those and the last; _LAST_ONLY: 1.
        labelled = np.where(self._kinds == _LAST_ONLY, 0, self._lengths - 1)
        return labelled + (self._kinds != _LABELS)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The global batch of training step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = self._epoch_plan(epoch)[index]
        return self.window_batch(rows, rng_key=(epoch, index))

    def window_batch(self, rows: np.ndarray, rng_key=(0, 0)) -> dict[str, np.ndarray]:
        """The batch of windows `rows` (at most batch_size; fewer rows are padding).

        `rng_key` seeds the masks of masked-item models (the step's (epoch,
        index) in `batch`).
        """
        rows = np.asarray(rows)
        B, L = self.batch_size, self.max_len
        if not 0 < len(rows) <= B:
            raise ValueError(f"window_batch: {len(rows)} windows for a batch of {B}.")
        inputs = np.zeros((B, L), np.int32)
        soft = None
        if self.causal:
            k = self._width(int(self._input_lengths[rows].max()))
            targets = np.zeros((B, k), np.int32)
            where = np.zeros((B, k), bool)
            soft = np.zeros((B, k), bool) if self.last_item_slot else None
            for b, r in enumerate(rows):
                w, kind = self._windows[r], self._kinds[r]
                m = len(w) - 1  # labelled slots
                if kind == _LABELS:
                    inputs[b, L - m :] = w[:-1]
                    targets[b, k - m :] = w[1:]
                    where[b, k - m :] = True
                    continue
                inputs[b, L - len(w) :] = w
                soft[b, k - 1] = True
                if kind == _LABELS_AND_LAST and m:
                    targets[b, k - 1 - m : k - 1] = w[1:]
                    where[b, k - 1 - m : k - 1] = True
            target_pos = np.broadcast_to(np.arange(L - k, L, dtype=np.int32), (B, k)).copy()
        else:
            rng = np.random.default_rng([self.seed, *rng_key, 1])
            masked = []
            for b, r in enumerate(rows):
                w = self._windows[r]
                inputs[b, L - len(w) :] = w
                if self.mask_last_prob > 0 and rng.random() < self.mask_last_prob:
                    masked.append(np.array([L - 1]))
                    continue
                pick = np.flatnonzero(rng.random(len(w)) < self.mask_prob)
                if pick.size == 0:
                    pick = np.array([rng.integers(len(w))])
                masked.append(L - len(w) + pick)
            k = self._width(max(len(m) for m in masked))
            targets = np.zeros((B, k), np.int32)
            where = np.zeros((B, k), bool)
            target_pos = np.zeros((B, k), np.int32)
            for b, pos in enumerate(masked):
                targets[b, : len(pos)] = inputs[b, pos]
                where[b, : len(pos)] = True
                target_pos[b, : len(pos)] = pos
                inputs[b, pos] = self.num_items + 1
        # Drop the all-padding columns on the left: positions count from the
        # right end and padding is masked, so outputs are unchanged, and a batch
        # of short sequences no longer pays the transformer for L columns.
        span = self._width(int(self._input_lengths[rows].max()))
        inputs = inputs[:, L - span :]
        # (Masked rows pad target_pos with 0; keep those at 0, not negative.)
        target_pos = np.maximum(target_pos - (L - span), 0).astype(np.int32)
        size = B // self.num_shards * L if self.fixed_shapes else None
        packed = pack_positions(target_pos, targets, where, span, self.num_shards, size, soft)
        if self.soft_labels is not None:
            packed.update(
                self.soft_labels.packed(
                    rows,
                    self._slot_counts,
                    self.num_shards,
                    B // self.num_shards,
                    len(packed["where"]),
                )
            )
        if self._window_users is not None:
            users = np.zeros(B, np.int32)
            users[: len(rows)] = self._window_users[rows]
            packed["users"] = users
        return {"inputs": inputs, **packed}


def eval_batches(
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    num_items: int,
    max_len: int,
    batch_size: int,
    causal: bool,
    users: np.ndarray | None = None,
    trim: bool = True,
    user_ids: np.ndarray | None = None,
):
    """Yields fixed-size evaluation batches, users grouped by history length.

    Each batch has `inputs [B, S]` (the newest items of the history; masked-item
    models get the mask token in the last slot, where they predict; S is the
    batch's longest input rounded up to a power of two, at most L, or L itself
    when `trim` is False),
    `history [B, H]` (the WHOLE history, for excluding seen items), `targets
    [B]` and `where [B]` (False on rows that only fill the last batch).
    `users` picks the examples (indices into `histories`; None: all);
    `user_ids` (one per example) adds `users [B]`, each row's user id (0 on
    filler rows), for models that read user features.
    """
    users = np.arange(len(targets)) if users is None else np.asarray(users)
    order = users[np.argsort([len(histories[u]) for u in users], kind="stable")]
    L = max_len
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        h = _bucket(max(len(histories[u]) for u in rows), MIN_HISTORY)
        inputs = np.zeros((batch_size, L), np.int32)
        history = np.zeros((batch_size, h), np.int32)
        tgt = np.ones((batch_size,), np.int32)
        where = np.zeros((batch_size,), bool)
        ids = np.zeros((batch_size,), np.int32)
        longest = 1
        for b, u in enumerate(rows):
            hist = histories[u]
            if causal:
                recent = hist[-L:]
            else:
                recent = np.append(hist[-(L - 1) :] if L > 1 else hist[:0], num_items + 1)
            inputs[b, L - len(recent) :] = recent
            longest = max(longest, len(recent))
            history[b, : len(hist)] = hist
            tgt[b] = targets[u]
            where[b] = True
            if user_ids is not None:
                ids[b] = user_ids[u]
        if trim:
            inputs = inputs[:, L - _bucket(longest, MIN_POSITIONS, L) :]
        batch = {"inputs": inputs, "history": history, "targets": tgt, "where": where}
        if user_ids is not None:
            batch["users"] = ids
        yield batch
