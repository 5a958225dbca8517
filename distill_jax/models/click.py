"""Click models: feature rows to a click logit, DCN-v2 and MLP (and logistic) in one class.

A click row has ``F`` categorical fields (user, item, their side features,
the context: each an id, 0 = out of vocabulary or missing) and ``n`` numeric
columns (standardised). Every field's ids index one shared embedding table
at the field's offset (``table_offsets``), so the big tables of a catalogue
shard along ``vocab`` like the item tables of the sequence models.

``x0 = [e_1; ...; e_F; h; numeric]`` (width ``F * D + n``, plus ``D`` with a
history), then

* ``num_cross`` cross layers of DCN-v2 (Wang et al., WWW 2021):
  ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``, with ``W_l`` full-rank, or
  ``U_l (V_l x_l)`` of rank ``cross_rank`` when that is set;
* an MLP of widths ``mlp_dims`` (ReLU, dropout) on the cross output
  (the stacked form of the paper);
* a linear map to one logit.

``h`` is the user's behaviour before the row (``history_field`` set): the
mean of the embeddings of the last items they clicked, read from the rows of
the item field, so the cross layers can compare the candidate item with what
the user clicked before (a product a logistic model cannot form).

So ``num_cross=0`` is an MLP over the embeddings, and ``num_cross=0`` with
no ``mlp_dims`` is a logistic model over them (the classic baseline): the
teacher and the student are this class at two sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from distill_jax.models.layers import Dense, Dropout, embedding_lookup, partitioned

__all__ = ["ClickModel", "table_offsets"]


def table_offsets(vocab_sizes: Sequence[int]) -> np.ndarray:
    """Row offset of each field in the shared table: field f owns ``vocab_f + 1`` rows.

    Row ``offset_f + 0`` is field f's out-of-vocabulary row.
    """
    sizes = np.asarray(vocab_sizes, np.int64) + 1
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)


class ClickModel(nn.Module):
    """``(categorical [B, F] int32, numeric [B, n] float32[, history [B, K]]) -> logits [B]``.

    Attributes:
      vocab_sizes: per categorical field, its number of known values (ids
        1..vocab; 0 is the field's out-of-vocabulary bucket).
      num_numeric: n, the numeric columns.
      embed_dim: D, the width of every field's embedding.
      num_cross: DCN-v2 cross layers (0: none).
      cross_rank: 0: full-rank cross weights; r > 0: ``U V`` of rank r.
      mlp_dims: the MLP's hidden widths after the cross layers.
      dropout_rate: dropout after each MLP layer in training.
      dtype: compute dtype; parameters stay float32, the logit is float32.
      history_field: the field whose ids the history holds (the item field),
        or -1: no history input. History ids are that field's ids, 0 = none.
      table_rows: rows of the shared table; 0: exactly the fields' rows, more
        pads it to a multiple of the mesh's vocab shards (the extra rows are
        never looked up).
    """

    vocab_sizes: tuple[int, ...]
    num_numeric: int
    embed_dim: int
    num_cross: int = 0
    cross_rank: int = 0
    mlp_dims: tuple[int, ...] = ()
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    history_field: int = -1
    table_rows: int = 0

    @property
    def input_width(self) -> int:
        fields = len(self.vocab_sizes) + (self.history_field >= 0)
        return fields * self.embed_dim + self.num_numeric

    @nn.compact
    def __call__(
        self,
        categorical: jax.Array,
        numeric: jax.Array,
        history: jax.Array | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        num_fields = len(self.vocab_sizes)
        if self.history_field >= num_fields:
            raise ValueError(
                f"history_field={self.history_field}; the model has {num_fields} fields"
            )
        if self.history_field >= 0 and history is None:
            raise ValueError("this click model reads a history input; none was given")
        if categorical.shape[-1] != num_fields or numeric.shape[-1] != self.num_numeric:
            raise ValueError(
                f"click rows have {categorical.shape[-1]} categorical and {numeric.shape[-1]} "
                f"numeric columns; the model was built for {num_fields} and {self.num_numeric}"
            )
        offsets = table_offsets(self.vocab_sizes)
        rows = int(offsets[-1] + self.vocab_sizes[-1] + 1) if num_fields else 0
        if self.table_rows:
            if self.table_rows < rows:
                raise ValueError(f"table_rows={self.table_rows} is below the fields' {rows} rows")
            rows = self.table_rows
        parts = []
        if num_fields:
            table = self.param(
                "embedding",
                partitioned(
                    nn.initializers.normal(stddev=self.embed_dim**-0.5), ("vocab", "embed")
                ),
                (rows, self.embed_dim),
                jnp.float32,
            )
            # An id outside 1..vocab is the field's out-of-vocabulary row.
            sizes = jnp.asarray(self.vocab_sizes, jnp.int32)
            ids = jnp.where((categorical >= 0) & (categorical <= sizes), categorical, 0)
            emb = embedding_lookup(table, ids + jnp.asarray(offsets))
            parts.append(emb.reshape(emb.shape[:-2] + (num_fields * self.embed_dim,)))
            if self.history_field >= 0:
                parts.append(self._pooled(table, history, int(offsets[self.history_field])))
        if self.num_numeric:
            parts.append(numeric.astype(jnp.float32))
        x0 = jnp.concatenate(parts, axis=-1).astype(self.dtype)
        width = self.input_width
        x = x0
        for layer in range(self.num_cross):
            if self.cross_rank:
                v = Dense(
                    (self.cross_rank,),
                    (None, None),
                    (None,),
                    dtype=self.dtype,
                    use_bias=False,
                    name=f"cross_{layer}_v",
                )(x)
                w_x = Dense(
                    (width,), (None, None), (None,), dtype=self.dtype, name=f"cross_{layer}_u"
                )(v)
            else:
                w_x = Dense(
                    (width,), (None, None), (None,), dtype=self.dtype, name=f"cross_{layer}"
                )(x)
            x = x0 * w_x + x
        for layer, dim in enumerate(self.mlp_dims):
            x = nn.relu(
                Dense((dim,), (None, "mlp"), ("mlp",), dtype=self.dtype, name=f"mlp_{layer}")(x)
            )
            x = Dropout(self.dropout_rate)(x, deterministic=not train)
        hidden_axis = "mlp" if self.mlp_dims else None
        logit = Dense((1,), (hidden_axis, None), (None,), dtype=self.dtype, name="logit")(x)
        return logit[..., 0].astype(jnp.float32)

    def _pooled(self, table: jax.Array, history: jax.Array, offset: int) -> jax.Array:
        """``[B, D]``: the mean embedding of each row's history ids (zeros for none)."""
        size = self.vocab_sizes[self.history_field]
        valid = (history > 0) & (history <= size)
        rows = embedding_lookup(table, jnp.where(valid, history, 0) + offset)
        rows = jnp.where(valid[..., None], rows, 0.0)
        count = jnp.maximum(valid.sum(-1, keepdims=True), 1)
        return rows.sum(-2) / count
