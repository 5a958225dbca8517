"""The click model (DCN-v2 / MLP / logistic) against a float64 NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from distill_jax.models.click import ClickModel, table_offsets

VOCAB, N, D, B = (5, 3, 7), 2, 4, 6


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(-1, v + 3, B) for v in VOCAB], axis=1).astype(np.int32)
    return jnp.asarray(cat), jnp.asarray(rng.normal(size=(B, N)), jnp.float32)


def _init(model):
    cat, num = _rows()
    return nn.unbox(model.init({"params": jax.random.key(0)}, cat, num, train=False))["params"]


def _reference(model, params, cat, num, history=None):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    offsets = table_offsets(model.vocab_sizes)
    cat = np.asarray(cat)
    ids = np.where((cat >= 0) & (cat <= np.array(model.vocab_sizes)), cat, 0) + offsets
    parts = [p["embedding"][ids].reshape(B, -1)]
    if model.history_field >= 0:
        f = model.history_field
        pooled = np.zeros((B, model.embed_dim))
        for b in range(B):
            rows = [h + offsets[f] for h in np.asarray(history)[b] if 0 < h <= model.vocab_sizes[f]]
            if rows:
                pooled[b] = p["embedding"][rows].mean(0)
        parts.append(pooled)
    x0 = np.concatenate([*parts, np.asarray(num, np.float64)], 1)
    x = x0
    for layer in range(model.num_cross):
        if model.cross_rank:
            v = x @ p[f"cross_{layer}_v"]["kernel"]
            w_x = v @ p[f"cross_{layer}_u"]["kernel"] + p[f"cross_{layer}_u"]["bias"]
        else:
            w_x = x @ p[f"cross_{layer}"]["kernel"] + p[f"cross_{layer}"]["bias"]
        x = x0 * w_x + x
    for layer in range(len(model.mlp_dims)):
        x = np.maximum(x @ p[f"mlp_{layer}"]["kernel"] + p[f"mlp_{layer}"]["bias"], 0)
    return (x @ p["logit"]["kernel"] + p["logit"]["bias"])[:, 0]


@pytest.mark.parametrize(
    "num_cross, cross_rank, mlp_dims",
    [(0, 0, ()), (0, 0, (8, 4)), (2, 0, (8,)), (3, 2, (8,))],
    ids=["logistic", "mlp", "dcn", "dcn_low_rank"],
)
def test_logits_match_the_float64_reference(num_cross, cross_rank, mlp_dims):
    model = ClickModel(VOCAB, N, D, num_cross=num_cross, cross_rank=cross_rank, mlp_dims=mlp_dims)
    params = _init(model)
    # Large cross biases, so the cross layers do not start near the identity.
    for name in params:
        if name.startswith("cross") and "bias" in params[name]:
            params[name]["bias"] = params[name]["bias"] + 0.5
    cat, num = _rows(1)
    logits = model.apply({"params": params}, cat, num, train=False)
    chex.assert_shape(logits, (B,))
    chex.assert_type(logits, jnp.float32)
    np.testing.assert_allclose(logits, _reference(model, params, cat, num), rtol=1e-5, atol=1e-5)
    assert params["embedding"].shape == (sum(VOCAB) + len(VOCAB), D)


@pytest.mark.parametrize("num_cross, mlp_dims", [(0, ()), (2, (8,))], ids=["logistic", "dcn"])
def test_the_history_is_the_mean_of_its_items_embeddings(num_cross, mlp_dims):
    model = ClickModel(VOCAB, N, D, num_cross=num_cross, mlp_dims=mlp_dims, history_field=2)
    cat, num = _rows(2)
    # Valid ids, padding (0), and out-of-range ids (dropped), one row with none at all.
    history = jnp.asarray([[1, 7, 0], [0, 0, 0], [3, 3, 8], [-1, 2, 5], [7, 6, 1], [4, 0, 2]])
    params = nn.unbox(model.init({"params": jax.random.key(1)}, cat, num, history, train=False))[
        "params"
    ]
    logits = model.apply({"params": params}, cat, num, history, train=False)
    chex.assert_shape(logits, (B,))
    want = _reference(model, params, cat, num, history)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert model.input_width == (len(VOCAB) + 1) * D + N
    # The history changes the logit; a model that reads one refuses to run without it.
    other = model.apply({"params": params}, cat, num, jnp.zeros_like(history), train=False)
    assert np.abs(np.asarray(other) - np.asarray(logits)).max() > 1e-4
    with pytest.raises(ValueError, match="reads a history input"):
        model.apply({"params": params}, cat, num, train=False)


def test_out_of_vocabulary_ids_share_their_fields_bucket():
    model = ClickModel(VOCAB, N, D, mlp_dims=(8,))
    params = _init(model)
    cat, num = _rows()
    a = cat.at[:, 1].set(0)
    b = cat.at[:, 1].set(jnp.array([-1, 4, 99, 0, 4, 7]))  # all outside 1..3 or 0
    np.testing.assert_array_equal(
        model.apply({"params": params}, a, num, train=False),
        model.apply({"params": params}, b, num, train=False),
    )


def test_dropout_only_in_training_and_bad_widths_are_named():
    model = ClickModel(VOCAB, N, D, mlp_dims=(16,), dropout_rate=0.5)
    params = _init(model)
    cat, num = _rows()
    train = model.apply(
        {"params": params}, cat, num, train=True, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(train, model.apply({"params": params}, cat, num, train=False))
    with pytest.raises(
        ValueError, match="2 categorical and 2 numeric columns; the model was built for 3"
    ):
        model.apply({"params": params}, cat[:, :2], num, train=False)
