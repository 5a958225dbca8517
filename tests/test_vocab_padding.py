"""Any catalogue size on a vocab-sharded mesh: the item table is padded to a
multiple of the 'model' axis, and nothing of the padding shows in losses,
gradients, logits, metrics or parameter counts."""

import json
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import synthetic
from distill_jax import models, recommend
from distill_jax import sharding as sharding_lib
from distill_jax.data import preprocess
from distill_jax.data import synthetic as synthetic_data
from distill_jax.data.pipeline import TrainBatches
from distill_jax.evaluation import evaluator as ev
from distill_jax.train import state as state_lib
from distill_jax.train import steps

MESHES = [(1, 1), (2, 4), (4, 2)]


def _config(num_items: int) -> ml_collections.ConfigDict:
    config = synthetic.get_config("tiny")
    config.data.synthetic.num_items = num_items
    config.distill.update(temperature=2.0, alpha=0.3)
    config.eval.batch_size = 64
    return config


def _mesh(data: int, model: int):
    return sharding_lib.make_mesh(
        ml_collections.ConfigDict({"data": data, "model": model}), jax.devices()[: data * model]
    )


def _init(model, rng):
    return nn.unbox(state_lib.init_params_fn(model)(rng))


def _padded(params, rows: int):
    """One-device params with the item table and bias zero-padded to `rows`."""
    out = dict(params)
    for name in ("item_embedding", "output_bias"):
        x = np.asarray(params[name])
        out[name] = np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])
    return out


def _real(params, num_rows: int):
    out = dict(params)
    for name in ("item_embedding", "output_bias"):
        out[name] = np.asarray(params[name])[:num_rows]
    return out


def _run(config, split, mesh, base_student, base_teacher):
    """One distillation step, the logits and the test metrics on `mesh`."""
    vocab = sharding_lib.vocab_shards(config, mesh)
    student = models.build_model(
        config.student, num_items=split.num_items, max_len=16, vocab_shards=vocab
    )
    teacher = models.build_model(
        config.teacher, num_items=split.num_items, max_len=16, vocab_shards=vocab
    )
    rules = sharding_lib.rules(config)
    state, shardings = state_lib.create_state(
        student, config.student, mesh, rules, jax.random.key(0)
    )
    state = state.replace(
        params=jax.device_put(_padded(base_student, student.num_rows), shardings.params)
    )
    t_shardings = state_lib.param_shardings(teacher, mesh, rules)
    t_params = jax.device_put(_padded(base_teacher, teacher.num_rows), t_shardings)
    step = steps.make_train_step(
        student,
        task="distill",
        mesh=mesh,
        state_shardings=shardings,
        teacher=teacher,
        teacher_shardings=t_shardings,
        distill_cfg=config.distill,
    )
    batches = TrainBatches(
        split.train,
        num_items=split.num_items,
        max_len=16,
        batch_size=config.student.batch_size,
        causal=True,
        mask_prob=0.2,
        seed=0,
        num_shards=8,
    )
    batch = batches.batch(0)
    logits = student.apply(
        {"params": _padded(base_student, student.num_rows)},
        student.apply(
            {"params": _padded(base_student, student.num_rows)}, batch["inputs"], train=False
        )[:, -1],
        method=student.logits,
    )
    state, metrics = step(state, t_params, sharding_lib.put_batch(batch, mesh), jax.random.key(3))
    scorer = ev.model_scorer(student, state.params, shardings.params)
    test = ev.Evaluator(split, config, mesh).evaluate(scorer, "test")
    return {
        "model": student,
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "params": jax.device_get(state.params),
        "logits": np.asarray(logits),
        "test": test,
    }


