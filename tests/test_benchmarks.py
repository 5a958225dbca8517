"""benchmarks/: the ratios the distillation result is judged by, and the scripts beside them."""

import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    """benchmarks/NAME.py as a module (the caller puts benchmarks/ on sys.path
    first when the script imports a sibling)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return _load("quality")


def _model(ndcg: float, latency_ms: float) -> dict:
    return {
        "metrics": {"test": {"ndcg@10": ndcg}},
        "cost": {"latency_top10": {"batch_256": {"p50_ms": latency_ms}}},
    }


def test_ratios_are_per_seed_then_averaged(quality):
    reports = [
        {
            "models": {
                "teacher": _model(0.050, 200.0),
                "student_kd": _model(0.045, 30.0),
                "student_scratch": _model(0.040, 31.0),
            }
        },
        {
            "models": {
                "teacher": _model(0.060, 100.0),
                "student_kd": _model(0.048, 30.0),
                "student_scratch": _model(0.032, 29.0),
            }
        },
    ]
    out = {r["ratio"]: r for r in quality.ratios(reports)}
    kd_teacher = np.array([0.045 / 0.050, 0.048 / 0.060])
    kd_scratch = np.array([0.045 / 0.040, 0.048 / 0.032])
    latency = np.array([30.0 / 200.0, 30.0 / 100.0])
    for key, ref in [
        ("student_kd / teacher ndcg@10", kd_teacher),
        ("student_kd / student_scratch ndcg@10", kd_scratch),
        ("student_kd / teacher latency_b256", latency),
    ]:
        np.testing.assert_allclose(out[key]["per_seed"], ref, rtol=1e-12)
        np.testing.assert_allclose(out[key]["mean"], ref.mean(), rtol=1e-12)
        np.testing.assert_allclose(out[key]["std"], ref.std(ddof=1), rtol=1e-12)


def test_ratios_skip_models_a_run_did_not_train(quality):
    reports = [{"models": {"teacher": _model(0.05, 1.0), "student_kd": _model(0.04, 1.0)}}]
    names = [r["ratio"] for r in quality.ratios(reports)]
    assert names == ["student_kd / teacher ndcg@10", "student_kd / teacher latency_b256"]
    single = quality.ratios(reports)[0]
    assert single["std"] == 0.0 and single["per_seed"] == pytest.approx([0.8])


def test_distill_kernel_variants_agree_and_are_timed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports throughput.py beside it
    module = _load("distill_kernel")

    class Args:
        rows, items, d_teacher, d_student, row_block = 16, 33, 8, 4, 8
        variants = ["plain", "row_blocks"]
        rounds, calls = 1, 1

    # run() compiles every variant and checks its value and gradients
    # against the first before timing any of them.
    rows = module.run(Args)
    assert [r["variant"] for r in rows] == Args.variants
    assert rows[0]["ratio"] == 1.0
    assert all(r["median_ms"] > 0 and r["matmul_gflops"] > 0 for r in rows)
    with pytest.raises(ValueError, match="must divide"):
        Args.row_block = 5
        module.run(Args)


def test_a_search_point_means_the_same_for_both_students(monkeypatch):
    """benchmarks/search.py: a `student.X` grid value also replaces the scratch student's own X."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports quality.py beside it
    search = _load("search")
    from distill_jax import config_lib

    point = {"student.weight_decay": "0.1", "distill.temperature": "2"}
    overrides = search._point_overrides(point)
    assert sorted(overrides) == [
        "distill.temperature=2",
        "student.weight_decay=0.1",
        "student_scratch.weight_decay=0.1",
    ]
    config = search.load_config(
        str(ROOT / "configs" / "synthetic.py"),
        ["student_scratch.weight_decay=0.7", "student_scratch.dropout=0.3", *overrides],
    )
    kd = config_lib.stage_model_config(config, "student_kd", "student")
    scratch = config_lib.stage_model_config(config, "student_scratch", "student")
    assert kd.weight_decay == scratch.weight_decay == 0.1
    # A setting the grid does not cover keeps the scratch student's own value.
    assert scratch.dropout == 0.3 and kd.dropout == config.student.dropout


def test_boolean_overrides_parse_true_and_false(quality):
    from distill_jax import config_lib

    config = quality.load_config(
        str(ROOT / "configs" / "synthetic.py"),
        ["student.exclude_history=True", "student_scratch.exclude_history=false"],
    )
    assert config.student.exclude_history is True
    # -1 means "config.student's"; a boolean override of it takes 0 or 1.
    assert config.student_scratch.exclude_history == 0
    scratch = config_lib.stage_model_config(config, "student_scratch", "student")
    assert scratch.exclude_history is False
    config = quality.load_config(
        str(ROOT / "configs" / "synthetic.py"), ["teacher.exclude_history=False"]
    )
    assert config.teacher.exclude_history is False  # not bool("False")
    with pytest.raises(ValueError, match="expected true or false"):
        quality.load_config(str(ROOT / "configs" / "synthetic.py"), ["student.exclude_history=yes"])


def test_history_mass_against_a_hand_computed_example(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports quality.py beside it
    hm = _load("history_mass")
    # Column 0 is padding (never counted); items 1..4.
    scores = np.log(np.array([[9.0, 4.0, 3.0, 2.0, 1.0], [9.0, 1.0, 1.0, 1.0, 5.0]]))
    history = np.array([[1, 3, 0], [2, 0, 0]])
    out = hm.history_mass(scores, history, last_item=np.array([3, 2]))
    np.testing.assert_allclose(out["mass_on_history"], [0.6, 1 / 8])
    np.testing.assert_allclose(out["mass_on_last_item"], [0.2, 1 / 8])
    np.testing.assert_array_equal(out["top1_in_history"], [True, False])
    assert hm.repeat_share([np.array([5, 6, 5, 7]), np.array([1, 1])]) == 2 / 4


def test_missing_reports_names_the_seeds_and_the_stage(quality):
    assert quality.missing_reports([0, 1], [{"models": {}}, {"models": {}}], "/w") is None
    why = quality.missing_reports([0, 1, 2], [{"models": {}}, None, None], "/w")
    assert "[1, 2]" in why and "/w/seed_1" in why and "'report'" in why


def test_main_without_the_report_stage_says_so(quality, tmp_path, monkeypatch, capsys):
    # Before, a run whose stages left out 'report' trained every stage and then
    # failed on the missing report with a TypeError.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(
        "sys.argv",
        [
            "quality.py",
            f"--config={ROOT / 'configs' / 'synthetic.py'}:tiny",
            "--override=stages=popularity",
            "--seeds=0",
            f"--workdir={tmp_path}",
        ],
    )
    quality.main()
    out = capsys.readouterr().out
    assert "No table: seeds [0] wrote no report" in out
    assert (tmp_path / "seed_0" / "popularity" / "result.json").exists()
