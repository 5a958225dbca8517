"""Tests for distill_jax.models: shapes, masking, padding, parameter layout.

Everything runs jitted with cached compilations and "rbg" keys: on CPU, eager
op-by-op dispatch and threefry dropout make XLA compile time dominate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from distill_jax.models import (
    LOGICAL_AXES,
    MODELS,
    BERT4Rec,
    SASRec,
    SequenceRecommender,
    build_model,
    count_params,
)

V = 23  # V+1 = 24 rows, divisible by the 4-way model axis in the sharding test.
L = 12  # max_len; most tests feed shorter windows of W, which right-aligned positions allow
W = 8
D = 16
H = 4
M = 32
BLOCKS = 1  # one block halves compile time; the param-count test covers more
NAMES = sorted(MODELS)


def key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


def make_model(
    name: str, *, max_len: int = L, dropout: float = 0.0, dtype: Any = jnp.float32
) -> SequenceRecommender:
    return MODELS[name](
        num_items=V,
        max_len=max_len,
        embed_dim=D,
        num_blocks=BLOCKS,
        num_heads=H,
        mlp_dim=M,
        dropout_rate=dropout,
        dtype=dtype,
    )


class Compiled(NamedTuple):
    model: SequenceRecommender
    params: Any  # boxed, as init returns them
    encode: Callable[..., jax.Array]  # (params, items, dropout_key=None) -> hidden
    logits: Callable[..., jax.Array]  # (params, hidden) -> logits


# The caches below share compilations between tests: params do not depend on
# dropout or dtype, and evaluation does not depend on dropout.


@functools.cache
def _params(name: str, max_len: int) -> Any:
    model = make_model(name, max_len=max_len)
    dummy = jnp.zeros((1, max_len), jnp.int32)
    return jax.jit(lambda k: model.init({"params": k}, dummy, train=False))(key(0))


@functools.cache
def _eval_fns(name: str, max_len: int, dtype: Any) -> tuple[Callable, Callable]:
    model = make_model(name, max_len=max_len, dtype=dtype)
    encode = jax.jit(lambda p, items: model.apply(p, items, train=False))
    logits = jax.jit(lambda p, h: model.apply(p, h, method=model.logits))
    return encode, logits


@functools.cache
def compiled(
    name: str, *, max_len: int = L, dropout: float = 0.0, dtype: Any = jnp.float32
) -> Compiled:
    model = make_model(name, max_len=max_len, dropout=dropout, dtype=dtype)
    encode_eval, logits = _eval_fns(name, max_len, dtype)
    encode_train = jax.jit(
        lambda p, items, k: model.apply(p, items, train=True, rngs={"dropout": k})
    )

    def encode(params, items, dropout_key=None):
        if dropout_key is None:
            return encode_eval(params, items)
        return encode_train(params, items, dropout_key)

    return Compiled(model, _params(name, max_len), encode, logits)


def make_items() -> jnp.ndarray:
    """Left-padded rows: full, partly padded (with a mask token), one real item."""
    return jnp.array(
        [
            [1, 2, 3, 4, 5, 6, 7, 8],
            [0, 0, 0, 9, 10, V + 1, 11, 12],
            [0, 0, 0, 0, 0, 0, 0, 13],
        ],
        dtype=jnp.int32,
    )


def usable(name: str, items: jnp.ndarray) -> jnp.ndarray:
    """SASRec never sees the mask token: swap it for a real item there."""
    return items if MODELS[name].uses_mask_token else jnp.where(items == V + 1, 14, items)


def expected_param_count(
    name: str, *, num_items: int, max_len: int, embed_dim: int, num_blocks: int, mlp_dim: int
) -> int:
    """Hand count from the config. The heads' widths sum to D, so H does not appear."""
    d, m = embed_dim, mlp_dim
    attention = 4 * d * d + 3 * d  # query, key, value, out: kernel D*D; bias D but key
    mlp = (d * m + m) + (m * d + d)
    norms = 2 * (2 * d)  # two LayerNorms, scale + bias
    block = attention + mlp + norms  # = 4D^2 + 2DM + 8D + M
    total = (num_items + 1) * d  # item embedding, tied to the output layer
    total += max_len * d  # position embedding
    total += num_items + 1  # output bias
    total += 2 * d  # final LayerNorm
    total += num_blocks * block
    if MODELS[name].uses_mask_token:
        total += d  # mask-token embedding
    return total


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(name, dtype):
    c = compiled(name, dtype=dtype)
    items = usable(name, make_items())
    unboxed = nn.unbox(c.params)
    chex.assert_trees_all_equal_dtypes(unboxed, jax.tree.map(jnp.float32, unboxed))
    hidden = c.encode(c.params, items)
    chex.assert_shape(hidden, (3, W, D))
    chex.assert_type(hidden, dtype)
    logits = c.logits(c.params, hidden)
    chex.assert_shape(logits, (3, W, V + 1))
    chex.assert_type(logits, jnp.float32)
    assert np.all(np.isneginf(logits[..., 0]))
    assert np.all(np.isfinite(logits[..., 1:]))


