"""BERT4Rec (Sun et al., 2019): bidirectional self-attention with a cloze task.

Positions are masked by replacing their id with the mask token V+1, and the
model predicts the original item there from both sides. At inference the
pipeline appends a mask token as the newest position and reads its output.
Shares the encoder of ``base.py``; only the mask and the mask token differ.
"""

from __future__ import annotations

from typing import ClassVar

from distill_jax.models.base import SequenceRecommender


class BERT4Rec(SequenceRecommender):
    """Bidirectional transformer recommender; fields as in :class:`SequenceRecommender`.

    Accepts the mask token (id ``num_items + 1``) in its input; it has its own
    ``[D]`` embedding and never appears among the logits' columns.
    """

    is_causal: ClassVar[bool] = False
    uses_mask_token: ClassVar[bool] = True
