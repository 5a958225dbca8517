"""Splits of users' sequences (leave-one-out for now)."""

import dataclasses

import numpy as np

from distill_jax.data.synthetic import SequenceData


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

    def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Histories (all items before the target) and targets of a split."""
        if split == "valid":
            return self.train, self.valid_targets
        if split == "test":
            return [s[:-1] for s in self.full], self.test_targets
        raise ValueError(f"Unknown split {split!r}; expected 'valid' or 'test'.")


def leave_one_out(data: SequenceData) -> LeaveOneOut:
    """Splits every user's sequence; users need at least 3 items."""
    short = [u for u, s in enumerate(data.sequences) if len(s) < 3]
    if short:
        raise ValueError(
            f"{data.name}: {len(short)} users have fewer than 3 items (first: user index "
            f"{short[0]}); leave-one-out needs a training, a validation and a test item."
        )
    return LeaveOneOut(
        num_items=data.num_items,
        train=[s[:-2] for s in data.sequences],
        valid_targets=np.array([s[-2] for s in data.sequences], np.int32),
        test_targets=np.array([s[-1] for s in data.sequences], np.int32),
        full=list(data.sequences),
    )
