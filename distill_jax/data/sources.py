"""Readers of raw interaction data into one in-memory form, `RawInteractions`.

Every reader stops on bad input with a `DataError` naming the file, the line
and what was expected.
"""

import dataclasses

import numpy as np


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
