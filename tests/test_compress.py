"""Compression: magnitude pruning, int8 (qwix), low-rank item tables; against float64 NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from distill_jax import compress, config_lib, models
from distill_jax.compress import lowrank, prune, quantize


def _tree(rng):
    return {
        "a": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        "query": {"bias": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)},  # per head: 2-D
        "item_embedding": jnp.asarray(rng.normal(size=(9, 4)), jnp.float32),
        "position_embedding": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    }


def test_prunable_leaves_out_vectors_positions_and_the_table_by_switch():
    params = _tree(np.random.default_rng(0))
    on = prune.prunable(params, include_item_table=True)
    off = prune.prunable(params, include_item_table=False)
    assert on == {
        "a": {"kernel": True},
        "b": {"kernel": True},
        "bias": False,
        "query": {"bias": False},
        "item_embedding": True,
        "position_embedding": False,
    }
    assert off["item_embedding"] is False and off["a"]["kernel"] is True


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_magnitude_masks_cut_exactly_the_smallest_weights(scope, sparsity):
    params = _tree(np.random.default_rng(1))
    which = prune.prunable(params, True)
    ones = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    masks = prune.magnitude_masks(params, ones, which, jnp.float32(sparsity), scope)
    names = ["a", "b", "item_embedding"]
    leaf = lambda t, n: t[n]["kernel"] if n in ("a", "b") else t[n]  # noqa: E731
    values = {n: np.abs(np.asarray(leaf(params, n), np.float64)).ravel() for n in names}
    kept = {n: np.asarray(leaf(masks, n)).ravel() for n in names}
    groups = [names] if scope == "global" else [[n] for n in names]
    for group in groups:
        v = np.concatenate([values[n] for n in group])
        k = np.concatenate([kept[n] for n in group])
        num_cut = round(sparsity * v.size)
        assert np.count_nonzero(~k) == num_cut
        # Every cut weight is no larger than every kept one.
        assert v[~k].max() <= v[k].min()
    # Not prunable: untouched.
    assert bool(jnp.all(masks["bias"])) and bool(jnp.all(masks["position_embedding"]))


def test_the_schedule_is_zhu_and_gupta_cubic():
    for t, expected in [(0, 0.0), (5, 0.8 * (1 - 0.5**3)), (10, 0.8), (15, 0.8)]:
        np.testing.assert_allclose(float(prune.sparsity_at(jnp.int32(t), 0.8, 10)), expected)


def test_pruned_weights_stay_exactly_zero_through_adamw_with_weight_decay():
    rng = np.random.default_rng(2)
    params = _tree(rng)
    which = prune.prunable(params, True)
    tx = optax.chain(
        optax.adamw(1e-2, weight_decay=0.1),
        prune.prune_updates(which, target=0.6, end_step=8, update_every=2, scope="global"),
    )
    state = tx.init(params)
    total = sum(
        x.size for x, w in zip(jax.tree.leaves(params), jax.tree.leaves(which), strict=True) if w
    )
    history = []
    for _ in range(12):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        report = prune.sparsity_report(params, which)
        history.append(report["prunable"])
        masks = state[1].masks
        # A cut weight is exactly zero, whatever momentum and decay push it to.
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    assert history == sorted(history)  # only ever more zeros
    assert history[-1] == pytest.approx(round(0.6 * total) / total)
    assert set(report["per_parameter"]) == {"a/kernel", "b/kernel", "item_embedding"}


def _model(name="sasrec", **kw):
    cfg = synthetic.get_config("tiny").student
    cfg.name = name
    cfg.update(kw)
    return models.build_model(cfg, num_items=60, max_len=16, key_prefix="student")


def _inputs(model, rng, batch=5):
    x = rng.integers(1, model.num_items + 1, (batch, model.max_len)).astype(np.int32)
    x[:, :3] = 0  # left padding
    if model.uses_mask_token:
        x[:, -1] = model.num_items + 1
    return jnp.asarray(x)


def _scores(model, params, x):
    hidden = model.apply({"params": params}, x, train=False)
    return model.apply({"params": params}, hidden[:, -1], method=model.logits)


def test_lowrank_factorization_is_the_best_rank_r_table_and_the_model_uses_it():
    model = _model()
    rng = np.random.default_rng(3)
    params = nn.unbox(model.init({"params": jax.random.key(0)}, _inputs(model, rng), train=False))[
        "params"
    ]
    table = np.asarray(params["item_embedding"], np.float64)
    out, info = lowrank.factorize(jax.device_get(params), 3, model.num_items)
    u, s, vt = np.linalg.svd(table, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    product = np.asarray(out["item_embedding"], np.float64) @ np.asarray(out["item_projection"])
    np.testing.assert_allclose(product, best, atol=1e-5)
    np.testing.assert_allclose(info["energy"], np.sum(s[:3] ** 2) / np.sum(s**2), rtol=1e-6)
    # The rank-3 model scores with the product: h @ (U W)^T + b, as float64 NumPy does.
    low = _model(item_rank=3)
    x = _inputs(low, rng)
    hidden = np.asarray(low.apply({"params": out}, x, train=False)[:, -1], np.float64)
    expected = hidden @ product.T + np.asarray(out["output_bias"], np.float64)
    expected[:, 0] = -np.inf
    np.testing.assert_allclose(np.asarray(_scores(low, out, x)), expected, rtol=2e-5, atol=2e-5)
    table2, _ = low.item_table(out)
    np.testing.assert_allclose(np.asarray(table2), product, atol=1e-5)
    assert low.param_counts(out)[0] < model.param_counts(params)[0]


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_int8_ptq_quantizes_every_matrix_and_the_item_table_per_row(name):
    model = _model(name)
    rng = np.random.default_rng(4)
    x = _inputs(model, rng)
    params = nn.unbox(model.init({"params": jax.random.key(1)}, x, train=False))["params"]
    qmodel, qparams = quantize.ptq(model, params)
    table = qparams["item_embedding"].array
    assert table.qvalue.dtype == jnp.int8 and table.scale.shape == (model.num_rows, 1)
    kernel = qparams["blocks_0"]["mlp"]["wi"]["kernel"].array
    assert kernel.qvalue.dtype == jnp.int8
    # The int8 table is absmax per row: q * scale is within half a step of
    # the weight, plus what rounding the scale to bfloat16 (8 bits) moves it.
    w = np.asarray(params["item_embedding"], np.float64)
    scale = np.asarray(table.scale, np.float64)
    q = np.asarray(table.qvalue, np.float64) * scale
    step = np.abs(w).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(q - w) <= step / 2 + 127 * step * 2.0**-8 + 1e-7)
    assert np.array_equal(scale.astype(np.float32), np.asarray(table.scale))
    import ml_dtypes

    assert np.array_equal(scale.astype(ml_dtypes.bfloat16).astype(np.float64), scale)
    # The lookup reads the same int8 rows: the quantized model's embeddings
    # are those of the float model with the dequantized table.
    deq = dict(params, item_embedding=jnp.asarray(q, jnp.float32))
    got = qmodel.apply({"params": qparams}, x, method=lambda m, i: m.embed(i))
    want = model.apply({"params": deq}, x, method=lambda m, i: m.embed(i))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # Scores stay close to the float model's, and the bytes shrink.
    a, b = (
        np.asarray(_scores(model, params, x))[:, 1:],
        np.asarray(_scores(qmodel, qparams, x))[:, 1:],
    )
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))
    assert quantize.param_bytes(qparams) < 0.6 * quantize.param_bytes(params)


def test_int8_activations_quantize_the_inputs_of_every_product_too():
    model = _model()
    rng = np.random.default_rng(6)
    x = _inputs(model, rng)
    params = nn.unbox(model.init({"params": jax.random.key(3)}, x, train=False))["params"]
    weights_only = quantize.ptq(model, params)
    both = quantize.ptq(model, params, activations=True)

    def int8_products(qmodel, qparams):
        text = jax.jit(lambda p: _scores(qmodel, p, x)).lower(qparams).as_text()
        return sum(
            "xi8>" in line.split("->")[0] for line in text.splitlines() if "dot_general" in line
        )

    # Weights only: the products take dequantized weights; with activations,
    # int8 x int8 products appear.
    assert int8_products(*weights_only) == 0 < int8_products(*both)
    a = np.asarray(_scores(model, params, x))[:, 1:]
    b = np.asarray(_scores(*both, x))[:, 1:]
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))


def test_qat_model_trains_the_float_tree_and_its_forward_sees_int8_weights():
    model = _model()
    rng = np.random.default_rng(5)
    x = _inputs(model, rng)
    params = nn.unbox(model.init({"params": jax.random.key(2)}, x, train=False))["params"]
    qat = quantize.qat_model(model)
    assert jax.tree.structure(
        nn.unbox(qat.init({"params": jax.random.key(2)}, x, train=False))["params"]
    ) == jax.tree.structure(params)
    _, qparams = quantize.ptq(model, params)
    ref = np.asarray(_scores(quantize.ptq(model, params)[0], qparams, x))
    fake = np.asarray(_scores(qat, params, x))
    flt = np.asarray(_scores(model, params, x))
    # The fake-quantized forward matches the int8 model far better than the float one.
    assert np.max(np.abs(fake[:, 1:] - ref[:, 1:])) < 0.5 * np.max(np.abs(flt[:, 1:] - ref[:, 1:]))
    grads = jax.grad(lambda p: jnp.sum(_scores(qat, p, x)[:, 1:] ** 2))(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["blocks_0"]["mlp"]["wi"]["kernel"]).sum()) > 0


@pytest.mark.parametrize(
    "override, key",
    [
        ({"compress.variants": "pruned0"}, r"compress\.variants"),
        ({"compress.variants": "prune50"}, r"compress\.variants"),
        ({"compress.variants": "lowrank8"}, r"compress\.variants.*student\.embed_dim"),
        ({"compress.variants": "int8,int8"}, r"compress\.variants"),
        ({"compress.prune_scope": "row"}, r"compress\.prune_scope"),
        ({"compress.warmup_steps": 10}, r"compress\.warmup_steps"),
        ({"export.model": "student_kd_pruned80"}, r"export\.model"),
        ({"stages": "teacher,compress,student_kd"}, r"config\.stages.*compress\.source"),
        (
            {"stages": "teacher,student_kd,export,compress"},
            r"config\.stages.*'compress' before 'export'",
        ),
        ({"student.item_rank": 8}, r"student\.item_rank"),
    ],
)
def test_bad_compress_and_export_settings_name_their_key(override, key):
    config = synthetic.get_config("tiny")
    for k, v in override.items():
        section, name = k.split(".") if "." in k else (None, k)
        if section:
            config[section][name] = v
        else:
            config[name] = v
    with pytest.raises(config_lib.ConfigError, match=key):
        config_lib.validate(config)


def test_variant_names():
    assert [v.name for v in compress.parse_variants("pruned50, int8_qat,lowrank4")] == [
        "pruned50",
        "int8_qat",
        "lowrank4",
    ]
    config = synthetic.get_config("tiny")
    assert compress.variant_names(config) == [
        "student_kd_pruned50",
        "student_kd_int8",
        "student_kd_int8_qat",
        "student_kd_lowrank4",
    ]
