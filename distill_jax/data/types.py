"""The data types every data module shares, and the one data error.

They sit here, below the readers, the cleaning and the splits, so that those
modules import them from one place and never from each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "ColdStartSplit",
    "DataError",
    "LeaveOneOut",
    "Processed",
    "RawInteractions",
    "SequenceData",
    "UserSequences",
]


class DataError(ValueError):
    """Bad input data; the message names the file, the line and what was expected."""


@dataclasses.dataclass
class RawInteractions:
    """Interactions as read, before any cleaning, in file order.

    Attributes:
      name: a short description (source and path) for reports and errors.
      user_ids: [N] original user ids (int64, or object array of str).
      item_ids: [N] original item ids (int64, or object array of str).
      timestamps: [N] int64/float64 times, or None when the source has only an
        order (S3-Rec files: the position in the line stands in).
      ratings: [N] float32 ratings, or None.
      item_features: feature name -> {original item id: value} (e.g. 'title' ->
        str, 'genres' -> tuple of str).
      user_features: feature name -> {original user id: value} (e.g. 'age',
        'gender', 'occupation').
      files: the files read.
    """

    name: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray | None
    ratings: np.ndarray | None
    item_features: dict[str, dict] = dataclasses.field(default_factory=dict)
    user_features: dict[str, dict] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.user_ids)


class UserSequences:
    """Counts shared by every type that holds one item sequence per user."""

    sequences: list[np.ndarray]

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


@dataclasses.dataclass(frozen=True)
class SequenceData(UserSequences):
    """Users' time-ordered item sequences with ids in 1..num_items (0 is padding).

    Attributes:
      num_items: catalogue size V.
      sequences: one int32 array per user, oldest first.
      name: a short description for reports.
      item_features: feature name -> {item id: value} (the synthetic data's
        tastes; a real source's are in `Processed`).
      user_features: feature name -> {user id: value}, user u owning
        `sequences[u - 1]` (the synthetic data's favourite tastes).
    """

    num_items: int
    sequences: list[np.ndarray]
    name: str = ""
    item_features: dict[str, dict[int, Any]] = dataclasses.field(default_factory=dict)
    user_features: dict[str, dict[int, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Processed(UserSequences):
    """Clean, remapped, time-ordered interactions.

    User ids are 1..U and `sequences[u - 1]` belongs to user u; item ids are
    1..V. Entry 0 of each `*_id_to_original` table is a placeholder that is
    never a real id: -1 for integer original ids, NaN for float ids, None
    otherwise (strings).

    Attributes:
      name: the raw data's name.
      num_items: catalogue size V.
      sequences: per user, an int32 array of item ids, oldest first.
      timestamps: per user, the times aligned with `sequences`, or None when
        the raw data had none.
      item_id_to_original: [V+1] new item id -> original item id.
      item_original_to_id: original item id -> new item id.
      user_id_to_original: [U+1] new user id -> original user id.
      user_original_to_id: original user id -> new user id.
      item_features: feature name -> {new item id: value}, for kept items.
      user_features: feature name -> {new user id: value}, for kept users.
      stats: step name (see `STEPS`) -> {'rows', 'users', 'items'} left after
        the step and {'removed_rows', 'removed_users', 'removed_items'} by it.
    """

    name: str
    num_items: int
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    item_id_to_original: np.ndarray
    item_original_to_id: dict[Any, int]
    user_id_to_original: np.ndarray
    user_original_to_id: dict[Any, int]
    item_features: dict[str, dict[int, Any]]
    user_features: dict[str, dict[int, Any]]
    stats: dict[str, dict[str, int]]

    def items_to_original(self, item_ids: np.ndarray) -> np.ndarray:
        """Original ids of new item ids (any shape), e.g. for reporting top-k lists."""
        return self.item_id_to_original[np.asarray(item_ids)]

    def to_sequence_data(self) -> SequenceData:
        """The sequences as `SequenceData`, ready for `leave_one_out`."""
        return SequenceData(num_items=self.num_items, sequences=self.sequences, name=self.name)


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
    """Leave-one-out split: last item = test, second-to-last = validation.

    Attributes:
      num_items: catalogue size V.
      train: each user's sequence without its last two items.
      valid_targets: each user's second-to-last item.
      test_targets: each user's last item.
      full: each user's whole sequence (test history is full[:-1]).
    """

    num_items: int
    train: list[np.ndarray]
    valid_targets: np.ndarray
    test_targets: np.ndarray
    full: list[np.ndarray]
    #: The encoded item features (`data.features.CatalogueFeatures`) where a
    #: model uses them; models built from this split read them.
    item_features: Any = None

    def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Histories (all items before the target) and targets of a split."""
        if split == "valid":
            return self.train, self.valid_targets
        if split == "test":
            return [s[:-1] for s in self.full], self.test_targets
        raise ValueError(f"Unknown split {split!r}; expected 'valid' or 'test'.")

    def user_ids(self, split: str = "train") -> np.ndarray | None:
        """User ids (1..U) of the rows of `train` or of a split's examples.

        None unless the data's user features are in use
        (`item_features.users`): only then do batches carry user ids.
        """
        if getattr(self.item_features, "users", None) is None:
            return None
        if split not in ("train", "valid", "test"):
            raise ValueError(f"Unknown split {split!r}; expected 'train', 'valid' or 'test'.")
        return np.arange(1, len(self.train) + 1, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class ColdStartSplit:
    """A leave-one-out split of the warm users plus cold-user and cold-item slices.

    Attributes:
      warm: leave-one-out over the warm users' sequences without cold items;
        `warm.train` is the whole training set.
      warm_users: [W] user ids (1..U) of the rows of `warm`.
      cold_users: [C] user ids of the cold-user examples.
      cold_user_histories: each cold user's sequence without its last item.
      cold_user_targets: [C] each cold user's last item.
      cold_items: sorted ids of the cold items (empty when off).
      cold_item_cutoff: the cut-off time, or None when cold items are off.
      cold_item_users: [K] user ids of the cold-item examples (warm users only).
      cold_item_histories: each such user's items before their first cold item.
      cold_item_targets: [K] each such user's first cold item.
      counts: users in each role, and users left out with the reason:
        'warm_users', 'cold_users', 'cold_item_users', 'warm_users_too_short'
        (< 3 items once cold items are removed), 'cold_users_too_short'
        (< 2 items), 'cold_item_no_history' (a cold item came first).
    """

    warm: LeaveOneOut
    warm_users: np.ndarray
    cold_users: np.ndarray
    cold_user_histories: list[np.ndarray]
    cold_user_targets: np.ndarray
    cold_items: np.ndarray
    cold_item_cutoff: float | None
    cold_item_users: np.ndarray
    cold_item_histories: list[np.ndarray]
    cold_item_targets: np.ndarray
    counts: dict[str, int]
    item_features: Any = None  #: As `LeaveOneOut.item_features`.
    #: 'cold_users' / 'cold_items' -> bool mask over that slice's examples: the
    #: rows held for validation ('<slice>_valid'); the others are the slice.
    cold_valid: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def _cold_rows(self, split: str) -> tuple[str, np.ndarray | None]:
        """(the cold slice a split name refers to, the rows of it it takes; None: all)."""
        base = split.removesuffix("_valid")
        mask = self.cold_valid.get(base)
        if split.endswith("_valid"):
            if mask is None:
                raise ValueError(f"no {split!r} slice: data.cold_valid_fraction is 0")
            return base, np.flatnonzero(mask)
        return base, None if mask is None else np.flatnonzero(~mask)

    @property
    def num_items(self) -> int:
        return self.warm.num_items

    @property
    def train(self) -> list[np.ndarray]:
        return self.warm.train

    def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Histories and targets of 'valid', 'test', 'cold_users' or 'cold_items'."""
        if split in ("valid", "test"):
            return self.warm.eval_examples(split)
        base, rows = self._cold_rows(split) if split.startswith("cold_") else (split, None)
        if base == "cold_users":
            hist, tgt = self.cold_user_histories, self.cold_user_targets
        elif base == "cold_items":
            hist, tgt = self.cold_item_histories, self.cold_item_targets
        else:
            raise ValueError(
                f"Unknown split {split!r}; expected 'valid', 'test', 'cold_users' or "
                "'cold_items' (or a cold slice's '_valid' part)."
            )
        if rows is None:
            return hist, tgt
        return [hist[r] for r in rows], tgt[rows]

    def user_ids(self, split: str = "train") -> np.ndarray | None:
        """User ids of the rows of `train` or of a split's examples (see `LeaveOneOut`)."""
        if getattr(self.item_features, "users", None) is None:
            return None
        ids = {
            "train": self.warm_users,
            "valid": self.warm_users,
            "test": self.warm_users,
            "cold_users": self.cold_users,
            "cold_items": self.cold_item_users,
        }
        base, rows = self._cold_rows(split) if split.startswith("cold_") else (split, None)
        if base not in ids:
            raise ValueError(f"Unknown split {split!r}; expected one of {sorted(ids)}.")
        out = np.asarray(ids[base], np.int32)
        return out if rows is None else out[rows]
