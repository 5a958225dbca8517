"""The distillation methods beyond the soft target: cached soft labels, ensembles,
hidden-state matching, and hard labels through the main job."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import synthetic
from distill_jax import config_lib, pipeline, teachers
from distill_jax import sharding as sharding_lib
from distill_jax import workdir as workdir_lib
from distill_jax.data import dataset as dataset_lib
from distill_jax.data import soft_labels as soft_labels_lib
from distill_jax.data.pipeline import TrainBatches
from distill_jax.train import ensemble as ensemble_lib
from distill_jax.train import state as state_lib
from distill_jax.train import steps


def _config(**distill) -> ml_collections.ConfigDict:
    config = synthetic.get_config("tiny")
    config.teacher.num_steps = config.student.num_steps = 10
    config.distill.update(distill)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a finished tiny teacher, and the loaded data."""
    workdir = str(tmp_path_factory.mktemp("methods"))
    config = _config()
    config.stages = "teacher"
    pipeline.run(config, workdir)
    return workdir, dataset_lib.load(config, workdir)


def _link_teacher(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    os.symlink(os.path.join(src, "teacher"), os.path.join(dst, "teacher"))


def _batches(config, data, labels=None) -> TrainBatches:
    split = data.split
    return TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=config.student.max_len,
        batch_size=config.student.batch_size,
        causal=True,
        mask_prob=0.2,
        seed=config.seed,
        last_item_slot=config.distill.last_item_slot,
        soft_labels=labels,
    )


def _init(model, seed: int):
    return nn.unbox(state_lib.init_params_fn(model)(jax.random.key(seed)))