# 61 rows on a model axis of 4 (the main-job test below takes 62).
@pytest.mark.parametrize("num_items", [60])
def test_odd_catalogues_on_sharded_meshes_match_one_device(num_items):
    config = _config(num_items)
    split = preprocess.leave_one_out(synthetic_data.generate(config.data.synthetic, config.seed))
    base = {}
    for key in ("student", "teacher"):
        model = models.build_model(config[key], num_items=num_items, max_len=16)
        base[key] = jax.device_get(
            jax.jit(lambda r, m=model: _init(m, r))(jax.random.key(1 if key == "student" else 2))
        )
    results = {m: _run(config, split, _mesh(*m), base["student"], base["teacher"]) for m in MESHES}
    ref = results[(1, 1)]
    assert ref["model"].num_rows == num_items + 1  # one device: never padded
    for mesh_shape in MESHES[1:]:
        got = results[mesh_shape]
        model = got["model"]
        rows = model.num_rows
        assert rows % mesh_shape[1] == 0 and rows >= num_items + 1
        assert rows > num_items + 1 or (num_items + 1) % mesh_shape[1] == 0
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
        # After one Adam step the real rows moved exactly as on one device.
        real = _real(got["params"], num_items + 1)
        chex.assert_trees_all_close(real, ref["params"], rtol=1e-4, atol=1e-6)
        # Real columns score as on one device; padding columns are -inf.
        np.testing.assert_allclose(
            got["logits"][:, : num_items + 1], ref["logits"], rtol=1e-5, atol=1e-5
        )
        assert np.all(got["logits"][:, num_items + 1 :] == -np.inf)
        assert got["logits"].shape[-1] == rows
        for k, v in ref["test"].items():
            np.testing.assert_allclose(got["test"][k], v, rtol=1e-5, atol=1e-7, err_msg=k)
        # The padding rows are not parameters.
        assert model.param_counts(got["params"]) == ref["model"].param_counts(ref["params"])


def test_padded_rows_are_never_recommended():
    config = _config(61)
    split = preprocess.leave_one_out(synthetic_data.generate(config.data.synthetic, config.seed))
    model = models.build_model(config.student, num_items=61, max_len=16, vocab_shards=4)
    assert model.num_rows == 64
    params = _init(model, jax.random.key(0))
    # Even with huge output biases on the padding rows, no top-k holds them.
    params = dict(params)
    params["output_bias"] = np.asarray(params["output_bias"]).copy()
    params["output_bias"][62:] = 1e9
    mesh = _mesh(2, 4)
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    scorer = ev.model_scorer(model, jax.device_put(params, shardings), shardings)
    evaluator = ev.Evaluator(split, config, mesh)
    batches, _ = evaluator.batches(scorer, "test")
    batch = next(iter(batches))
    scores = np.asarray(scorer.score_fn(params, batch["inputs"]))
    chex.assert_shape(scores, (batch["inputs"].shape[0], 62))
    result = evaluator.evaluate(scorer, "test")
    assert 0 < result["coverage@10"] <= 1


def test_padding_ids_in_inputs_are_loud():
    config = _config(61)
    model = models.build_model(config.student, num_items=61, max_len=16, vocab_shards=4)
    params = _init(model, jax.random.key(0))
    items = np.array([[0, 5, 62]], np.int32)  # 62 is a padding row, not an item
    hidden = model.apply({"params": params}, items, train=False)
    assert np.isnan(np.asarray(hidden)).any()


def test_the_main_job_runs_on_a_catalogue_the_model_axis_does_not_divide(tmp_path):
    # 61 items: 62 table rows on a 'model' axis of 4. Issue 31 saw this die with
    # jax's IndivisibleError; the tables are now padded to a multiple of the axis.
    work = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "distill_jax.main",
        "--config=configs/synthetic.py:tiny",
        "--config.mesh.model=4",
        "--config.data.synthetic.num_items=61",
        "--config.loss.form=vocab_parallel",
        "--config.stages=teacher,student_kd,export",
        "--config.export.model=student_kd",
        "--config.teacher.num_steps=10",
        "--config.student.num_steps=10",
        f"--workdir={work}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IndivisibleError" not in out.stderr and "Traceback" not in out.stderr
    assert "mesh {'data': 2, 'model': 4}" in out.stdout
    for stage in ("teacher", "student_kd"):
        result = json.loads((work / stage / "result.json").read_text())
        assert 0 < result["metrics"]["test"]["ndcg@10"] <= 1
    # The padding rows are never recommended: every exported item is one of the 61.
    served = recommend.load(str(work / "export"))
    for history in (["1", "2", "3"], ["60", "61"], []):
        items = served.recommend(history).items
        assert items and all(1 <= int(i) <= 61 for i in items), items
