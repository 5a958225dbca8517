"""Item side features inside a model: the encoder, the fusion with the id embedding, id dropout.

An item's representation is its id embedding fused with an encoding of its
features (`ItemFeatureEncoder`: the mean of each attribute bag's embeddings,
plus projections of the numeric and dense columns). The same fused table is
the input embedding and the tied output layer, so an item with features but
no training interactions can be ranked: its id part is set to zero (it was
never trained) and its features alone place it.

Fusion (`FUSIONS`): 'sum' adds the two; 'concat' projects ``[id; features]``
back to D; 'gate' mixes them with a learned per-item weight
``g = sigmoid(w . [id; features])``, ``g * id + (1 - g) * features``.

Id dropout (DropoutNet, Volkovs et al. 2017): while training, each item's id
part is zero with probability ``id_dropout`` (one draw per item per step, the
same for the input and the output side), so the model learns to rank from
features alone where ids carry nothing; at evaluation only the items the
training data never showed (`ItemFeatures.known` False) lose their id part.

The feature arrays are constants of the model (`ItemFeatures`), not
parameters: they are part of the compiled function and of an exported
artefact, and no optimiser touches them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from distill_jax.models.layers import Dense, partitioned

FUSIONS = ("sum", "concat", "gate")

__all__ = ["FUSIONS", "ItemFeatureEncoder", "ItemFeatures", "fuse"]


@dataclasses.dataclass(frozen=True, eq=False)
class ItemFeatures:
    """The catalogue's feature arrays, one row per table row (row 0 and padding rows empty).

    Compared and hashed by identity (a flax module holding it stays hashable).

    Attributes:
      bags: per categorical feature, ``[R, K]`` int32 category ids 1..C (0 = none).
      bag_sizes: per categorical feature, C.
      names: the categorical features' names (for parameter names and logs).
      numeric: ``[R, n]`` float32 standardised numeric features.
      dense: ``[R, E]`` float32 standardised vector features.
      known: ``[R]`` bool, True for items the training data shows (their id
        embedding is trained); the others are scored by features alone.
    """

    bags: tuple[np.ndarray, ...]
    bag_sizes: tuple[int, ...]
    names: tuple[str, ...]
    numeric: np.ndarray
    dense: np.ndarray
    known: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.known.shape[0])

    @classmethod
    def from_encoded(cls, encoded: Any, known_items: np.ndarray, num_rows: int) -> ItemFeatures:
        """From `data.features.EncodedFeatures` (rows 0..V) and the item ids seen in training.

        Args:
          encoded: the encoded item features, ``encoded.num_rows == V + 1``.
          known_items: item ids (1..V) that occur in the training sequences.
          num_rows: the model's table rows (V+1, or more on a vocab-sharded mesh).
        """
        if encoded.num_rows > num_rows:
            raise ValueError(f"{encoded.num_rows} feature rows for a table of {num_rows} rows")

        def pad(a: np.ndarray) -> np.ndarray:
            out = np.zeros((num_rows,) + a.shape[1:], a.dtype)
            out[: a.shape[0]] = a
            return out

        known = np.zeros(num_rows, bool)
        known[np.asarray(known_items, np.int64)] = True
        known[0] = False
        names = tuple(encoded.bags)
        return cls(
            bags=tuple(pad(encoded.bags[n]) for n in names),
            bag_sizes=tuple(len(encoded.vocab[n]) for n in names),
            names=names,
            numeric=pad(encoded.numeric),
            dense=pad(encoded.dense),
            known=known,
        )

    def describe(self) -> str:
        parts = [f"{n} ({c} categories)" for n, c in zip(self.names, self.bag_sizes, strict=True)]
        if self.numeric.shape[1]:
            parts.append(f"{self.numeric.shape[1]} numeric")
        if self.dense.shape[1]:
            parts.append(f"{self.dense.shape[1]}-d dense")
        cold = int(self.known.shape[0] - 1 - self.known.sum())
        return ", ".join(parts) + f"; {cold} rows scored by features alone"


class ItemFeatureEncoder(nn.Module):
    """``[R, D]``: each row's features encoded in the model width.

    Each bag's categories have their own embedding table (``C+1`` rows, row 0
    never used); a row's bag is the mean of its categories' embeddings (zero
    for an empty bag). Numeric and dense columns go through a linear map each.
    The parts are summed. The same encoder serves the users' features
    (`SequenceRecommender.user_features`), one row per user.
    """

    features: ItemFeatures
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, rows: jax.Array | None = None) -> jax.Array:
        """Every row's encoding, or ``[n, D]`` for the row ids ``rows [n]`` only."""
        f = self.features

        def pick(a: np.ndarray) -> jax.Array:
            a = jnp.asarray(a)
            return a if rows is None else jnp.take(a, rows, axis=0, mode="clip")

        init = nn.initializers.normal(stddev=self.embed_dim**-0.5)
        n = f.num_rows if rows is None else rows.shape[0]
        out = jnp.zeros((n, self.embed_dim), self.dtype)
        for name, bag, size in zip(f.names, f.bags, f.bag_sizes, strict=True):
            table = self.param(
                f"{name}_embedding",
                partitioned(init, ("feature_vocab", "embed")),
                (size + 1, self.embed_dim),
                jnp.float32,
            )
            ids = pick(bag)
            present = (ids > 0).astype(self.dtype)
            picked = jnp.take(table.astype(self.dtype), ids, axis=0) * present[..., None]
            count = jnp.maximum(present.sum(-1, keepdims=True), 1.0)
            out = out + picked.sum(1) / count
        for name, columns in (("numeric", f.numeric), ("dense", f.dense)):
            if columns.shape[1]:
                out = out + Dense(
                    (self.embed_dim,), (None, "embed"), ("embed",), dtype=self.dtype, name=name
                )(pick(columns).astype(self.dtype))
        return out


def fuse(mode: str, ids: jax.Array, feats: jax.Array, module: nn.Module | None) -> jax.Array:
    """The fused ``[R, D]`` table of id rows and feature rows (`module`: the fusion layer)."""
    if mode == "sum":
        return ids + feats
    both = jnp.concatenate([ids, feats], axis=-1)
    if mode == "concat":
        return module(both)
    if mode == "gate":
        g = jax.nn.sigmoid(module(both))
        return g * ids + (1.0 - g) * feats
    raise ValueError(f"unknown fusion {mode!r}; expected one of {FUSIONS}")
