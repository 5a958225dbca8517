"""The transformer encoder that SASRec and BERT4Rec share.

The two models differ only in the attention mask (causal or not) and in
whether the input may hold a mask token, so both are this module with two
class variables set; see ``sasrec.py`` and ``bert4rec.py``.

Design decisions the data pipeline and trainer rely on:

* Positions are counted from the RIGHT end of the window: the last (newest)
  position uses row 0 of the position table, the one before it row 1, and so
  on. With left padding the newest item always sits at the last index, so an
  item's position embedding depends only on how recent it is, and a sequence
  gives the same outputs whatever the amount of left padding (also with inputs
  shorter than ``max_len``; longer inputs are an error).
* Padding keys are masked out of attention; padding queries attend to
  themselves only, so their outputs are finite but meaningless.
* The item table has V+1 rows (padding + items) and is tied to the output
  layer. BERT4Rec's mask token (id V+1) is a separate ``[D]`` vector instead of
  row V+1, so the table that is sharded along ``vocab`` is exactly the logits'
  columns and the output layer never slices it.
* A learned output bias ``[V+1]`` is added to the tied logits: it lets the
  model learn item popularity without spending embedding norm on it.
* On a mesh whose ``model`` axis shards the ``vocab`` axis, the item table and
  the bias get ``table_rows >= V+1`` rows, a multiple of that axis, so any
  catalogue size divides. The extra rows are never looked up, their logits
  columns are -inf (like column 0: never a target, never recommended), and
  they are not counted as parameters (:meth:`SequenceRecommender.param_counts`).

The contract every other module relies on is written here once: the
parameters ``item_embedding [table_rows, D]`` and ``output_bias
[table_rows]`` (read them through :meth:`SequenceRecommender.item_table`,
never by name elsewhere), the class flags ``is_causal`` and
``uses_mask_token``, ``__call__`` (items to hidden states) and ``logits``
(hidden states to catalogue scores). A new model is a subclass in one file
plus one line in ``models.MODELS``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from distill_jax.models.features import FUSIONS, ItemFeatureEncoder, ItemFeatures, fuse
from distill_jax.models.layers import (
    Dense,
    Dropout,
    TransformerBlock,
    attention_mask,
    compute_dtype,
    embedding_lookup,
    layer_norm,
    partitioned,
)

Dtype = Any


class SequenceRecommender(nn.Module):
    """Embeddings -> pre-LN transformer blocks -> final LayerNorm; tied output.

    Attributes:
      num_items: V, the number of real items (ids 1..V).
      max_len: L, the longest window the position table covers.
      embed_dim: D, the model width; divisible by ``num_heads``.
      num_blocks: Number of transformer blocks.
      num_heads: Attention heads per block.
      mlp_dim: Hidden width of each block's MLP.
      dropout_rate: Dropout on the embeddings and inside every block.
      dtype: Compute dtype; parameters stay float32, logits are float32.
      table_rows: rows of the item table and output bias: 0 means V+1;
        more pads the catalogue to a multiple of the mesh's ``model`` axis.
      item_rank: 0 keeps a full ``[table_rows, D]`` item table; r > 0 stores
        it as ``item_embedding [table_rows, r] @ item_projection [r, D]``
        (the low-rank student of ``distill_jax.compress.lowrank``), which
        also makes the catalogue product ``(V+1) x r`` instead of ``(V+1) x D``.
      item_features: side features of the catalogue rows (see ``features.py``);
        None: items are their ids alone.
      fusion: how ids and features combine, one of ``features.FUSIONS``.
      id_dropout: while training, the chance that an item's id part (its id
        embedding and output bias) is zero for the step (DropoutNet); needs
        the 'id_dropout' rng.
      user_features: side features of the users (rows = user ids, row 0
        none); their encoding is added to every position of a user's window
        when ``__call__`` gets the batch's user ids. None: no user part.

    Subclasses set the two class flags; the trainer, the evaluator and the
    teacher initialisation use only the methods and flags defined here.
    """

    # Set by subclasses; the data pipeline reads them to decide what to feed.
    is_causal: ClassVar[bool] = True
    uses_mask_token: ClassVar[bool] = False
    # `logits(h)` is h @ table.T + bias of `catalogue()`, so a loss may compute
    # it from the table itself (the fused forms); False for a copy that scores
    # its own way (quantization-aware: compress/quantize.py).
    plain_logits: ClassVar[bool] = True

    num_items: int
    max_len: int
    embed_dim: int
    num_blocks: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    dtype: Dtype = jnp.float32
    table_rows: int = 0
    item_rank: int = 0
    item_features: ItemFeatures | None = None
    fusion: str = "sum"
    id_dropout: float = 0.0
    user_features: ItemFeatures | None = None

    @property
    def num_rows(self) -> int:
        """Rows of the item table and logits columns (V+1 plus any padding)."""
        return self.table_rows or self.num_items + 1

    @staticmethod
    def item_table(params: Any) -> tuple[jax.Array, jax.Array]:
        """The tied item table ``[num_rows, D]`` and output bias ``[num_rows]`` of ``params``.

        A low-rank table (``item_rank > 0``) is returned as the product of its factors.
        """
        table = params["item_embedding"]
        if "item_projection" in params:
            table = table @ params["item_projection"]
        return table, params["output_bias"]

    def param_counts(self, params: Any) -> tuple[int, int]:
        """(parameter scalars, bytes) of ``params``, padding rows of the item table left out."""
        count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        size = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
        # The stored rows (width r for a low-rank table), not their product.
        table, bias = params["item_embedding"], params["output_bias"]
        pad = self.num_rows - (self.num_items + 1)
        return (
            int(count - pad * (table.shape[1] + 1)),
            int(size - pad * (table.shape[1] * table.dtype.itemsize + bias.dtype.itemsize)),
        )

    def setup(self) -> None:
        # Shapes and ranges were checked by config validation (config_lib);
        # only the table padding is checked here, as it comes from the mesh.
        if self.num_rows < self.num_items + 1:
            raise ValueError(
                f"table_rows={self.table_rows} is below the catalogue's V+1={self.num_items + 1}"
            )
        # Std D^-1/2: with the tied output, logits of a unit-scale final
        # LayerNorm output then start at unit scale.
        init = nn.initializers.normal(stddev=self.embed_dim**-0.5)
        if self.item_rank:
            # Rows of unit-scale factors times a projection of std r^-1/2 keep
            # the product at the full table's scale.
            self.item_embedding = self.param(
                "item_embedding",
                partitioned(init, ("vocab", None)),
                (self.num_rows, self.item_rank),
                jnp.float32,
            )
            self.item_projection = self.param(
                "item_projection",
                partitioned(nn.initializers.normal(stddev=self.item_rank**-0.5), (None, "embed")),
                (self.item_rank, self.embed_dim),
                jnp.float32,
            )
        else:
            self.item_embedding = self.param(
                "item_embedding",
                partitioned(init, ("vocab", "embed")),
                (self.num_rows, self.embed_dim),
                jnp.float32,
            )
        self.position_embedding = self.param(
            "position_embedding",
            partitioned(init, ("pos", "embed")),
            (self.max_len, self.embed_dim),
            jnp.float32,
        )
        if self.uses_mask_token:
            self.mask_embedding = self.param(
                "mask_embedding", partitioned(init, ("embed",)), (self.embed_dim,), jnp.float32
            )
        self.output_bias = self.param(
            "output_bias",
            partitioned(nn.initializers.zeros, ("vocab",)),
            (self.num_rows,),
            jnp.float32,
        )
        self.embed_dropout = Dropout(self.dropout_rate)
        self.blocks = [
            TransformerBlock(self.num_heads, self.mlp_dim, self.dropout_rate, dtype=self.dtype)
            for _ in range(self.num_blocks)
        ]
        self.final_norm = layer_norm(self.dtype)
        if self.item_features is not None:
            if self.item_features.num_rows != self.num_rows:
                raise ValueError(
                    f"item_features has {self.item_features.num_rows} rows for a table of "
                    f"{self.num_rows}"
                )
            if self.fusion not in FUSIONS:
                raise ValueError(f"fusion={self.fusion!r}; expected one of {FUSIONS}")
            self.feature_encoder = ItemFeatureEncoder(
                self.item_features, self.embed_dim, dtype=self.dtype
            )
            if self.fusion != "sum":
                width = self.embed_dim if self.fusion == "concat" else 1
                self.fusion_layer = Dense(
                    (width,),
                    (None, "embed" if width > 1 else None),
                    ("embed",) if width > 1 else (None,),
                    dtype=self.dtype,
                )
        if self.user_features is not None:
            self.user_encoder = ItemFeatureEncoder(
                self.user_features, self.embed_dim, dtype=self.dtype
            )

    def catalogue(self, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """The tied item table ``[num_rows, D]`` and output bias ``[num_rows]``.

        Without side features: the item embedding (a low-rank one as the
        product of its factors) and the bias, as :meth:`item_table` reads them
        from the parameters. With them: ids and features fused (see
        ``features.py``); an item the training data never showed has no id
        part (embedding and bias zero), and while training with
        ``id_dropout`` each item loses its id part with that chance.
        """
        table = self.item_embedding
        if self.item_rank:
            table = table @ self.item_projection
        bias = self.output_bias
        if self.item_features is None:
            return table, bias
        if hasattr(table, "array") and hasattr(table.array, "qvalue"):
            # A qwix int8 table (the compress stage's post-training variant):
            # its rows dequantized, as the lookups read them.
            table = embedding_lookup(table, jnp.arange(self.num_rows))
        keep = jnp.asarray(self.item_features.known)
        if train and self.id_dropout > 0:
            drop = jax.random.bernoulli(self.make_rng("id_dropout"), self.id_dropout, keep.shape)
            keep = keep & ~drop
        ids = jnp.where(keep[:, None], table, 0.0)
        fused = fuse(self.fusion, ids, self.feature_encoder(), getattr(self, "fusion_layer", None))
        return fused.astype(jnp.float32), jnp.where(keep, bias, 0.0)

    def embed(
        self, items: jax.Array, table: jax.Array | None = None, users: jax.Array | None = None
    ) -> jax.Array:
        """Item (or mask-token) embeddings plus right-aligned positions (and the user part).

        Args:
          items: ``[B, L]`` int ids with ``L <= max_len``.
          table: the item table to read rows from (a model with side features:
            :meth:`catalogue`'s; None computes it in eval mode).
          users: ``[B]`` user ids (0: a user without features); with
            ``user_features``, each row's user encoding is added at every
            position. None: no user part.

        Returns:
          ``[B, L, D]`` in the compute dtype, scaled by sqrt(D).
        """
        length = items.shape[-1]
        if length > self.max_len:
            raise ValueError(f"input length {length} exceeds the model's max_len={self.max_len}")
        if self.uses_mask_token:
            is_mask = (items == self.num_items + 1)[..., None]
            x = self._item_rows(jnp.where(is_mask[..., 0], 0, items), table)
            x = jnp.where(is_mask, self.mask_embedding, x)
        else:
            # Out-of-range ids give NaN rows: a mask token fed to a causal
            # model shows up loudly instead of as a silently wrong row.
            x = self._item_rows(items, table)
            if self.num_rows > self.num_items + 1:
                # Padding rows must stay as loud as a missing row would be.
                x = jnp.where((items > self.num_items)[..., None], jnp.nan, x)
        positions = self.position_embedding[:length][::-1]
        if self.user_features is not None and users is None and self.is_initializing():
            users = jnp.zeros(items.shape[:1], jnp.int32)  # creates the encoder's parameters
        if self.user_features is not None and users is not None:
            users = users.astype(jnp.int32)
            known = (users > 0) & (users < self.user_features.num_rows)
            part = jnp.where(known[:, None], self.user_encoder(users), 0.0)
            x = x + part[:, None, :].astype(x.dtype)
        # sqrt(D) puts the residual stream at unit scale, like the blocks' outputs.
        return ((x + positions) * self.embed_dim**0.5).astype(self.dtype)

    def _item_rows(self, ids: jax.Array, table: jax.Array | None) -> jax.Array:
        if self.item_features is not None:
            if table is None:
                table = self.catalogue(train=False)[0]
            return embedding_lookup(table, ids)
        rows = embedding_lookup(self.item_embedding, ids)
        if self.item_rank:
            rows = rows @ self.item_projection
        return rows

    def __call__(
        self,
        items: jax.Array,
        *,
        train: bool,
        table: jax.Array | None = None,
        users: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a batch of left-padded sequences.

        Args:
          items: ``[B, L]`` int32 ids, 0 = padding, ``L <= max_len``.
          train: Whether dropout is active (needs the 'dropout' rng when the
            rate is non-zero).
          table: with side features, the step's fused item table
            (:meth:`catalogue`), so that inputs and outputs drop the same ids.
          users: ``[B]`` user ids, read by a model with ``user_features``
            (see :meth:`embed`); others ignore them.

        Returns:
          ``[B, L, D]`` hidden states in the compute dtype. Values at padding
          positions are finite but meaningless.
        """
        mask = attention_mask(items, causal=self.is_causal)
        x = self.embed_dropout(self.embed(items, table, users), deterministic=not train)
        for block in self.blocks:
            x = block(x, mask, train=train)
        return self.final_norm(x)

    def logits(
        self,
        hidden: jax.Array,
        table: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> jax.Array:
        """Scores every catalog column with the tied item embeddings.

        Args:
          hidden: ``[..., D]`` hidden states, any leading shape (the trainer
            passes only valid positions, so the big product is not wasted on
            padding).
          table, bias: with side features, the step's :meth:`catalogue`
            (None: computed in eval mode).

        Returns:
          ``[..., num_rows]`` float32 logits (``[..., V+1]`` unless the table is
          padded); column 0 (padding) and every padding row are -inf.
        """
        if self.item_features is not None:
            if table is None:
                table, bias = self.catalogue(train=False)
            return self._scores(hidden.astype(self.dtype), table.astype(self.dtype), bias)
        table = compute_dtype(self.item_embedding, self.dtype)
        hidden = hidden.astype(self.dtype)
        if self.item_rank:
            # h @ (U W)^T = (h @ W^T) @ U^T: the catalogue product is (V+1) x r.
            hidden = jnp.einsum(
                "...d,rd->...r", hidden, self.item_projection.astype(self.dtype)
            ).astype(self.dtype)
        return self._scores(hidden, table, self.output_bias)

    def _scores(self, hidden: jax.Array, table: jax.Array, bias: jax.Array) -> jax.Array:
        # Accumulate in float32 even for bfloat16 compute: logits feed softmaxes
        # over the whole catalog, where bfloat16 rounding would show.
        scores = jnp.einsum(
            "...d,vd->...v",
            hidden,
            table,
            preferred_element_type=jnp.float32,
        )
        scores = scores + bias
        # jnp.where rather than .at[..., 0].set: a scatter into a vocab-sharded
        # array is ambiguous under explicit sharding; the where fuses anyway.
        column = jnp.arange(self.num_rows)
        invalid = column == 0
        if self.num_rows > self.num_items + 1:
            invalid = invalid | (column > self.num_items)
        return jnp.where(invalid, -jnp.inf, scores)
