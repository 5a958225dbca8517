"""SASRec (Kang & McAuley, 2018): causal self-attention over the item history.

Each position predicts the next item from the items up to and including it.
This version uses pre-LayerNorm blocks, right-aligned learned positions and a
tied output layer with a bias; see ``base.py`` for why.
"""

from __future__ import annotations

from typing import ClassVar

from distill_jax.models.base import SequenceRecommender


class SASRec(SequenceRecommender):
    """Causal transformer recommender; fields as in :class:`SequenceRecommender`.

    Feed it windows of real items (no mask token); train on next-item targets.
    """

    is_causal: ClassVar[bool] = True
    uses_mask_token: ClassVar[bool] = False
