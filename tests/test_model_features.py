"""Models with item side features (models/features.py): fusion, cold rows, id dropout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from distill_jax.data import features as data_features
from distill_jax.models import SASRec
from distill_jax.models.features import ItemFeatures

V, D, L = 9, 8, 6


def _features(known=range(1, 8)) -> ItemFeatures:
    rng = np.random.default_rng(0)
    encoded = data_features.encode(
        {
            "genres": {i: tuple(sorted({1 + i % 3, 1 + i % 2})) for i in range(1, V + 1)},
            "year": {i: 1990 + i for i in range(1, V + 1)},
            "emb": {i: rng.normal(size=3).astype(np.float32) for i in range(1, V)},
        },
        V + 1,
    )
    return ItemFeatures.from_encoded(encoded, np.array(list(known)), V + 1)


def _model(fusion="sum", id_dropout=0.0, feats=None) -> SASRec:
    return SASRec(
        num_items=V,
        max_len=L,
        embed_dim=D,
        num_blocks=1,
        num_heads=1,
        mlp_dim=16,
        dropout_rate=0.0,
        item_features=feats if feats is not None else _features(),
        fusion=fusion,
        id_dropout=id_dropout,
    )


ITEMS = jnp.array([[0, 0, 1, 2, 3, 4], [5, 6, 7, 1, 2, 3]], jnp.int32)


def _init(model):
    return nn.unbox(model.init({"params": jax.random.key(0)}, ITEMS, train=False))["params"]


def test_from_encoded_pads_rows_and_marks_known_items():
    f = _features(known=[1, 2, 5])
    assert f.num_rows == V + 1 and f.names == ("genres",) and f.bag_sizes == (3,)
    np.testing.assert_array_equal(np.flatnonzero(f.known), [1, 2, 5])
    assert f.numeric.shape == (V + 1, 1) and f.dense.shape == (V + 1, 3)
    assert not f.dense[V].any()  # item V has no vector: the mean, 0
    padded = ItemFeatures.from_encoded(data_features.encode({}, V + 1), [1], 12)
    assert padded.num_rows == 12 and padded.bags == ()
    assert (
        "genres (3 categories)" in f.describe()
        and "6 rows scored by features alone" in f.describe()
    )


@pytest.mark.parametrize("fusion", ["sum", "concat", "gate"])
def test_every_fusion_scores_the_catalogue(fusion):
    model = _model(fusion)
    params = _init(model)
    hidden = model.apply({"params": params}, ITEMS, train=False)
    logits = model.apply({"params": params}, hidden[:, -1], method=model.logits)
    chex.assert_shape(logits, (2, V + 1))
    assert np.isneginf(logits[:, 0]).all() and np.isfinite(logits[:, 1:]).all()
    table, bias = model.apply({"params": params}, method=model.catalogue)
    chex.assert_shape((table, bias), [(V + 1, D), (V + 1,)])
    assert "feature_encoder" in params and ("fusion_layer" in params) == (fusion != "sum")


def test_an_unknown_item_is_scored_by_its_features_alone():
    model = _model("gate", feats=_features(known=range(1, 8)))
    params = _init(model)
    # Items 8 and 9 never occur in training: their id row and bias must not matter.
    changed = jax.tree.map(lambda x: x, params)
    changed["item_embedding"] = params["item_embedding"].at[8:].add(5.0)
    changed["output_bias"] = params["output_bias"].at[8:].add(5.0)
    changed["item_embedding"] = changed["item_embedding"].at[3].add(1.0)

    def scores(p):
        h = model.apply({"params": p}, ITEMS, train=False)
        return np.asarray(model.apply({"params": p}, h[:, -1], method=model.logits))

    moved = scores(changed)
    # Item 3's id row changed too, so hidden states move; the cold rows' table entries do not.
    t0, b0 = model.apply({"params": params}, method=model.catalogue)
    t1, b1 = model.apply({"params": changed}, method=model.catalogue)
    np.testing.assert_array_equal(t0[8:], t1[8:])
    np.testing.assert_array_equal(b1[8:], 0.0)
    assert not np.allclose(t0[3], t1[3]) and np.isfinite(moved[:, 1:]).all()
    # Features move a cold item: its row differs from another cold item's.
    assert not np.allclose(t0[8], t0[9])


def test_id_dropout_is_one_draw_per_item_and_only_in_training():
    model = _model(id_dropout=0.5, feats=_features(known=range(1, V + 1)))
    params = _init(model)
    # A trained bias is non-zero: a dropped item's must become zero.
    params["output_bias"] = jnp.arange(1.0, V + 2.0)
    rngs = {"id_dropout": jax.random.key(3)}
    t_eval, _ = model.apply({"params": params}, method=model.catalogue)
    t_a, b_a = model.apply({"params": params}, train=True, rngs=rngs, method=model.catalogue)
    t_b, _ = model.apply({"params": params}, train=True, rngs=rngs, method=model.catalogue)
    np.testing.assert_array_equal(t_a, t_b)  # the same key: the same items dropped
    feats = model.apply(
        {"params": params}, method=lambda m: m.feature_encoder()
    )  # the feature part alone
    is_feature_row = np.isclose(np.asarray(t_a), np.asarray(feats), rtol=1e-6).all(axis=1)
    dropped = np.flatnonzero(is_feature_row[1:]) + 1
    kept = np.setdiff1d(np.arange(1, V + 1), dropped)
    assert len(dropped) and len(kept)
    np.testing.assert_array_equal(np.asarray(b_a)[dropped], 0.0)
    np.testing.assert_array_equal(np.asarray(b_a)[kept], np.arange(1.0, V + 2.0)[kept])
    np.testing.assert_allclose(t_a[kept], t_eval[kept], rtol=1e-6)
    # The forward pass reads the table it is given.
    h_given = model.apply({"params": params}, ITEMS, train=False, table=t_a)
    h_eval = model.apply({"params": params}, ITEMS, train=False)
    assert not np.allclose(h_given, h_eval)


def test_feature_parameters_get_gradients():
    model = _model("concat")
    params = _init(model)

    def loss(p):
        h = model.apply({"params": p}, ITEMS, train=False)
        z = model.apply({"params": p}, h[:, -1], method=model.logits)
        return -jax.nn.log_softmax(z[:, 1:])[:, 2].sum()

    grads = jax.grad(loss)(params)
    enc = grads["feature_encoder"]
    for name in ("genres_embedding",):
        assert np.abs(enc[name]).sum() > 0
    assert np.abs(enc["numeric"]["kernel"]).sum() > 0 and np.abs(enc["dense"]["kernel"]).sum() > 0
    # Row 0 of a bag table is never read.
    np.testing.assert_array_equal(enc["genres_embedding"][0], 0.0)


def test_a_table_of_the_wrong_size_is_refused():
    model = _model(feats=ItemFeatures.from_encoded(data_features.encode({}, 4), [1], 4))
    with pytest.raises(ValueError, match="item_features has 4 rows for a table of 10"):
        _init(model)


def _batch():
    inputs = np.asarray(ITEMS)
    # Next-item slots: position p predicts inputs[row, p + 1].
    index, targets = [], []
    for row in range(inputs.shape[0]):
        for p in range(inputs.shape[1] - 1):
            if inputs[row, p]:
                index.append(row * inputs.shape[1] + p)
                targets.append(inputs[row, p + 1])
    n = len(index)
    return {
        "inputs": jnp.asarray(inputs),
        "target_index": jnp.asarray(index, jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "where": jnp.ones(n, bool).at[-1].set(False),
    }


def test_the_train_loss_uses_one_fused_table_for_inputs_and_outputs():
    import ml_collections

    from distill_jax.train import steps

    model = _model("gate", id_dropout=0.5, feats=_features(known=range(1, V + 1)))
    params = _init(model)
    batch = _batch()
    key = jax.random.key(7)
    got = float(steps.make_loss_fn(model, "train", None, None)(params, None, batch, key))

    table, bias = steps.catalogue(model, params, train=True, rng=jax.random.fold_in(key, 1))
    h = steps.hidden_at_targets(
        model, params, batch["inputs"], batch["target_index"], train=False, table=table
    )
    z = np.asarray(h, np.float64) @ np.asarray(table, np.float64).T + np.asarray(bias, np.float64)
    z[:, 0] = -np.inf
    z = z - z[:, 1:].max(1, keepdims=True)
    log_p = z - np.log(np.exp(z[:, 1:]).sum(1, keepdims=True))
    ce = -log_p[np.arange(len(z)), np.asarray(batch["targets"])]
    want = ce[np.asarray(batch["where"])].mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Another key drops other ids: another loss.
    other = steps.make_loss_fn(model, "train", None, None)(params, None, batch, jax.random.key(8))
    assert float(other) != got

    # Distillation between two featured models runs and trains the feature encoder.
    distill = ml_collections.ConfigDict(
        dict(
            method="soft",
            temperature=2.0,
            alpha=0.5,
            hard_k=1,
            ranking_k=10,
            ranking_loss="rd",
            ranking_lambda=1.0,
            hidden_weight=0.0,
        )
    )
    teacher = _model("sum", feats=model.item_features)
    t_params = _init(teacher)
    fn = steps.make_loss_fn(model, "distill", teacher, distill)
    loss, grads = jax.value_and_grad(fn)(params, t_params, batch, key)
    assert np.isfinite(float(loss))
    assert np.abs(grads["feature_encoder"]["genres_embedding"]).sum() > 0


def test_the_main_job_runs_with_features_on_the_synthetic_tastes(tmp_path):
    from configs import synthetic
    from distill_jax import pipeline

    config = synthetic.get_config("tiny")
    config.teacher.use_features = config.student.use_features = True
    config.stages = "teacher,student_kd"
    config.teacher.num_steps = config.student.num_steps = 12
    config.eval.every_steps = config.checkpoint.every_steps = 6
    pipeline.run(config, str(tmp_path))
    from distill_jax import workdir as workdir_lib

    result = workdir_lib.read_json(str(tmp_path / "student_kd" / "result.json"))
    assert np.isfinite(result["metrics"]["test"]["ndcg@10"])
    # Both models carry the feature encoder (the synthetic taste is their one feature).
    from distill_jax.data import dataset

    data = dataset.load(config, str(tmp_path))
    tastes = config.data.synthetic.num_tastes
    assert f"taste: {tastes} categories, up to 1 a row (100% of rows)" in data.info["item_features"]
    # ... and every user their favourite taste, added at every position of their windows.
    assert f"users: favourite_taste: {tastes} categories" in data.info["item_features"]
    np.testing.assert_array_equal(data.split.user_ids(), np.arange(1, len(data.split.train) + 1))
    assert len(data.split.item_features.known_items) <= config.data.synthetic.num_items
    # features.ignore leaves named features out (here the users' one).
    config.features.ignore = "favourite_taste"
    left = dataset.load(config, str(tmp_path / "ignored"))
    assert "favourite_taste" not in left.info["item_features"]
    assert f"taste: {tastes} categories" in left.info["item_features"]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("fusion", "mean", r"config.features.fusion='mean' is invalid: expected one of"),
        ("id_dropout", 1.0, r"config.features.id_dropout=1.0 is invalid"),
        ("text_dim", 0, r"config.features.text_dim=0 is invalid"),
    ],
)
def test_feature_settings_are_checked(key, value, match):
    from configs import synthetic
    from distill_jax import config_lib

    config = synthetic.get_config("tiny")
    config.features[key] = value
    with pytest.raises(Exception, match=match):
        config_lib.validate(config)


U = 4


def _user_features() -> ItemFeatures:
    encoded = data_features.encode(
        {
            "gender": {1: "F", 2: "M", 3: "F"},  # user 4 has none
            "age": {1: 20, 2: 35, 3: 50, 4: 41},
        },
        U + 1,
    )
    return ItemFeatures.from_encoded(encoded, np.arange(1, U + 1), U + 1)


def _user_model() -> SASRec:
    return _model().clone(user_features=_user_features())


def test_user_features_are_added_at_every_position_against_a_float64_reference():
    model = _user_model()
    params = _init(model)  # init creates the user encoder's parameters without user ids
    assert {"gender_embedding", "numeric"} <= set(params["user_encoder"])
    users = jnp.array([3, 4], jnp.int32)
    plain = model.apply({"params": params}, ITEMS, method=model.embed)
    with_users = model.apply({"params": params}, ITEMS, None, users, method=model.embed)
    # Reference: each user's gender embedding (none for user 4) plus the
    # projected standardised age, times sqrt(D), at every position.
    f, p = model.user_features, jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    enc = p["user_encoder"]
    ref = np.zeros((2, D))
    for r, u in enumerate(np.asarray(users)):
        ids = f.bags[0][u][f.bags[0][u] > 0]
        if len(ids):
            ref[r] += enc["gender_embedding"][ids].mean(0)
        ref[r] += f.numeric[u].astype(np.float64) @ enc["numeric"]["kernel"]
        ref[r] += enc["numeric"]["bias"]
    diff = np.asarray(with_users, np.float64) - np.asarray(plain, np.float64)
    chex.assert_shape(diff, (2, L, D))
    np.testing.assert_allclose(diff, np.broadcast_to(ref[:, None] * D**0.5, diff.shape), atol=1e-5)
    # User id 0 (a padding row, or a user without an id) adds nothing; so does no id at all.
    zero = model.apply({"params": params}, ITEMS, None, jnp.zeros(2, jnp.int32), method=model.embed)
    np.testing.assert_array_equal(zero, plain)
    # The users move the hidden states, and a model without user features ignores them.
    h = model.apply({"params": params}, ITEMS, train=False, users=users)
    assert not np.allclose(h, model.apply({"params": params}, ITEMS, train=False))
    bare = _model()
    bare_params = _init(bare)
    np.testing.assert_array_equal(
        bare.apply({"params": bare_params}, ITEMS, train=False, users=users),
        bare.apply({"params": bare_params}, ITEMS, train=False),
    )


def test_batches_carry_the_user_of_each_window():
    import functools

    from distill_jax.data import pipeline

    seqs = [np.arange(1, 9, dtype=np.int32), np.array([2, 3, 4], np.int32)]
    make = functools.partial(
        pipeline.TrainBatches,
        seqs,
        num_items=9,
        max_len=4,
        batch_size=4,
        causal=True,
        mask_prob=0.0,
        seed=0,
    )
    batches = make(users=[7, 3])
    batch = batches.window_batch(np.arange(batches.num_windows))
    # Windows are made user by user: the first user's come first.
    owners = [7] * (batches.num_windows - 1) + [3]
    np.testing.assert_array_equal(batch["users"][: batches.num_windows], owners)
    assert (batch["users"][batches.num_windows :] == 0).all()
    assert "users" not in make().batch(0)
    with pytest.raises(ValueError, match="1 user ids for 2 training sequences"):
        make(users=[1])
    hist = [np.array([1, 2]), np.array([3, 4, 5]), np.array([6])]
    (eval_batch,) = pipeline.eval_batches(
        hist,
        np.array([3, 6, 7]),
        num_items=9,
        max_len=4,
        batch_size=4,
        causal=True,
        user_ids=np.array([11, 12, 13]),
    )
    # Rows are ordered by history length; filler rows get user 0.
    np.testing.assert_array_equal(eval_batch["users"], [13, 11, 12, 0])


def test_the_train_loss_trains_the_user_encoder():
    from distill_jax.train import steps

    model = _user_model()
    params = _init(model)
    batch = {
        "inputs": ITEMS,
        "target_index": jnp.array([3, 4, 10, 11], jnp.int32),
        "targets": jnp.array([3, 4, 2, 3], jnp.int32),
        "where": jnp.array([True, True, True, False]),
        "users": jnp.array([1, 2], jnp.int32),
    }
    fn = steps.make_loss_fn(model, "train", None, None)
    _, grads = jax.value_and_grad(fn)(params, None, batch, jax.random.key(1))
    assert np.abs(grads["user_encoder"]["gender_embedding"]).sum() > 0
    without = {k: v for k, v in batch.items() if k != "users"}
    _, grads = jax.value_and_grad(fn)(params, None, without, jax.random.key(1))
    assert not np.abs(grads["user_encoder"]["gender_embedding"]).any()


def test_vocab_sharded_tables_with_features_are_refused():
    from configs import synthetic
    from distill_jax import models

    config = synthetic.get_config("tiny")
    config.teacher.use_features = True
    with pytest.raises(ValueError, match=r"config.teacher.use_features=True on a mesh that shards"):
        models.build_model(
            config.teacher,
            num_items=V,
            max_len=L,
            key_prefix="teacher",
            vocab_shards=2,
            item_features=object(),
            features_cfg=config.features,
        )


def test_a_teacher_stored_before_features_reads_none():
    import ml_collections

    from configs import base
    from distill_jax.train import ensemble

    like = base.model_config(use_features=True)
    stored = ml_collections.ConfigDict({"name": "sasrec", "embed_dim": 32})
    out = ensemble._stored_model_config(like, stored)
    assert out.use_features is False and out.embed_dim == 32
    stored.use_features = True
    assert ensemble._stored_model_config(like, stored).use_features is True


def test_the_features_variants_and_the_s3rec_attribute_file_beside_the_data(tmp_path):
    from configs import beauty, ml100k
    from distill_jax.data import dataset

    ml = ml100k.get_config("tiny,features")
    assert ml.teacher.use_features and ml.student.use_features
    assert (ml.data.cold_user_fraction, ml.data.cold_item_fraction) == (0.1, 0.3)
    cold = ml100k.get_config("cold")
    assert not cold.teacher.use_features and cold.data.cold_item_fraction == 0.3
    b = beauty.get_config("features")
    assert b.data.cold_item_rule == "random" and b.data.item_features_path == "auto"
    b.data.path = str(tmp_path / "Beauty.txt")
    files = dataset._side_files(b.data)
    assert files["item_features_path"] == str(tmp_path / "Beauty_item2attributes.json")
    ml.data.item_features_path = "auto"
    with pytest.raises(Exception, match=r"item_features_path='auto' names the S3-Rec"):
        dataset._side_files(ml.data)
    bad = ml100k.get_config("tiny")
    bad.data.update(path=str(tmp_path), cold_item_rule="newest")
    from distill_jax import config_lib

    with pytest.raises(Exception, match=r"config.data.cold_item_rule='newest' is invalid"):
        config_lib.validate(bad)


def test_each_model_may_set_its_own_id_dropout(tmp_path):
    """teacher.id_dropout / student.id_dropout override features.id_dropout (-1 keeps it);
    the scratch student takes the student's; an invalid rate names its key."""
    from configs import synthetic
    from distill_jax import config_lib, pipeline
    from distill_jax.data import dataset

    config = synthetic.get_config("tiny")
    config.teacher.use_features = config.student.use_features = True
    config.features.id_dropout = 0.5
    config.student.id_dropout = 0.1
    config_lib.validate(config)
    split = dataset.load(config, str(tmp_path)).split
    keys = {"teacher": "teacher", "student_kd": "student", "student_scratch": "student"}
    rates = {
        stage: pipeline.build(config, key, split, stage).id_dropout for stage, key in keys.items()
    }
    assert rates == {"teacher": 0.5, "student_kd": 0.1, "student_scratch": 0.1}
    config.teacher.id_dropout = 1.0
    with pytest.raises(Exception, match=r"config.teacher.id_dropout=1.0 is invalid"):
        config_lib.validate(config)
