"""The click task on the one trainer: batches, losses, the stages end to end, resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml100k_click
from distill_jax import config_lib, losses, pipeline
from distill_jax.data import clicks
from distill_jax.models.click import ClickModel
from distill_jax.train import click


def _split(n=10):
    rng = np.random.default_rng(0)
    return clicks.ClickSplit(
        categorical=rng.integers(0, 3, (n, 2)).astype(np.int32),
        numeric=rng.normal(size=(n, 1)).astype(np.float32),
        labels=(np.arange(n) % 2).astype(np.int8),
        users=np.arange(n),
        items=np.arange(n),
        times=np.arange(n, dtype=np.float64),
        history=rng.integers(0, 3, (n, 2)).astype(np.int32),
    )


def test_click_batches_visit_every_row_once_an_epoch():
    batches = click.ClickBatches(_split(), batch_size=4, seed=3)
    assert batches.steps_per_epoch == 3
    epoch = [batches.batch(s) for s in range(3)]
    labels = np.concatenate([b["labels"][b["where"]] for b in epoch])
    assert len(labels) == 10 and epoch[2]["where"].sum() == 2  # the last batch is padded
    again = click.ClickBatches(_split(), batch_size=4, seed=3)
    np.testing.assert_array_equal(again.batch(4)["numeric"], batches.batch(4)["numeric"])
    assert not np.array_equal(batches.batch(0)["numeric"], batches.batch(3)["numeric"])
    with pytest.raises(ValueError, match="multiple of num_shards=3"):
        click.ClickBatches(_split(), batch_size=4, seed=0, num_shards=3)


def test_losses_are_bce_and_binary_distillation():
    student = ClickModel((3, 3), 1, 4, mlp_dims=(8,))
    teacher = ClickModel((3, 3), 1, 4, num_cross=1, mlp_dims=(8,))
    batch = {k: jnp.asarray(v) for k, v in click.rows_batch(_split(), np.arange(7), 8).items()}
    init = lambda m, k: m.init(
        {"params": jax.random.key(k)}, batch["categorical"], batch["numeric"], train=False
    )["params"]
    sp, tp = init(student, 0), init(teacher, 1)
    s = np.asarray(
        student.apply({"params": sp}, batch["categorical"], batch["numeric"], train=False),
        np.float64,
    )
    y, w = np.asarray(batch["labels"], np.float64), np.asarray(batch["where"])
    ref = -(y * np.log(1 / (1 + np.exp(-s))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-s))))
    bce = click.make_loss_fn(student, None, None)(sp, None, batch, jax.random.key(0))
    np.testing.assert_allclose(bce, ref[w].mean(), rtol=1e-5)  # dropout 0: deterministic
    cfg = config_lib.ml_collections.ConfigDict({"temperature": 2.0, "alpha": 0.3})
    kd = click.make_loss_fn(student, teacher, cfg)(sp, tp, batch, jax.random.key(0))
    t = teacher.apply({"params": tp}, batch["categorical"], batch["numeric"], train=False)
    want = losses.binary_distill(
        s.astype(np.float32), t, batch["labels"], temperature=2.0, alpha=0.3, where=batch["where"]
    )
    np.testing.assert_allclose(kd, want, rtol=1e-5)


def test_the_scratch_student_and_the_baseline_may_have_their_own_settings():
    config = ml100k_click.get_config()
    config.click.update(logistic_learning_rate=0.0, logistic_weight_decay=-1.0)
    assert click._model_cfg(config, "student_scratch").learning_rate == 3e-3
    assert click._model_cfg(config, "student_kd").learning_rate == 1e-2
    assert click._model_cfg(config, "logistic").learning_rate == 1e-2
    assert click._model_cfg(config, "logistic").weight_decay == 0.0
    config.click.scratch_learning_rate = 0.0
    assert click._model_cfg(config, "student_scratch").learning_rate == 1e-2
    config.click.update(logistic_learning_rate=3e-2, logistic_weight_decay=0.1)
    logistic = click._model_cfg(config, "logistic")
    assert (logistic.learning_rate, logistic.weight_decay) == (3e-2, 0.1)
    assert (logistic.num_cross, logistic.mlp_dims) == (0, "")
    # The students keep theirs.
    assert click._model_cfg(config, "student_kd").weight_decay == 0.0


def test_platt_scaling_recovers_the_calibration_map():
    rng = np.random.default_rng(0)
    z = rng.normal(size=20000) * 2
    labels = (rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 0.7)))).astype(np.int8)
    a, b = click.platt_scaling(1 / (1 + np.exp(-z)), labels)
    assert abs(a - 0.5) < 0.05 and abs(b + 0.7) < 0.05
    with pytest.raises(ValueError, match="clicks and non-clicks"):
        click.platt_scaling(np.full(4, 0.3), np.ones(4))


def test_a_calibrated_teacher_gives_the_mapped_soft_labels():
    student = ClickModel((3, 3), 1, 4, mlp_dims=(8,))
    teacher = ClickModel((3, 3), 1, 4, num_cross=1, mlp_dims=(8,))
    batch = {k: jnp.asarray(v) for k, v in click.rows_batch(_split(), np.arange(7), 8).items()}
    sp = student.init({"params": jax.random.key(0)}, *click.inputs(batch), train=False)["params"]
    tp = teacher.init({"params": jax.random.key(1)}, *click.inputs(batch), train=False)["params"]
    cfg = config_lib.ml_collections.ConfigDict({"temperature": 1.5, "alpha": 0.2})
    got = click.make_loss_fn(student, teacher, cfg, (0.6, -0.3))(sp, tp, batch, jax.random.key(0))
    s = student.apply({"params": sp}, *click.inputs(batch), train=False)
    t = teacher.apply({"params": tp}, *click.inputs(batch), train=False)
    want = losses.binary_distill(
        s, 0.6 * t - 0.3, batch["labels"], temperature=1.5, alpha=0.2, where=batch["where"]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = click.make_loss_fn(student, teacher, cfg)(sp, tp, batch, jax.random.key(0))
    assert abs(float(plain) - float(got)) > 1e-4


def _interactions(path):
    """Even items are liked (rated 5), odd ones not (rated 1)."""
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,rating,timestamp"]
    for t in range(3000):
        u = int(rng.integers(40))
        i = int(rng.integers(60))
        rating = 5 if i % 2 == 0 else 1
        lines.append(f"u{u},i{i},{rating},{1_600_000_000 + 600 * t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(path):
    config = ml100k_click.get_config("tiny")
    config.data.update(source="interactions", path=str(path), rating_col="rating")
    config.click.history = 3  # the rows carry their users' earlier clicks
    config.click.calibrate_teacher = True
    config.click.scratch_learning_rate = 0.0  # every model at the lr above
    for m in (config.click.teacher, config.click.student):
        m.update(num_steps=60, batch_size=64, learning_rate=2e-2)
    config.eval.every_steps = config.checkpoint.every_steps = 20
    config.eval.batch_size = 256
    return config


def test_the_click_stages_run_end_to_end_and_resume_exactly(tmp_path):
    csv = _interactions(tmp_path / "clicks.csv")
    config = _config(csv)
    report = pipeline.run(config, str(tmp_path / "run"))
    assert list(report["models"]) == ["logistic", "teacher", "student_kd", "student_scratch"]
    for r in report["models"].values():
        test = r["metrics"]["test"]
        assert {"auc", "logloss", "ece", "reliability"} <= set(test)
        assert 0 <= test["ece"] <= 1 and test["logloss"] > 0
    # The pattern is learnt: every model ranks clicks far above chance.
    for r in report["models"].values():
        assert r["metrics"]["test"]["auc"] > 0.75
    assert "| teacher | dcn-v2 (1 cross) |" in (tmp_path / "run" / "report.md").read_text()
    assert "![reliability](plots/reliability.png)" in (tmp_path / "run" / "report.md").read_text()
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "run" / "plots" / "reliability.png")
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05
    # Stopped during the distillation and resumed: the same result as in one go.
    part = tmp_path / "part"
    assert pipeline.run(config, str(part), stop_at_step=33) is None
    assert pipeline.run(config, str(part)) is not None
    a = json.loads((tmp_path / "run" / "student_kd" / "result.json").read_text())
    b = json.loads((part / "student_kd" / "result.json").read_text())
    assert a["metrics"] == b["metrics"]
    assert a["teacher_calibration"] == b["teacher_calibration"] != [1.0, 0.0]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("stages", "teacher,compress", r"config.stages='teacher,compress' is invalid"),
        ("click.teacher.mlp_dims", "64,x", r"config.click.teacher.mlp_dims='64,x' is invalid"),
        ("click.valid_fraction", 0.3, r"config.click.valid_fraction=0.3 is invalid"),
        ("data.source", "synthetic", r"config.data.source='synthetic' is invalid"),
        ("task", "ranking", r"config.task='ranking' is invalid"),
        ("click.history", -1, r"config.click.history=-1 is invalid"),
    ],
)
def test_click_settings_are_checked(tmp_path, key, value, match):
    config = _config(tmp_path / "x.csv")
    config.click.train_fraction = 0.8
    *parents, last = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(Exception, match=match):
        config_lib.validate(config)


@pytest.mark.parametrize("module", ["ml100k_click", "beauty_click"])
@pytest.mark.parametrize("variant", [None, "tiny"])
def test_click_configs_validate(module, variant):
    import importlib

    config = importlib.import_module(f"configs.{module}").get_config(variant)
    config.data.path = "/data"
    config_lib.validate(config)
    assert config.task == "click" and click.stages(config)[-1] == "report"


def test_a_vocab_sharded_mesh_gives_the_one_device_result(tmp_path):
    csv = _interactions(tmp_path / "clicks.csv")
    results = {}
    for name, (data, model) in {"one": (8, 1), "sharded": (2, 4)}.items():
        config = _config(csv)
        config.stages = "teacher,student_kd"
        config.click.teacher.num_steps = config.click.student.num_steps = 20
        config.mesh.update(data=data, model=model)
        pipeline.run(config, str(tmp_path / name))
        results[name] = {
            stage: json.loads((tmp_path / name / stage / "result.json").read_text())
            for stage in ("teacher", "student_kd")
        }
    for stage in ("teacher", "student_kd"):
        a, b = results["one"][stage], results["sharded"][stage]
        assert a["params"] == b["params"]  # the padding rows are not parameters
        for key in ("auc", "logloss", "ece"):
            assert a["metrics"]["test"][key] == pytest.approx(b["metrics"]["test"][key], abs=2e-4)
