"""End to end: the main job's `:tiny` variant in a temporary directory."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from distill_jax import pipeline


def test_tiny_main_job_writes_report_and_skips_finished_stages(tmp_path, capsys):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax.main",
            "--config=configs/synthetic.py:tiny",
            f"--workdir={workdir}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        # One device: the multi-device main job is test_multiprocess's; here one
        # device compiles each train step about 1.4x faster than 8 virtual ones.
        env=dict(
            os.environ,
            XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=1"),
        ),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    config = synthetic.get_config("tiny")
    assert report["config"]["distill"]["temperature"] == config.distill.temperature
    d = report["dataset"]
    assert d["users"] == config.data.synthetic.num_users
    assert d["items"] == config.data.synthetic.num_items
    assert d["interactions"] > 3 * d["users"]
    variants = {
        "student_kd_pruned50",
        "student_kd_int8",
        "student_kd_int8_qat",
        "student_kd_lowrank4",
    }
    assert set(report["models"]) == {
        "popularity",
        "teacher",
        "student_kd",
        "student_scratch",
        *variants,
    }
    for name, m in report["models"].items():
        if name == "popularity":
            continue
        assert isinstance(m["params"], int) and m["params"] > 0
        assert m["train_seconds"] > 0 or name == "student_kd_int8"  # post-training
        lat = m["cost"]["latency_top10"]
        assert set(lat) == {"batch_1", "batch_256"}
        assert 0 < lat["batch_1"]["p50_ms"] <= lat["batch_1"]["p99_ms"]
        for split in ("test", "valid"):
            metrics = m["metrics"][split]
            assert 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0, (name, metrics)
    # Teacher and both students: the students are the same size, smaller than the teacher.
    models = report["models"]
    assert models["student_kd"]["params"] == models["student_scratch"]["params"]
    assert models["student_kd"]["params"] < models["teacher"]["params"]
    md = (workdir / "report.md").read_text()
    assert "student_kd" in md and "ndcg@10" in md
    # Something was learnt: the teacher beats the chance level of ranking (10 / V).
    assert models["teacher"]["metrics"]["test"]["hr@10"] > 1.5 * 10 / d["items"]
    # The compressed variants: what each did, measured.
    pruned = models["student_kd_pruned50"]["compression"]
    assert pruned["sparsity"]["prunable"] == pytest.approx(0.5, abs=1e-3)
    int8 = models["student_kd_int8"]
    assert int8["param_bytes"] < 0.6 * models["student_kd"]["param_bytes"]
    low = models["student_kd_lowrank4"]
    assert low["params"] < models["student_kd"]["params"] and low["compression"]["svd"]["rank"] == 4
    # The default run ends with a servable artefact, and it serves.
    e = report["export"]
    assert e["model"] == config.export.model and e["same_top_k"]["identical_share"] == 1.0
    served = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax.recommend",
            f"--artifact={workdir / 'export'}",
            "--history=1,2,3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr
    assert len(served.stdout.strip().splitlines()) == config.export.top_k
    assert "student_kd_int8" in md and "Exported" in md

    # A re-run in the same workdir skips finished stages and gives the same report.
    again = pipeline.run(config, str(workdir))
    assert again["models"] == report["models"]

    # benchmarks/compress.py on the finished job (its stages are reused): every
    # model exported and timed, one table with the serving targets.
    from benchmarks import compress

    compress.main(
        ["compress", "--config=configs/synthetic.py:tiny", f"--workdir={workdir}", "--repeats=2"]
    )
    out = capsys.readouterr().out
    rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [r["model"] for r in rows] == ["teacher", "student_kd", *sorted(variants, key=_order)]
    for r in rows:
        assert r["same_top_k"] == 1.0 and r["artifact_bytes"] > 0
        assert set(r["latency"]) == {"batch_1", "batch_256"}
        assert (workdir / "benchmark_export" / r["model"] / "weights.npz").exists()
    assert "| student_kd_int8 |" in out and "target <= 1/3" in out


def _order(name: str) -> int:
    """The compress stage's order of its variants."""
    return ["pruned50", "int8", "int8_qat", "lowrank4"].index(name.removeprefix("student_kd_"))


def test_bert4rec_distillation_and_student_checkpoint_holds_no_teacher(tmp_path):
    config = synthetic.get_config("tiny,bert4rec")
    config.stages = "teacher,student_kd,report"
    # The distilled student starts from the teacher's projected tables (the
    # mask embedding included): the whole path of teacher_init runs here.
    config.distill.init_from_teacher = "pca"
    # Few steps (the tiny config already fixes one batch shape per stage): this
    # test is about what runs and what is saved, not about what is learnt.
    config.teacher.num_steps = config.student.num_steps = 6
    config.eval.every_steps = config.checkpoint.every_steps = 3
    config.eval.latency_repeats = 1
    config.eval.latency_batch_sizes = (1,)
    report = pipeline.run(config, str(tmp_path))
    assert set(report["models"]) == {"teacher", "student_kd"}
    assert report["models"]["student_kd"]["model"] == "bert4rec"
    assert report["models"]["student_kd"]["teacher"] == "teacher"
    # The student's checkpoint holds the student's train state and best params alone.
    ckpt_dir = tmp_path / "student_kd" / "checkpoints"
    step_dir = max((p for p in ckpt_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    tree = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata.tree
    shapes = [leaf.shape for leaf in jax.tree.leaves(tree["params"])]
    n = sum(int(np.prod(s)) for s in shapes)
    assert n == report["models"]["student_kd"]["params"]
    assert set(tree) == {"step", "params", "opt_state"}
    best = ocp.StandardCheckpointer().metadata(step_dir / "best").item_metadata.tree
    assert jax.tree.structure(best) == jax.tree.structure(tree["params"])


def test_each_student_stage_trains_with_its_own_settings(tmp_path, monkeypatch):
    """run_stage hands train_stage the stage's settings and builds its model from them."""
    config = synthetic.get_config("tiny")
    config.student.update(dropout=0.1, weight_decay=0.0)
    config.student_scratch.update(dropout=0.3, weight_decay=0.5)
    seen = {}

    def fake_train_stage(*, name, model, mcfg, **_):
        seen[name] = (mcfg.dropout, mcfg.weight_decay, model.dropout_rate)
        return types.SimpleNamespace(finished=False)

    monkeypatch.setattr(pipeline, "Evaluator", lambda *a, **k: None)
    monkeypatch.setattr(pipeline.loop, "train_stage", fake_train_stage)
    data = types.SimpleNamespace(split=types.SimpleNamespace(num_items=50))
    for stage in ("student_scratch", "teacher"):
        assert pipeline.run_stage(stage, config, data, None, str(tmp_path)) is None
    assert seen["student_scratch"] == (0.3, 0.5, 0.3)
    assert seen["teacher"] == (
        config.teacher.dropout,
        config.teacher.weight_decay,
        config.teacher.dropout,
    )
