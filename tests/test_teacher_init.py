"""Tests for distill_jax.train.teacher_init against a float64 NumPy PCA."""

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import synthetic
from distill_jax import config_lib, models
from distill_jax import sharding as sharding_lib
from distill_jax.train import state as state_lib
from distill_jax.train import teacher_init

V = 63  # the (V+1)-row tables split evenly over a 'model' axis of 4


def _params(name, embed_dim, seed):
    config = synthetic.get_config("tiny")
    mcfg = config.teacher
    mcfg.update(name=name, embed_dim=embed_dim, mlp_dim=2 * embed_dim, num_heads=1)
    model = models.build_model(mcfg, num_items=V, max_len=mcfg.max_len, key_prefix="teacher")
    params = nn.unbox(state_lib.init_params_fn(model)(jax.random.key(seed)))
    return model, dict(jax.tree.map(np.asarray, params))


def _np_pca(teacher, d_s):
    """Float64 reference: rows 1..V centred, projected on the top d_s right singular vectors."""
    e = np.asarray(teacher["item_embedding"], np.float64)
    mean = e[1:].mean(0)
    _, _, vt = np.linalg.svd(e[1:] - mean, full_matrices=False)
    basis = vt[:d_s].T
    items = (e - mean) @ basis
    scale = d_s**-0.5 / np.sqrt(np.mean(items[1:] ** 2))
    pos = (np.asarray(teacher["position_embedding"], np.float64) + mean) @ basis
    out = {"item_embedding": items * scale, "position_embedding": pos * scale}
    if "mask_embedding" in teacher:
        out["mask_embedding"] = (np.asarray(teacher["mask_embedding"]) - mean) @ basis * scale
    return out


def _align_signs(got, want):
    """Eigenvectors are defined up to sign: flip each column of `got` to match `want`."""
    return np.sign(np.sum(got * want, axis=0, keepdims=True))


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_pca_tables_match_the_numpy_reference(name):
    _, teacher = _params(name, 16, seed=0)
    # A teacher table with a clear spectrum (distinct eigenvalues), as training leaves it.
    rng = np.random.default_rng(0)
    teacher["item_embedding"] = (
        rng.normal(size=(V + 1, 16))
        * np.geomspace(3.0, 0.1, 16)
        @ np.linalg.qr(rng.normal(size=(16, 16)))[0]
        + 0.5
    ).astype(np.float32)
    teacher["output_bias"] = rng.normal(size=(V + 1,)).astype(np.float32)
    _, student = _params(name, 4, seed=1)
    got = jax.device_get(teacher_init.pca_params(student, teacher))
    want = _np_pca(teacher, 4)
    signs = _align_signs(got["item_embedding"], want["item_embedding"])
    for key, ref in want.items():
        chex.assert_shape(got[key], student[key].shape)
        np.testing.assert_allclose(got[key] * signs.reshape(-1), ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got["output_bias"], teacher["output_bias"])
    # Same RMS as the student's initialiser (std D_s^-1/2) over the item rows.
    np.testing.assert_allclose(np.sqrt(np.mean(got["item_embedding"][1:] ** 2)), 0.5, rtol=1e-5)
    # The blocks keep the student's own init.
    chex.assert_trees_all_equal(got["blocks_0"], student["blocks_0"])
    chex.assert_trees_all_equal(got["final_norm"], student["final_norm"])


def test_initial_params_on_a_vocabulary_sharded_mesh_equals_one_device():
    assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
    config = synthetic.get_config("tiny")
    config.sharding.rules = tuple(
        (name, "model" if name == "vocab" else axis) for name, axis in config.sharding.rules
    )
    config.mesh.data, config.mesh.model = 2, 4
    mesh = sharding_lib.make_mesh(config.mesh)
    model, student = _params("sasrec", 8, seed=1)
    _, teacher = _params("sasrec", 16, seed=0)
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    assert teacher_init.initial_params("none", student, teacher, shardings, mesh) is student
    got = teacher_init.initial_params("pca", student, teacher, shardings, mesh)
    for leaf, sharding in zip(jax.tree.leaves(got), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sharding
    # The item table stays split along 'model': 64 rows, 16 per shard.
    assert got["item_embedding"].addressable_shards[0].data.shape == (16, 8)
    want = teacher_init.pca_params(student, teacher)
    signs = _align_signs(np.asarray(got["item_embedding"]), np.asarray(want["item_embedding"]))
    for key in ("item_embedding", "position_embedding"):
        np.testing.assert_allclose(
            np.asarray(got[key]) * signs.reshape(-1), want[key], rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match="init_from_teacher"):
        teacher_init.initial_params("svd", student, teacher, shardings, mesh)


def test_pca_refuses_a_wider_student_or_another_catalogue():
    _, teacher = _params("sasrec", 8, seed=0)
    _, wide = _params("sasrec", 16, seed=1)
    with pytest.raises(ValueError, match="student embed_dim=16 > teacher embed_dim=8"):
        teacher_init.pca_params(wide, teacher)
    _, student = _params("sasrec", 4, seed=1)
    student["item_embedding"] = student["item_embedding"][:-1]
    with pytest.raises(ValueError, match="same catalogue"):
        teacher_init.pca_params(student, teacher)


def test_config_check_names_the_key():
    config = synthetic.get_config("tiny")
    config.distill.init_from_teacher = "svd"
    with pytest.raises(config_lib.ConfigError, match="distill.init_from_teacher"):
        config_lib.validate(config)
    config = synthetic.get_config("tiny")
    config.distill.init_from_teacher = "pca"
    config.student.embed_dim = 2 * config.teacher.embed_dim
    with pytest.raises(config_lib.ConfigError, match="distill.init_from_teacher"):
        config_lib.validate(config)
