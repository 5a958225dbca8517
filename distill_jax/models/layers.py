"""Transformer pieces shared by the sequential recommenders.

Every parameter is created through :func:`partitioned`, so it carries logical
axis names (see ``distill_jax.models.LOGICAL_AXES``) and model parallelism is a
matter of axis rules in the config, not code. Parameters are always float32;
``dtype`` is only the compute dtype.

The layers work under both kinds of mesh axes. With ``AxisType.Auto`` the
compiler propagates shardings (GSPMD). With ``AxisType.Explicit`` (the default
of ``jax.make_mesh``) jax refuses ops whose output sharding is ambiguous:
a gather from a row-sharded table, a matmul contracting a sharded axis, a
``where`` between a sharded and an unsharded array. Flax linen's ``Dense``,
``Embed`` and ``Dropout`` have no way to say the output sharding, so
:class:`Dense`, :class:`Dropout` and :func:`embedding_lookup` here do; outside
an explicit mesh they are the plain operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Dtype = Any
Initializer = Callable[..., jax.Array]


def partitioned(init: Initializer, axes: Sequence[str]) -> Initializer:
    """Wraps an initializer so the parameter it makes carries logical axis names.

    Args:
      init: A flax/jax initializer ``(key, shape, dtype) -> array``.
      axes: One logical axis name per dimension of the parameter.

    Returns:
      An initializer whose output is an ``nn.Partitioned`` box.
    """
    return nn.with_logical_partitioning(init, tuple(axes))


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm whose scale and bias are annotated ``('embed',)``."""
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones, ("embed",)),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """``x``'s sharding when it is traced under explicit mesh axes, else None.

    None also for a quantized weight (qwix's int8 values with scales, not an array).
    """
    if not isinstance(x, jax.Array):
        return None
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
    if mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return sharding


