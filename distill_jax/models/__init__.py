"""Sequential recommender models and the registry that builds them from config.

Both models map ``[B, L]`` left-padded int32 item ids (0 = padding, 1..V
items, V+1 = BERT4Rec's mask token) to ``[B, L, D]`` hidden states, and
``model.logits`` maps ``[..., D]`` hidden states to ``[..., V+1]`` float32
scores with column 0 at -inf::

    model = build_model(config.teacher, num_items=V, max_len=L, key_prefix="teacher")
    params = model.init({"params": key}, items, train=False)
    hidden = model.apply(params, items, train=True, rngs={"dropout": key})
    logits = model.apply(params, hidden[valid], method=model.logits)

``init`` returns parameters boxed in ``nn.Partitioned``; ``apply`` accepts them
boxed or ``nn.unbox``-ed. The logical axis names used (``LOGICAL_AXES``):

* ``vocab``: catalog rows, V+1 (item embedding rows, output bias). The one
  large axis; shard it along ``model`` for big catalogs.
* ``pos``: position-table rows (max_len).
* ``embed``: model width D (embeddings, LayerNorm scales/biases, attention
  output and MLP output biases).
* ``mlp``: MLP hidden width.
* ``heads``: attention heads.
* ``kv``: per-head width D / heads.

Parameter shapes: item_embedding (V+1, D) ('vocab', 'embed'); position_embedding
(L, D) ('pos', 'embed'); mask_embedding (D,) ('embed',), BERT4Rec only;
output_bias (V+1,) ('vocab',); per block query/key/value kernel (D, H, D/H)
('embed', 'heads', 'kv') and bias (H, D/H) ('heads', 'kv'), query and value only
(a key bias shifts all of a query's scores alike: softmax cancels it); out kernel
(H, D/H, D) ('heads', 'kv', 'embed'); MLP wi (D, M) ('embed', 'mlp'), wo (M, D)
('mlp', 'embed').

Sharding: the models run under meshes with ``AxisType.Auto`` or
``AxisType.Explicit`` axes (the latter is ``jax.make_mesh``'s default; see
``layers.py``). Tested: batch along ``data``; ``vocab``, ``mlp`` and ``heads``
along ``model``. Keep ``pos``, ``embed`` and ``kv`` unsharded (the position
table is sliced by length; LayerNorm reduces over ``embed``). A dimension
mapped to a mesh axis must be divisible by its size: ``build_model(...,
vocab_shards=n)`` pads the item table to a multiple of n (the padding rows
score -inf), while ``heads``/``mlp`` must divide by themselves.

Dropout draws from the 'dropout' rng. On CPU, threefry keys make XLA compile
times several times longer than ``jax.random.key(seed, impl="rbg")`` keys.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distill_jax.models.base import SequenceRecommender
from distill_jax.models.bert4rec import BERT4Rec
from distill_jax.models.features import ItemFeatures
from distill_jax.models.sasrec import SASRec

__all__ = [
    "BERT4Rec",
    "DTYPES",
    "LOGICAL_AXES",
    "MODELS",
    "SASRec",
    "SequenceRecommender",
    "build_model",
    "count_params",
]

MODELS: dict[str, type[SequenceRecommender]] = {"sasrec": SASRec, "bert4rec": BERT4Rec}

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

LOGICAL_AXES: tuple[str, ...] = ("vocab", "pos", "embed", "mlp", "heads", "kv")


def id_dropout(cfg: ml_collections.ConfigDict, features_cfg: ml_collections.ConfigDict) -> float:
    """The model's id-part drop rate: its own ``id_dropout``, or -1 for
    ``features.id_dropout``."""
    own = float(cfg.get("id_dropout", -1.0))
    return float(features_cfg.id_dropout) if own < 0 else own


def build_model(
    cfg: ml_collections.ConfigDict,
    *,
    num_items: int,
    max_len: int,
    key_prefix: str = "model",
    vocab_shards: int = 1,
    item_features: Any = None,
    features_cfg: ml_collections.ConfigDict | None = None,
) -> SequenceRecommender:
    """Builds a model from its (validated) config subtree.

    The values were checked by ``config_lib.validate``, which names the key at
    fault; only the look-ups that would otherwise fail obscurely are checked here.

    Args:
      cfg: ConfigDict with ``name, embed_dim, num_blocks, num_heads, mlp_dim,
        dropout, dtype`` (dtype is "float32" or "bfloat16").
      num_items: V, the catalog size from the data (not the config, so teacher
        and student cannot disagree).
      max_len: L, the window length.
      key_prefix: Where ``cfg`` sits under ``config``, used in error messages,
        e.g. "teacher" gives "config.teacher.name=...".
      vocab_shards: how many shards the ``vocab`` axis is split into (the
        mesh's ``model`` axis when the sharding rules map ``vocab`` to it).
        Above 1 the item table is padded to a multiple of it.
      item_features: the data's `CatalogueFeatures`, read when
        ``cfg.use_features`` is on (then required).
      features_cfg: ``config.features`` (fusion, id dropout) for such a model.

    Returns:
      The unbound flax module.
    """

    def key(name: str) -> str:
        return f"config.{key_prefix}.{name}"

    if cfg.name not in MODELS:
        raise ValueError(
            f"{key('name')}={cfg.name!r} is not a known model; expected one of {sorted(MODELS)}"
        )
    if cfg.dtype not in DTYPES:
        raise ValueError(
            f"{key('dtype')}={cfg.dtype!r} is not a known dtype; expected one of {sorted(DTYPES)}"
        )
    # Padding only when the table is really split: one-device results stay identical.
    table_rows = 0 if vocab_shards <= 1 else -(-(num_items + 1) // vocab_shards) * vocab_shards
    extra = {}
    if cfg.get("use_features", False):
        if vocab_shards > 1:
            raise ValueError(
                f"{key('use_features')}=True on a mesh that shards the item table "
                f"({vocab_shards} vocab shards along 'model'): side features are not "
                "supported there yet; shard only data (mesh.model=1) or set "
                f"{key('use_features')}=False"
            )
        if item_features is None or features_cfg is None:
            raise ValueError(
                f"{key('use_features')}=True, but the model is built without the data's "
                "item features (pass the split, not its size)"
            )
        extra = dict(
            item_features=ItemFeatures.from_encoded(
                item_features.encoded, item_features.known_items, table_rows or num_items + 1
            ),
            fusion=features_cfg.fusion,
            id_dropout=id_dropout(cfg, features_cfg),
        )
        users = getattr(item_features, "users", None)
        if users is not None:
            extra["user_features"] = ItemFeatures.from_encoded(
                users, np.arange(1, users.num_rows), users.num_rows
            )
    return MODELS[cfg.name](
        num_items=num_items,
        max_len=max_len,
        embed_dim=cfg.embed_dim,
        num_blocks=cfg.num_blocks,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        dropout_rate=float(cfg.dropout),
        dtype=DTYPES[cfg.dtype],
        table_rows=table_rows,
        item_rank=cfg.item_rank,
        **extra,
    )


def catalogue_size(catalogue: Any) -> int:
    """V of a split (or of anything with ``num_items``), or the int V itself."""
    return int(getattr(catalogue, "num_items", catalogue))


def count_params(params: Any) -> int:
    """Total number of parameter scalars.

    Works on boxed (``nn.Partitioned``) or unboxed trees, and on
    ``jax.eval_shape`` output, since it only reads shapes.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