def _log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _stored(config, trained, tmp_path):
    """Writes the soft labels into a copy of the trained workdir; returns what a student reads."""
    src, data = trained
    workdir = str(tmp_path / "run")
    _link_teacher(src, workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    summary = teachers.write_soft_labels(config, data, mesh, workdir)
    student = workdir_lib.build(config, "student", data.split.num_items, "student_kd", mesh)
    source = teachers.distill_source(config, data.split, mesh, workdir, student, "student_kd")
    return workdir, mesh, summary, source


def test_cached_soft_labels_are_the_teachers_top_k_in_float64(trained, tmp_path):
    config = _config(method="cached", cache_k=8, temperature=0.7, last_item_slot=True)
    config.student.exclude_history = True
    _, data = trained
    _, mesh, summary, source = _stored(config, trained, tmp_path)
    batches = _batches(config, data, source.soft_labels)
    assert summary["slots"] == int(batches.slot_counts().sum())
    teacher = teachers.single_teacher(config, data.split.num_items, mesh, trained[0], "test")
    for step in (0, 3):
        batch = batches.batch(step)
        h = steps.hidden_at_targets(
            teacher.model, teacher.params, batch["inputs"], batch["target_index"], train=False
        )
        z = np.asarray(teacher.model.apply({"params": teacher.params}, h, method="logits"))
        z = z.astype(np.float64)
        seen = np.asarray(steps.history_columns(batch))
        for n in range(len(z)):
            z[n, seen[n][seen[n] > 0]] = -np.inf
        z[:, 0] = -np.inf
        log_p = _log_softmax64(z / 0.7)
        rows = np.flatnonzero(batch["kd_where"])
        assert len(rows) > np.sum(batch["where"])  # teacher-only slots are stored too
        for n in rows:
            top = np.argsort(-log_p[n], kind="stable")[:8]
            np.testing.assert_array_equal(np.sort(batch["cache_ids"][n]), np.sort(top))
            np.testing.assert_allclose(
                batch["cache_log_p"][n], log_p[n][batch["cache_ids"][n]], rtol=1e-5, atol=1e-5
            )
            rest = np.log(1 - np.exp(log_p[n][top]).sum())
            np.testing.assert_allclose(batch["cache_rest"][n], rest, rtol=1e-4, atol=1e-5)


def test_soft_labels_read_from_memory_or_record_by_record_agree(trained, tmp_path):
    """Both read paths of `SoftLabels`, on one data shard and on two, and a
    window whose stored slot count disagrees is refused on both."""
    config = _config(method="cached", cache_k=8, last_item_slot=True)
    workdir, _, summary, _ = _stored(config, trained, tmp_path)
    root = soft_labels_lib.directory(workdir)
    memory = soft_labels_lib.SoftLabels(root, summary["fingerprint"])
    records = soft_labels_lib.SoftLabels(root, summary["fingerprint"], in_memory_bytes=0)
    assert memory._arrays is not None and records._arrays is None
    counts = _batches(config, trained[1], memory).slot_counts()
    rows = np.random.default_rng(0).permutation(len(counts))[:9]
    n = 4 * int(counts[rows].sum())
    for shards, per_shard in ((1, 9), (2, 5)):
        a = memory.packed(rows, counts, shards, per_shard, n)
        b = records.packed(rows, counts, shards, per_shard, n)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    wrong = counts.copy()
    wrong[rows[4]] += 1
    for labels in (memory, records):
        with pytest.raises(ValueError, match=rf"window {rows[4]}: .*run soft_labels again"):
            labels.packed(rows, wrong, 1, 9, n)


def test_soft_labels_are_reused_and_refused_after_a_change(trained, tmp_path):
    config = _config(method="cached", cache_k=8)
    workdir, mesh, summary, _ = _stored(config, trained, tmp_path)
    path = soft_labels_lib.dataset_dir(soft_labels_lib.directory(workdir))
    stamp = os.stat(path).st_mtime_ns
    again = teachers.write_soft_labels(config, trained[1], mesh, workdir)
    assert again == summary and os.stat(path).st_mtime_ns == stamp  # reused, not rebuilt
    changed = _config(method="cached", cache_k=8, temperature=2.0)
    student = workdir_lib.build(changed, "student", trained[1].split.num_items, "student_kd", mesh)
    with pytest.raises(ValueError, match=r"fingerprint.*run the soft_labels stage again"):
        teachers.distill_source(changed, trained[1].split, mesh, workdir, student, "student_kd")
    rebuilt = teachers.write_soft_labels(changed, trained[1], mesh, workdir)
    assert rebuilt["fingerprint"] != summary["fingerprint"]
    teachers.distill_source(changed, trained[1].split, mesh, workdir, student, "student_kd")


def test_cached_loss_equals_the_soft_loss_when_every_item_is_stored(trained, tmp_path):
    """With K = V the rest bucket is empty and the K+1-bucket KL is the full KL."""
    _, data = trained
    num_items = data.split.num_items
    config = _config(method="cached", cache_k=num_items, temperature=1.5, alpha=0.3)
    config.distill.last_item_slot = True
    config.student.exclude_history = True
    _, mesh, _, source = _stored(config, trained, tmp_path)
    teacher = teachers.single_teacher(config, num_items, mesh, trained[0], "test")
    student = workdir_lib.build(config, "student", num_items, "student_kd", mesh)
    params = _init(student, 1)
    batch = _batches(config, data, source.soft_labels).batch(2)
    rng = jax.random.key(0)
    soft = config.distill.copy_and_resolve_references()
    soft.method = "soft"
    want = steps.make_loss_fn(student, "distill", teacher.model, soft, None, True)(
        params, teacher.params, batch, rng
    )
    got = steps.make_loss_fn(student, "distill", None, config.distill, None, True)(
        params, None, batch, rng
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_cached_loss_at_unit_temperature_takes_the_shared_softmax_path(alpha):
    """T = 1 as a Python number shares one softmax; as an array it takes the
    general path. Values and gradients agree, with teacher-only rows and an
    excluded column."""
    from distill_jax.losses import cached as cached_lib

    rng = np.random.default_rng(3)
    s = jnp.asarray(rng.normal(size=(9, 30)), jnp.float32).at[2, 4].set(-jnp.inf)
    t = jnp.asarray(rng.normal(size=(9, 30)), jnp.float32).at[2, 4].set(-jnp.inf)
    stored = cached_lib.top_k_soft_labels(t, 6, 1.0)
    labels = jnp.asarray(rng.integers(5, 30, size=9))
    where, label_where = jnp.arange(9) != 7, jnp.arange(9) % 3 != 0

    def loss(logits, temperature):
        return cached_lib.cached_distill(
            logits,
            *stored,
            labels,
            temperature=temperature,
            alpha=alpha,
            where=where,
            label_where=label_where,
        )

    shared, g_shared = jax.value_and_grad(loss)(s, 1.0)
    general, g_general = jax.value_and_grad(loss)(s, jnp.asarray(1.0))
    np.testing.assert_allclose(float(shared), float(general), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_shared), np.asarray(g_general), atol=1e-7)
    assert np.all(np.asarray(g_shared)[7] == 0) and np.all(np.isfinite(np.asarray(g_shared)))


def test_ensemble_log_probs_are_the_weighted_mixture_in_float64(trained):
    config = _config()
    _, data = trained
    num_items = data.split.num_items
    mesh = sharding_lib.make_mesh(config.mesh)
    models, params = [], []
    for seed, width in ((0, 16), (1, 8)):
        config.teacher.embed_dim, config.teacher.mlp_dim = width, 2 * width
        m = workdir_lib.build(config, "teacher", num_items, mesh=mesh)
        models.append(m)
        params.append(_init(m, seed))
    ens = ensemble_lib.Ensemble(tuple(models), (0.25, 0.75), ("a", "b"))
    assert ens.hidden_dim == 24
    inputs = jnp.asarray(np.random.default_rng(0).integers(1, num_items, (5, 16)), jnp.int32)
    pairs = zip(models, params, strict=True)
    hidden = tuple(m.apply({"params": p}, inputs, train=False)[:, -1] for m, p in pairs)
    got = np.asarray(ens.log_probs(tuple(params), hidden))
    mix = sum(
        w * np.exp(_log_softmax64(np.asarray(m.apply({"params": p}, h, method="logits"))))
        for m, p, h, w in zip(models, params, hidden, (0.25, 0.75), strict=True)
    )
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(got, np.log(mix), rtol=1e-5, atol=1e-5)


def test_ensemble_weights_and_members_are_checked_by_name():
    config = _config(method="ensemble", ensemble_weights="1,2")
    with pytest.raises(config_lib.ConfigError, match=r"distill\.ensemble_weights='1,2'.*3 weights"):
        config_lib.validate(config)
    config = _config(method="ensemble")
    config.stages = "student_kd,teacher_1"
    with pytest.raises(config_lib.ConfigError, match=r"'teacher_1' before the stages that use"):
        config_lib.validate(config)
    config = _config(method="soft")
    config.stages = "teacher,soft_labels,student_kd"
    with pytest.raises(config_lib.ConfigError, match=r"no 'soft_labels' stage.*'soft'"):
        config_lib.validate(config)
    config = synthetic.get_config("tiny,bert4rec")
    config.distill.method = "cached"
    with pytest.raises(config_lib.ConfigError, match=r"distill\.method='cached'.*masked-item"):
        config_lib.validate(config)
    with pytest.raises(config_lib.ConfigError, match=r"distill\.hidden_loss='l1'"):
        config_lib.validate(_config(hidden_loss="l1"))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_matches_numpy(kind):
    rng = np.random.default_rng(0)
    h, w, t = rng.normal(size=(6, 4)), rng.normal(size=(4, 7)), rng.normal(size=(6, 7))
    where = np.array([1, 1, 0, 1, 1, 0], bool)
    got = steps.hidden_loss(
        jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(t), where, kind
    )
    z = h @ w
    if kind == "mse":
        per_row = np.mean((z - t) ** 2, -1)
    else:
        per_row = 1 - np.sum(z * t, -1) / (np.linalg.norm(z, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(float(got), per_row[where].mean(), rtol=1e-5)


def test_ensemble_variant_with_hidden_matching_runs_the_main_job(tmp_path):
    """`configs/synthetic.py:tiny,ensemble` (compress and export left out for time)."""
    config = synthetic.get_config("tiny,ensemble")
    config.distill.hidden_weight = 0.5
    config.stages = config.stages.replace(",compress,export", "")
    # Fewer steps and one validation per stage: the suite's time, not the scores, is at stake.
    config.teacher.num_steps = config.student.num_steps = 12
    config.eval.every_steps = config.checkpoint.every_steps = 12
    assert config.stages.startswith("popularity,teacher,teacher_1,teacher_2,ensemble,student_kd")
    report = pipeline.run(config, str(tmp_path))
    models = report["models"]
    ens, kd = models["ensemble"], models["student_kd"]
    assert ens["params"] == 3 * models["teacher"]["params"]
    assert ens["members"] == ["teacher", "teacher_1", "teacher_2"]
    assert kd["teacher"] == "ensemble"
    # The hidden-matching projection trained with the student is not part of it.
    assert kd["params"] == models["student_scratch"]["params"]
    for name in ("ensemble", "student_kd"):
        assert 0 < models[name]["metrics"]["test"]["ndcg@10"] <= 1
    assert "agreement_with_teacher" in kd
    # Three teachers of seeds 0, 1, 2: three different models.
    scores = {models[t]["metrics"]["valid"]["ndcg@10"] for t in ens["members"]}
    assert len(scores) == 3
    assert "| ensemble |" in (tmp_path / "report.md").read_text()
    meta = json.loads((tmp_path / "teacher_1" / "result.json").read_text())
    assert meta["model"] == "sasrec"


def test_hard_labels_and_cached_run_through_the_main_job(trained, tmp_path):
    src, _ = trained
    for method, stages in (("hard", "student_kd"), ("cached", "soft_labels,student_kd")):
        config = _config(method=method, hard_k=2, cache_k=8, last_item_slot=True)
        config.stages = stages + ",report"
        workdir = tmp_path / method
        _link_teacher(src, str(workdir))
        report = pipeline.run(config, str(workdir))
        kd = report["models"]["student_kd"]
        assert kd["teacher"] == ("soft_labels" if method == "cached" else "teacher")
        assert np.isfinite(kd["curves"]["train"][-1][1])
        assert 0 < kd["metrics"]["test"]["hr@10"] <= 1
    assert report["soft_labels"]["k"] == 8