@pytest.mark.parametrize("name", NAMES)
def test_logits_accept_any_leading_shape(name):
    c = compiled(name)
    items = usable(name, make_items())
    hidden = c.encode(c.params, items)
    full = c.logits(c.params, hidden)
    valid = np.asarray(items != 0)
    gathered = c.logits(c.params, hidden[valid])
    chex.assert_shape(gathered, (int(valid.sum()), V + 1))
    np.testing.assert_allclose(gathered, full[valid], rtol=1e-5, atol=1e-5)
    chex.assert_shape(c.logits(c.params, hidden[0, -1]), (V + 1,))


def test_sasrec_is_causal():
    c = compiled("sasrec")
    items = usable("sasrec", make_items())
    changed = items.at[:, 5:].set(jnp.array([20, 21, 22]))
    before = c.encode(c.params, items)
    after = c.encode(c.params, changed)
    np.testing.assert_allclose(after[:, :5], before[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(after[0, 5:], before[0, 5:])


def test_bert4rec_is_bidirectional():
    c = compiled("bert4rec")
    items = make_items()
    changed = items.at[0, 6].set(20)
    before = c.encode(c.params, items)
    after = c.encode(c.params, changed)
    for i in range(6):
        assert not np.allclose(after[0, i], before[0, i]), f"position {i} ignored the future"


def test_bert4rec_mask_token_has_its_own_embedding():
    c = compiled("bert4rec")
    items = make_items()  # row 1 holds the mask token V+1 at index 5
    masked = c.encode(c.params, items)
    replaced = c.encode(c.params, items.at[1, 5].set(1))
    assert np.all(np.isfinite(masked))
    assert not np.allclose(masked[1, 5], replaced[1, 5])


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance(name):
    """Positions count from the right, so extra left padding changes nothing.

    The same three items are encoded in a window of W=8 and of max_len=12,
    each time batched with different neighbours.
    """
    c = compiled(name)
    real = [5, 7, V + 1 if MODELS[name].uses_mask_token else 9]
    short = usable(name, make_items()).at[0].set(jnp.array([0] * (W - 3) + real))
    long = jnp.array([[0] * (L - 3) + real, list(range(1, L + 1)), [0] * (L - 1) + [3]])
    out_short = c.encode(c.params, short)[0, -3:]
    out_long = c.encode(c.params, long.astype(jnp.int32))[0, -3:]
    np.testing.assert_allclose(out_short, out_long, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        c.logits(c.params, out_short), c.logits(c.params, out_long), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", NAMES)
def test_no_nan_at_padding_even_for_empty_rows(name):
    c = compiled(name, dropout=0.3)
    items = usable(name, make_items()).at[2].set(0)  # row 2 is all padding
    valid = items != 0

    @jax.jit
    def loss_and_grad(params):
        def loss(p):
            h = c.model.apply(p, items, train=True, rngs={"dropout": key(1)})
            logits = c.model.apply(p, h, method=c.model.logits)
            # Zero the -inf column before squaring; a real loss drops it in its softmax.
            logits = jnp.where(jnp.arange(V + 1) == 0, 0.0, logits)
            return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2), h

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, hidden), grads = loss_and_grad(c.params)
    assert np.all(np.isfinite(hidden))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("num_items", "max_len", "embed_dim", "num_blocks", "num_heads", "mlp_dim"),
    [(V, L, D, BLOCKS, H, M), (1000, 50, 64, 3, 2, 256), (12101, 200, 48, 2, 3, 96)],
)
def test_param_count_matches_hand_formula(
    name, num_items, max_len, embed_dim, num_blocks, num_heads, mlp_dim
):
    cfg = model_config(
        name=name, embed_dim=embed_dim, num_blocks=num_blocks, num_heads=num_heads, mlp_dim=mlp_dim
    )
    model = build_model(cfg, num_items=num_items, max_len=max_len)
    dummy = jnp.zeros((1, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init({"params": key(0)}, dummy, train=False))
    expected = expected_param_count(
        name,
        num_items=num_items,
        max_len=max_len,
        embed_dim=embed_dim,
        num_blocks=num_blocks,
        mlp_dim=mlp_dim,
    )
    assert count_params(shapes) == expected


@pytest.mark.parametrize("name", NAMES)
def test_count_params_on_boxed_and_unboxed_arrays(name):
    params = compiled(name).params
    expected = expected_param_count(
        name, num_items=V, max_len=L, embed_dim=D, num_blocks=BLOCKS, mlp_dim=M
    )
    assert count_params(params) == count_params(nn.unbox(params)) == expected


@pytest.mark.parametrize("name", NAMES)
def test_every_param_has_logical_axes(name):
    params = compiled(name).params
    boxes = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)
    for box in boxes:
        assert len(box.names) == box.value.ndim
        assert set(box.names) <= set(LOGICAL_AXES), box.names


