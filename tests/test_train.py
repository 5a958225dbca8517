"""The trainer: sharded steps equal single-device steps; resuming is exact."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import synthetic
from distill_jax import models
from distill_jax import sharding as sharding_lib
from distill_jax.data import preprocess
from distill_jax.data import synthetic as synthetic_data
from distill_jax.data.pipeline import TrainBatches
from distill_jax.train import loop, steps
from distill_jax.train import state as state_lib


def _config():
    config = synthetic.get_config("tiny")
    # 63 items: the (V+1)-row item table splits evenly over a 'model' axis of 2 or 4.
    config.data.synthetic.num_items = 63
    return config


@pytest.fixture(scope="module")
def split():
    config = _config()
    return preprocess.leave_one_out(synthetic_data.generate(config.data.synthetic, config.seed))


def _run_steps(config, split, mesh, task, n_steps=2, num_shards=8, loss_cfg=None):
    """Runs n_steps of `task` on `mesh`; returns (losses, params) on the host."""
    rules = sharding_lib.rules(config)
    student = models.build_model(
        config.student, num_items=split.num_items, max_len=config.student.max_len
    )
    state, shard = state_lib.create_state(student, config.student, mesh, rules, jax.random.key(1))
    teacher = t_params = t_shard = None
    if task == "distill":
        teacher = models.build_model(
            config.teacher, num_items=split.num_items, max_len=config.teacher.max_len
        )
        t_state, t_sh = state_lib.create_state(
            teacher, config.teacher, mesh, rules, jax.random.key(2)
        )
        t_params, t_shard = t_state.params, t_sh.params
    step = steps.make_train_step(
        student,
        task=task,
        mesh=mesh,
        state_shardings=shard,
        teacher=teacher,
        teacher_shardings=t_shard,
        distill_cfg=config.distill,
        loss_cfg=loss_cfg,
    )
    batches = TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=student.max_len,
        batch_size=config.student.batch_size,
        causal=True,
        mask_prob=0.2,
        seed=0,
        # The same packing for every mesh: identical batches, comparable losses.
        num_shards=num_shards,
        last_item_slot=task == "distill" and config.distill.last_item_slot,
    )
    losses = []
    for i in range(n_steps):
        state, metrics = step(
            state, t_params, sharding_lib.put_batch(batches.batch(i), mesh), jax.random.key(3)
        )
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


def _distill_config():
    config = _config()
    config.distill.update(temperature=2.0, alpha=0.3)
    return config


@pytest.fixture(scope="module")
def reference(split):
    """`reference(task)`: (losses, params) of the plain loss on one device, computed
    once per task for all the sharded and loss-impl tests that compare against it."""
    cache = {}

    def get(task):
        if task not in cache:
            config = _distill_config()
            single = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
            cache[task] = _run_steps(config, split, single, task)[:2]
        return cache[task]

    return get


@pytest.mark.parametrize("task", ["train", "distill"])
@pytest.mark.parametrize(
    "mesh_shape,vocab_axis", [((8, 1), None), ((2, 4), "model"), ((4, 2), "model")]
)
def test_sharded_step_matches_single_device(split, reference, task, mesh_shape, vocab_axis):
    assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
    config = _distill_config()
    config.sharding.rules = tuple(
        (name, vocab_axis if name == "vocab" else axis) for name, axis in config.sharding.rules
    )
    config.mesh.data, config.mesh.model = mesh_shape
    multi = sharding_lib.make_mesh(config.mesh)
    loss1, params1 = reference(task)
    loss8, params8, state8 = _run_steps(config, split, multi, task)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params8, params1
    )
    emb = state8.params["item_embedding"]
    # The item table really is split as the rules say (not silently replicated).
    expected_rows = split.num_items + 1
    if vocab_axis:
        expected_rows //= multi.shape["model"]
    assert emb.addressable_shards[0].data.shape[0] == expected_rows


@pytest.mark.parametrize("task", ["train", "distill"])
@pytest.mark.parametrize(
    "impl,mesh_shape", [("chunked", (1, 1)), ("vocab_parallel", (2, 4)), ("vocab_parallel", (4, 2))]
)
def test_loss_impls_match_the_plain_single_device_step(split, reference, task, impl, mesh_shape):
    config = _distill_config()
    config.sharding.rules = tuple(
        (name, "model" if name == "vocab" else axis) for name, axis in config.sharding.rules
    )
    config.mesh.data, config.mesh.model = mesh_shape
    mesh = sharding_lib.make_mesh(
        config.mesh, devices=jax.devices()[: mesh_shape[0] * mesh_shape[1]]
    )
    loss_cfg = config.loss.copy_and_resolve_references()
    loss_cfg.form = impl
    loss_cfg.chunk_size = 24  # 64 catalogue columns: chunks of 24, 24 and a padded 16
    want_loss, want_params = reference(task)
    got_loss, got_params, _ = _run_steps(config, split, mesh, task, loss_cfg=loss_cfg)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got_params, want_params
    )


def test_teacher_only_slots_sharded_step_matches_single_device(split, reference):
    config = _distill_config()
    config.distill.last_item_slot = True
    single = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    loss1, params1, _ = _run_steps(config, split, single, "distill")
    config.sharding.rules = tuple(
        (name, "model" if name == "vocab" else axis) for name, axis in config.sharding.rules
    )
    config.mesh.data, config.mesh.model = 2, 4
    loss8, params8, _ = _run_steps(config, split, sharding_lib.make_mesh(config.mesh), "distill")
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params8, params1
    )
    # The extra slots (and windows) change the loss against the labelled slots alone.
    assert np.all(np.isfinite(loss1)) and not np.allclose(loss1, reference("distill")[0])


def test_interrupted_run_resumes_to_the_same_parameters(split, tmp_path):
    config = _config()
    config.student.num_steps = 24
    config.eval.every_steps = 8
    config.checkpoint.every_steps = 8
    config.eval.patience = 0
    mesh = sharding_lib.make_mesh(config.mesh)
    model = models.build_model(
        config.student, num_items=split.num_items, max_len=config.student.max_len
    )

    def train(workdir, stop_at_step=None):
        return loop.train_stage(
            name="student_scratch",
            model=model,
            mcfg=config.student,
            config=config,
            split=split,
            workdir=str(workdir),
            mesh=mesh,
            stop_at_step=stop_at_step,
        )

    whole = train(tmp_path / "whole")
    first = train(tmp_path / "split", stop_at_step=12)  # pre-empted after step 12's checkpoint
    assert not first.finished and first.params is None
    second = train(tmp_path / "split")
    assert second.finished and second.steps_run == 24
    assert second.best_step == whole.best_step
    assert second.best_valid == whole.best_valid
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(second.params), jax.device_get(whole.params)
    )
    # A finished stage does not train again.
    again = train(tmp_path / "split")
    assert again.steps_run == 24


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_trimmed_batches_give_the_same_logits_as_full_windows(split, name):
    # Batches drop all-padding columns on the left; the model must not notice.
    config = _config()
    config.student.name = name
    config.student.max_len = 32
    model = models.build_model(config.student, num_items=split.num_items, max_len=32)
    params = nn.unbox(state_lib.init_params_fn(model)(jax.random.key(0)))
    batches = TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=32,
        batch_size=16,
        causal=model.is_causal,
        mask_prob=0.3,
        seed=0,
    )
    trimmed = [batches.batch(i) for i in range(batches.steps_per_epoch)]
    trimmed = [b for b in trimmed if b["inputs"].shape[1] < 32]
    assert trimmed, "no batch was trimmed; the test would check nothing"
    for b in trimmed[:2]:
        cut = 32 - b["inputs"].shape[1]
        S = b["inputs"].shape[1]
        row, pos = np.divmod(b["target_index"], S)
        full = dict(
            b, inputs=np.pad(b["inputs"], ((0, 0), (cut, 0))), target_index=row * 32 + pos + cut
        )
        got = steps.logits_at_targets(model, params, b, train=False)
        want = steps.logits_at_targets(model, params, full, train=False)
        w = b["where"]
        np.testing.assert_allclose(np.asarray(got)[w], np.asarray(want)[w], rtol=1e-5, atol=1e-5)


def _history_batch(split):
    batches = TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=16,
        batch_size=8,
        causal=True,
        mask_prob=0.0,
        seed=0,
    )
    return batches.batch(0)


def test_history_columns_are_each_slots_earlier_window_items_without_its_target(split):
    batch = _history_batch(split)
    got = np.asarray(steps.history_columns(batch))
    S = batch["inputs"].shape[1]
    checked = 0
    for n in np.nonzero(batch["where"])[0]:
        row, pos = divmod(int(batch["target_index"][n]), S)
        want = set(batch["inputs"][row, : pos + 1].tolist()) - {0, int(batch["targets"][n])}
        assert set(got[n].tolist()) - {0} == want
        checked += len(want)
    assert checked > 0


@pytest.mark.parametrize("task", ["train", "distill"])
def test_exclude_history_loss_matches_float64_reference(split, task):
    # The loss with exclude_history: softmaxes over the catalogue
    # without the slot's seen items (its target kept), for CE and both sides of
    # the KL; checked against NumPy in float64.
    config = _config()
    config.student.dropout = 0.0
    config.student.max_len = config.teacher.max_len = 16
    alpha, T = 0.3, 2.0
    config.distill.update(temperature=T, alpha=alpha)
    student = models.build_model(config.student, num_items=split.num_items, max_len=16)
    teacher = models.build_model(config.teacher, num_items=split.num_items, max_len=16)
    s_params = nn.unbox(state_lib.init_params_fn(student)(jax.random.key(0)))
    t_params = nn.unbox(state_lib.init_params_fn(teacher)(jax.random.key(1)))
    batch = _history_batch(split)
    loss_fn = steps.make_loss_fn(
        student,
        task,
        teacher if task == "distill" else None,
        config.distill,
        config.loss,
        exclude_history=True,
    )
    got = float(loss_fn(s_params, t_params, batch, jax.random.key(2)))

    s = np.asarray(steps.logits_at_targets(student, s_params, batch, train=False), np.float64)
    t = np.asarray(steps.logits_at_targets(teacher, t_params, batch, train=False), np.float64)
    S = batch["inputs"].shape[1]

    def log_softmax(x):
        x = x - x[np.isfinite(x)].max()
        return x - np.log(np.exp(x[np.isfinite(x)]).sum())

    def loss(exclude):
        total = []
        for n in np.nonzero(batch["where"])[0]:
            row, pos = divmod(int(batch["target_index"][n]), S)
            y = int(batch["targets"][n])
            keep = np.ones(s.shape[1], bool)
            keep[0] = False
            if exclude:
                keep[batch["inputs"][row, : pos + 1]] = False
                keep[y] = True
            ls = log_softmax(np.where(keep, s[n], -np.inf))[keep]
            ce = -ls[np.nonzero(keep)[0] == y][0]
            if task == "train":
                total.append(ce)
                continue
            lp = log_softmax(np.where(keep, t[n] / T, -np.inf))[keep]
            lq = log_softmax(np.where(keep, s[n] / T, -np.inf))[keep]
            total.append(alpha * ce + (1 - alpha) * T**2 * np.sum(np.exp(lp) * (lp - lq)))
        return float(np.mean(total))

    want = loss(exclude=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The exclusion changes the loss, so the comparison above checks it.
    assert abs(loss(exclude=False) - want) > 1e-3


def test_bfloat16_compute_keeps_float32_parameters_and_losses(split):
    # Mixed precision: parameters and optimiser state in float32, matmuls in
    # bfloat16, logits/logsumexp/losses in float32.
    config = _config()
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    loss32, params32, _ = _run_steps(config, split, mesh, "distill", num_shards=1)
    config.student.dtype = config.teacher.dtype = "bfloat16"
    loss16, params16, state16 = _run_steps(config, split, mesh, "distill", num_shards=1)
    for leaf in jax.tree.leaves(state16.params) + jax.tree.leaves(state16.opt_state):
        if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            assert leaf.dtype == jax.numpy.float32
    student = models.build_model(
        config.student, num_items=split.num_items, max_len=config.student.max_len
    )
    batch = TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=student.max_len,
        batch_size=config.student.batch_size,
        causal=True,
        mask_prob=0.2,
        seed=0,
    ).batch(0)
    logits = steps.logits_at_targets(student, params16, batch, train=False)
    assert logits.dtype == jax.numpy.float32
    assert np.all(np.isfinite(loss16))
    # bfloat16 has 8 bits of mantissa: close to, not equal to, float32.
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    assert loss16 != loss32


@pytest.mark.parametrize("target", ["hard", "ranking"])
def test_teacher_targets_train_the_student_on_a_sharded_mesh(split, target):
    """'hard' and 'ranking' run through the train step: finite, and the same on 8 devices."""
    config = _distill_config()
    config.distill.update(method=target, hard_k=3, ranking_k=5, last_item_slot=True)
    single = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    want, want_params, _ = _run_steps(config, split, single, "distill", n_steps=3)
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict({"data": 8, "model": 1}))
    got, got_params, _ = _run_steps(config, split, mesh, "distill", n_steps=3)
    assert all(np.isfinite(want)) and want[0] > 0
    np.testing.assert_allclose(got, want, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