def _spec(x: jax.Array, sharding: NamedSharding) -> tuple[Any, ...]:
    spec = tuple(sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``, also under explicit mesh axes.

    Under explicit axes a gather with batch-sharded ids is ambiguous (even from
    a replicated table) and jax asks for the output sharding: the result is
    sharded like the ids, with the feature axis as in the table.

    Args:
      table: ``[N, D]`` embedding table.
      ids: int array of any shape with values in ``[0, N)``; out-of-range ids
        give NaN rows (``mode="fill"``), so misuse shows up loudly.

    Returns:
      ``ids.shape + (D,)`` rows of ``table``.
    """
    if hasattr(table, "array") and hasattr(table.array, "qvalue"):
        return _quantized_rows(table.array, ids)
    table_sharding = explicit_sharding(table)
    ids_sharding = explicit_sharding(ids)
    if table_sharding is None and ids_sharding is None:
        return jnp.take(table, ids, axis=0, mode="fill")
    ids_spec = _spec(ids, ids_sharding) if ids_sharding else (None,) * ids.ndim
    feature_spec = _spec(table, table_sharding)[1] if table_sharding else None
    out = PartitionSpec(*ids_spec, feature_spec)
    return table.at[ids].get(out_sharding=out, mode="fill")


def compute_dtype(weight: Any, dtype: Dtype) -> Any:
    """``weight`` in the compute dtype; a no-op (not a copy) when it already is.

    A qwix int8 weight keeps its int8 values: the quantized product dequantizes it.
    """
    return weight if weight.dtype == dtype else weight.astype(dtype)


def _quantized_rows(qtable: Any, ids: jax.Array) -> jax.Array:
    """Rows of an int8 table (qwix's post-training quantized item table).

    The catalogue scores quantize the tied table with one scale per row, so a
    row is its int8 values times that row's scale: the same numbers the scores use.
    """
    values = jnp.take(qtable.qvalue, ids, axis=0, mode="fill", fill_value=0)
    scale = qtable.scale
    if scale.shape[0] == qtable.qvalue.shape[0]:
        scale = jnp.take(scale, ids, axis=0, mode="fill", fill_value=jnp.nan)
    if getattr(qtable, "zero_point", None) is not None:
        raise ValueError("an asymmetric (zero-point) quantized item table is not supported")
    return values.astype(scale.dtype) * scale


class Dense(nn.Module):
    """A dense layer over the last ``num_contract`` input axes, sharding-aware.

    Under explicit axes the output is sharded like the input's batch axes and
    the kernel's output axes, which makes a contraction over a model-sharded
    axis (attention ``out``, MLP ``wo``) an all-reduce, as in Megatron.

    Attributes:
      features: Output feature shape, e.g. ``(heads, head_dim)`` or ``(D,)``.
      kernel_axes: Logical names for the kernel: contracted axes, then features.
      bias_axes: Logical names for the bias (the feature axes).
      num_contract: How many trailing input axes the kernel contracts.
      dtype: Compute dtype.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...]
    num_contract: int = 1
    dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[..., *contracted]`` to ``[..., *features]``."""
        contracted = x.shape[x.ndim - self.num_contract :]
        in_axes = tuple(range(self.num_contract))
        out_axes = tuple(range(self.num_contract, self.num_contract + len(self.features)))
        # LeCun normal over the flattened fan-in, as flax's DenseGeneral does.
        init = nn.initializers.lecun_normal(in_axis=in_axes, out_axis=out_axes)
        kernel = self.param(
            "kernel",
            partitioned(init, self.kernel_axes),
            contracted + tuple(self.features),
            jnp.float32,
        )
        batch_dims = x.ndim - self.num_contract
        out_sharding = None
        x_sharding, k_sharding = explicit_sharding(x), explicit_sharding(kernel)
        if x_sharding is not None:
            k_spec = _spec(kernel, k_sharding) if k_sharding else (None,) * kernel.ndim
            out_sharding = PartitionSpec(
                *_spec(x, x_sharding)[:batch_dims], *k_spec[self.num_contract :]
            )
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            compute_dtype(kernel, self.dtype),
            ((tuple(range(batch_dims, x.ndim)), in_axes), ((), ())),
            out_sharding=out_sharding,
        )
        if not self.use_bias:
            return y
        bias = self.param(
            "bias",
            partitioned(nn.initializers.zeros, self.bias_axes),
            tuple(self.features),
            jnp.float32,
        )
        return y + bias.astype(self.dtype)


class Dropout(nn.Module):
    """Inverted dropout that also works under explicit mesh axes.

    ``nn.Dropout`` draws an unsharded keep-mask and ``where``s it with the
    possibly sharded input, which explicit axes reject; this draws the mask
    with the input's sharding (so it is never materialised replicated either).

    Attributes:
      rate: Probability of zeroing an element.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """Zeroes elements with probability ``rate`` and rescales the rest."""
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(
            self.make_rng("dropout"), keep_prob, x.shape, out_sharding=explicit_sharding(x)
        )
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with a boolean mask, written with einsums.

    Written by hand rather than with ``nn.MultiHeadDotProductAttention`` so the
    softmax always runs in float32 (bfloat16 softmax over long windows loses
    the small weights) and the layers can state output shardings.

    Attributes:
      num_heads: Number of heads; the input width must be divisible by it.
      dropout_rate: Dropout on the attention weights.
      dtype: Compute dtype.
    """

    num_heads: int
    dropout_rate: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        """Attends over the sequence.

        Args:
          x: ``[B, L, D]`` inputs.
          mask: ``[B, 1, L, L]`` boolean; ``mask[b, 0, q, k]`` says query q may
            see key k. Every query should be allowed at least one key,
            otherwise its weights are uniform over garbage (finite, meaningless).
          train: Whether dropout is active.

        Returns:
          ``[B, L, D]`` outputs in ``dtype``.
        """
        embed_dim = x.shape[-1]
        if embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} must be divisible by num_heads={self.num_heads}"
            )
        head_dim = embed_dim // self.num_heads

        def projection(name: str, use_bias: bool = True) -> Dense:
            return Dense(
                (self.num_heads, head_dim),
                kernel_axes=("embed", "heads", "kv"),
                bias_axes=("heads", "kv"),
                dtype=self.dtype,
                use_bias=use_bias,
                name=name,
            )

        query = projection("query")(x)
        # No key bias: it adds q.b to every score of a query alike, which the
        # softmax cancels. Its gradient is pure rounding noise, which Adam would
        # scale up to full-size updates that differ between shardings.
        key = projection("key", use_bias=False)(x)
        value = projection("value")(x)
        # Scale the queries, not the [L, L] scores: fewer multiplies.
        query = query * jnp.asarray(head_dim**-0.5, self.dtype)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
        # A finite fill (not -inf) so a query whose keys are all masked would
        # still give finite weights; callers also keep the diagonal open.
        mask = jnp.broadcast_to(mask, scores.shape, out_sharding=explicit_sharding(scores))
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        weights = Dropout(self.dropout_rate)(weights, deterministic=not train)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return Dense(
            (embed_dim,),
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            num_contract=2,
            dtype=self.dtype,
            name="out",
        )(attended)


class MlpBlock(nn.Module):
    """Position-wise feed-forward layer: Dense -> GELU -> Dropout -> Dense.

    Attributes:
      mlp_dim: Hidden width.
      dropout_rate: Dropout after the activation.
      dtype: Compute dtype.
    """

    mlp_dim: int
    dropout_rate: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Applies the MLP to ``[..., D]`` inputs; returns ``[..., D]``."""
        h = Dense(
            (self.mlp_dim,), kernel_axes=("embed", "mlp"), bias_axes=("mlp",),
            dtype=self.dtype, name="wi",
        )(x)  # fmt: skip
        h = nn.gelu(h)
        h = Dropout(self.dropout_rate)(h, deterministic=not train)
        return Dense(
            (x.shape[-1],), kernel_axes=("mlp", "embed"), bias_axes=("embed",),
            dtype=self.dtype, name="wo",
        )(h)  # fmt: skip


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + Drop(MHA(LN(x))), then x + Drop(MLP(LN(x))).

    Pre-LN rather than SASRec's original post-LN: it trains stably without
    warm-up, which matters when students of many sizes share one schedule.

    Attributes:
      num_heads: Attention heads.
      mlp_dim: MLP hidden width.
      dropout_rate: Dropout inside attention, the MLP and on both residual branches.
      dtype: Compute dtype.
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        """Applies the block to ``[B, L, D]`` with a ``[B, 1, L, L]`` mask."""
        attention = MultiHeadAttention(
            self.num_heads, self.dropout_rate, dtype=self.dtype, name="attn"
        )
        mlp = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype, name="mlp")
        h = attention(layer_norm(self.dtype, name="ln_attn")(x), mask, train=train)
        x = x + Dropout(self.dropout_rate)(h, deterministic=not train)
        h = mlp(layer_norm(self.dtype, name="ln_mlp")(x), train=train)
        return x + Dropout(self.dropout_rate)(h, deterministic=not train)


def attention_mask(items: jax.Array, *, causal: bool) -> jax.Array:
    """Builds the ``[B, 1, L, L]`` self-attention mask for left-padded items.

    A query may see a key when the key is a real item (id != 0) and, if
    ``causal``, the key is not in the future. Each query may always see itself:
    for real items that changes nothing (they already see themselves), and it
    gives padding queries one key, so even an all-padding row has finite
    outputs and gradients.

    Args:
      items: ``[B, L]`` int item ids, 0 = padding.
      causal: Whether to hide future positions.

    Returns:
      ``[B, 1, L, L]`` boolean mask, broadcast over heads.
    """
    length = items.shape[-1]
    key_valid = (items != 0)[:, None, None, :]
    allowed = jnp.eye(length, dtype=bool)
    if causal:
        # Real keys in the past or present; the diagonal is in tril already.
        return (key_valid & jnp.tril(jnp.ones((length, length), dtype=bool))) | allowed
    return key_valid | allowed