@pytest.mark.parametrize("name", NAMES)
def test_boxed_and_unboxed_params_agree(name):
    c = compiled(name)
    items = usable(name, make_items())
    boxed = c.encode(c.params, items)
    unboxed = c.encode(nn.unbox(c.params), items)
    np.testing.assert_array_equal(boxed, unboxed)
    np.testing.assert_array_equal(c.logits(c.params, boxed), c.logits(nn.unbox(c.params), boxed))


@pytest.mark.parametrize("name", NAMES)
def test_dropout(name):
    c = compiled(name, dropout=0.3)
    items = usable(name, make_items())
    eval_a = c.encode(c.params, items)
    np.testing.assert_array_equal(eval_a, c.encode(c.params, items))
    train_a = c.encode(c.params, items, key(1))
    np.testing.assert_array_equal(train_a, c.encode(c.params, items, key(1)))
    assert not np.allclose(train_a, c.encode(c.params, items, key(2)))
    assert not np.allclose(train_a, eval_a)


def test_class_flags():
    assert SASRec.is_causal and not SASRec.uses_mask_token
    assert not BERT4Rec.is_causal and BERT4Rec.uses_mask_token


def model_config(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        name="sasrec",
        embed_dim=D,
        num_blocks=BLOCKS,
        num_heads=H,
        mlp_dim=M,
        dropout=0.1,
        dtype="bfloat16",
        item_rank=0,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def test_build_model():
    model = build_model(model_config(name="bert4rec"), num_items=V, max_len=L)
    assert isinstance(model, BERT4Rec)
    assert (model.num_items, model.max_len, model.embed_dim) == (V, L, D)
    assert model.dropout_rate == pytest.approx(0.1)
    assert model.dtype == jnp.bfloat16


def test_build_model_unknown_name_names_the_key():
    expected = (
        "config.teacher.name='foo' is not a known model; expected one of ['bert4rec', 'sasrec']"
    )
    with pytest.raises(ValueError) as err:
        build_model(model_config(name="foo"), num_items=V, max_len=L, key_prefix="teacher")
    assert str(err.value) == expected


def test_build_model_bad_dtype_names_the_key():
    with pytest.raises(ValueError, match=r"config\.student\.dtype='float16'"):
        build_model(model_config(dtype="float16"), num_items=V, max_len=L, key_prefix="student")


def test_sasrec_given_the_mask_token_gives_nan():
    """Out-of-range ids fill NaN rows, so a pipeline bug cannot pass silently."""
    c = compiled("sasrec")
    assert np.isnan(c.encode(c.params, make_items())[1]).any()


def test_input_longer_than_max_len_is_an_error():
    model = make_model("sasrec", max_len=W - 1)
    with pytest.raises(ValueError, match=f"max_len={W - 1}"):
        jax.eval_shape(lambda: model.init({"params": key(0)}, make_items(), train=False))


@pytest.mark.parametrize(
    ("axis_type", "name", "model_parallel"),
    [
        (AxisType.Explicit, "bert4rec", True),
        (AxisType.Explicit, "sasrec", False),
        (AxisType.Auto, "sasrec", True),
    ],
)
def test_sharding_is_only_rules(axis_type, name, model_parallel):
    """Data and model parallelism by rules alone, in both mesh modes.

    Explicit axes are jax.make_mesh's default; there jax rejects ambiguous
    shardings (a gather with batch-sharded ids, a matmul contracting a sharded
    axis), which is what Dense/Dropout/embedding_lookup in layers.py handle.
    Gradients with dropout are checked in the first case only, to stay fast.
    """
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    sharded_axis = "model" if model_parallel else None
    rules = (
        ("vocab", sharded_axis),
        ("mlp", sharded_axis),
        ("heads", sharded_axis),
        ("kv", None),
        ("embed", None),
        ("pos", None),
    )
    c = compiled(name, dropout=0.3)
    model = c.model
    items = jnp.concatenate([usable(name, make_items())] * 2)[:4]

    def forward(p, x):
        return model.apply(p, model.apply(p, x, train=False), method=model.logits)

    def loss(p, x):
        h = model.apply(p, x, train=True, rngs={"dropout": key(1)})
        return jnp.sum(jax.nn.logsumexp(model.apply(p, h, method=model.logits), axis=-1))

    local = c.logits(c.params, c.encode(c.params, items))
    with jax.set_mesh(mesh):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(c.params), mesh, rules)
        params = jax.device_put(nn.unbox(c.params), shardings)
        batch = jax.device_put(items, NamedSharding(mesh, PartitionSpec("data", None)))
        sharded = jax.jit(forward)(params, batch)
        if model_parallel and axis_type == AxisType.Explicit:
            grads = jax.jit(jax.grad(loss))(params, batch)
            assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    table = params["params"]["item_embedding"]
    kernel = params["params"]["blocks_0"]["attn"]["out"]["kernel"]
    assert table.sharding.spec == PartitionSpec(sharded_axis, None)
    assert kernel.sharding.spec == PartitionSpec(sharded_axis, None, None)
    np.testing.assert_allclose(sharded, local, rtol=1e-5, atol=1e-5)
