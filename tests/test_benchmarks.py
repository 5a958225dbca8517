"""benchmarks/: the ratios the distillation result is judged by, and the scripts beside them."""

import ast
import importlib
import json
import os
import pathlib

import numpy as np
import pytest

from benchmarks import (
    cold_start,
    common,
    distill_kernel,
    history_mass,
    large_catalog,
    preemption,
    quality,
    search,
)
from configs import synthetic
from distill_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
SYNTHETIC = str(ROOT / "configs" / "synthetic.py")


def _model(ndcg: float, latency_ms: float) -> dict:
    return {
        "metrics": {"test": {"ndcg@10": ndcg}},
        "cost": {"latency_top10": {"batch_256": {"p50_ms": latency_ms}}},
    }


def test_ratios_are_per_seed_then_averaged():
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


def test_ratios_skip_models_a_run_did_not_train():
    reports = [{"models": {"teacher": _model(0.05, 1.0), "student_kd": _model(0.04, 1.0)}}]
    names = [r["ratio"] for r in quality.ratios(reports)]
    assert names == ["student_kd / teacher ndcg@10", "student_kd / teacher latency_b256"]
    single = quality.ratios(reports)[0]
    assert single["std"] == 0.0 and single["per_seed"] == pytest.approx([0.8])


# --------------------------------------------------------------------------
# The package: plain imports, no sys.path edits, no private names between scripts.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_imports_alone_as_a_package_module(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py has no docstring"


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_edits_sys_path_or_imports_a_private_name(name):
    """Scripts share code through public helpers (benchmarks/common.py, ...), not
    through `sys.path` edits and each other's underscore names."""
    tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
    siblings = set(SCRIPTS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path":
            assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), (
                f"benchmarks/{name}.py:{node.lineno} uses sys.path"
            )
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert module.split(".")[0] not in siblings, (
                f"benchmarks/{name}.py:{node.lineno}: `from {module} import` is a "
                "sys.path import of a sibling; import it as benchmarks.X"
            )
            assert not any(a.name.startswith("_") for a in node.names), (
                f"benchmarks/{name}.py:{node.lineno} imports a private name from {module}"
            )
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in siblings - {name}
        ):
            assert not node.attr.startswith("_"), (
                f"benchmarks/{name}.py:{node.lineno} uses {node.value.id}.{node.attr}"
            )


# --------------------------------------------------------------------------
# One config grammar: --config=FILE[:variants] --config.KEY=VALUE, as distill_jax.main.
# --------------------------------------------------------------------------


def _quality_flags(*overrides: str):
    argv = ["quality", f"--config={SYNTHETIC}", *overrides, "--workdir=/unused"]
    return common.parse_flags(argv, quality.define_flags)


def test_boolean_overrides_parse_true_and_false():
    args = _quality_flags(
        "--config.student.exclude_history=True", "--config.student_scratch.exclude_history=0"
    )
    config = args.config
    assert config.student.exclude_history is True
    # -1 means "config.student's"; 0 and 1 are False and True.
    assert config.student_scratch.exclude_history == 0
    scratch = config_lib.stage_model_config(config, "student_scratch", "student")
    assert scratch.exclude_history is False
    config = _quality_flags("--config.teacher.exclude_history=False").config
    assert config.teacher.exclude_history is False  # not bool("False")
    with pytest.raises(SystemExit, match="Non-boolean argument to boolean flag"):
        _quality_flags("--config.student.exclude_history=yes")


def test_overrides_take_the_fields_types_and_name_the_bad_flag():
    args = _quality_flags(
        "--config.distill.temperature=2",
        "--config.student.embed_dim=12",
        "--config.data.path=/data/x.txt",
        "--config.eval.ks=(5, 20)",
    )
    c = args.config
    assert c.distill.temperature == 2.0 and isinstance(c.distill.temperature, float)
    assert c.student.embed_dim == 12 and isinstance(c.student.embed_dim, int)
    assert c.data.path == "/data/x.txt" and c.eval.ks == (5, 20)
    assert args.seeds == "0,1,2"
    with pytest.raises(SystemExit, match=r"--config.student.embed_dim=1.5"):
        _quality_flags("--config.student.embed_dim=1.5")
    with pytest.raises(SystemExit, match=r"no key of the config.*no_such_key.*configs/base.py"):
        _quality_flags("--config.student.no_such_key=1")
    # The former grammar is refused by name, not silently ignored.
    with pytest.raises(SystemExit, match="override"):
        _quality_flags("--override=distill.temperature=2")
    with pytest.raises(SystemExit, match="workdir"):
        common.parse_flags(["quality", f"--config={SYNTHETIC}"], quality.define_flags)


def test_help_prints_the_docstring_and_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_flags(["quality", "--help"], quality.define_flags, quality.__doc__)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Quality table" in out and "--seeds" in out and "--workdir" in out


def test_apply_overrides_parses_as_the_command_line_does():
    """A grid point's values are parsed exactly as the same `--config.KEY=V` flags."""
    texts = {
        "distill.temperature": "0.5",
        "student.num_steps": "6000",
        "student.exclude_history": "true",
        "distill.init_from_teacher": "pca",
        "eval.ks": "(5,10)",
    }
    base = synthetic.get_config()
    got = common.apply_overrides(base, texts, flag="--grid")
    want = _quality_flags(*[f"--config.{k}={v}" for k, v in texts.items()]).config
    for key in texts:
        section, name = key.split(".")
        assert got[section][name] == want[section][name]
        assert type(got[section][name]) is type(want[section][name])
    # The config it started from is unchanged.
    assert base.distill.temperature == synthetic.get_config().distill.temperature
    with pytest.raises(ValueError, match=r"--grid student.no_such_key=0.1: the config has no key"):
        common.apply_overrides(base, {"student.no_such_key": "0.1"}, flag="--grid")
    with pytest.raises(ValueError, match=r"--grid.*student.exclude_history=yes.*Non-boolean"):
        common.apply_overrides(base, {"student.exclude_history": "yes"}, flag="--grid")


# --------------------------------------------------------------------------
# search.py
# --------------------------------------------------------------------------


def test_a_search_point_means_the_same_for_both_students():
    """benchmarks/search.py: a `student.X` grid value also replaces the scratch student's own X."""
    base = common.apply_overrides(
        synthetic.get_config(),
        {"student_scratch.weight_decay": "0.7", "student_scratch.dropout": "0.3"},
        flag="--config",
    )
    point = {"student.weight_decay": "0.1", "distill.temperature": "2"}
    config = search.point_config(base, point)
    assert config.distill.temperature == 2.0
    assert config.student.weight_decay == config.student_scratch.weight_decay == 0.1
    kd = config_lib.stage_model_config(config, "student_kd", "student")
    scratch = config_lib.stage_model_config(config, "student_scratch", "student")
    assert kd.weight_decay == scratch.weight_decay == 0.1
    # A setting the grid does not cover keeps the scratch student's own value.
    assert scratch.dropout == 0.3 and kd.dropout == config.student.dropout
    # A boolean point reaches the scratch student's int field as 0 / 1 (-1: "student's").
    for text, value in [("true", 1), ("false", 0)]:
        config = search.point_config(base, {"student.exclude_history": text})
        assert config.student.exclude_history is bool(value)
        assert config.student_scratch.exclude_history == value
        scratch = config_lib.stage_model_config(config, "student_scratch", "student")
        assert scratch.exclude_history is bool(value)


def test_grid_values_split_outside_brackets():
    assert search.parse_grid(["distill.temperature=0.5,1.0", "eval.ks=(5,10),(10, 20)"]) == [
        ("distill.temperature", ["0.5", "1.0"]),
        ("eval.ks", ["(5,10)", "(10, 20)"]),
    ]
    config = search.point_config(synthetic.get_config(), {"eval.ks": "(10, 20)"})
    assert config.eval.ks == (10, 20)
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        search.parse_grid(["distill.temperature"])


def _row(stage, temperature, seed, valid, test=0.05):
    return {
        "stage": stage,
        "distill.temperature": temperature,
        "seed": seed,
        "valid_ndcg@10": valid,
        "test_ndcg@10": test,
        "best_step": 3000,
        "train_seconds": 10.0,
    }


def test_search_over_seeds_chooses_by_the_mean_validation():
    """The d=14 Beauty runs (BENCHMARKS.md): seed 1 alone would pick T=0.5,
    the mean over 3 seeds picks T=1."""
    valid = {"1.0": [0.06543, 0.06586, 0.06547], "0.5": [0.06538, 0.06626, 0.06507]}
    rows = [_row("student_kd", t, seed, v[seed]) for t, v in valid.items() for seed in range(3)]
    # A third point best on the one seed it finished is listed, never chosen.
    rows.append(_row("student_kd", "0.25", 0, 0.07))
    lines = search.summarise(rows, ["distill.temperature"], [0, 1, 2])
    by_t = {ln["point"]["distill.temperature"]: ln for ln in lines}
    np.testing.assert_allclose(by_t["1.0"]["valid_mean"], np.mean(valid["1.0"]), rtol=1e-12)
    np.testing.assert_allclose(by_t["0.5"]["valid_mean"], np.mean(valid["0.5"]), rtol=1e-12)
    assert [t for t, ln in by_t.items() if ln["chosen"]] == ["1.0"]
    assert not by_t["0.25"]["complete"]
    seed_1 = search.summarise([r for r in rows if r["seed"] == 1], ["distill.temperature"], [1])
    assert [ln["point"]["distill.temperature"] for ln in seed_1 if ln["chosen"]] == ["0.5"]


def _fake_teachers(tmp_path, seeds):
    for seed in seeds:
        teacher = tmp_path / f"quality/seed_{seed}/teacher"
        teacher.mkdir(parents=True)
        (teacher / "result.json").write_text("{}")


def test_search_runs_each_point_on_each_seed_with_its_teacher(tmp_path, monkeypatch, capsys):
    """--seeds trains every point once per seed, in WORKDIR/STAGE/POINT/seed_S, with
    config.seed set and the seed's own teacher where --teacher_workdir has {seed};
    the --config.KEY overrides reach every trial."""
    _fake_teachers(tmp_path, (0, 1))
    calls = []

    def fake_run(config, workdir):
        stage, d = config.stages, config.distill
        calls.append((stage, d.temperature, config.seed, workdir, d.alpha))
        # T=0.5 wins seed 0 by a little, T=1 wins seed 1 by more.
        valid = {(0.5, 0): 0.061, (1.0, 0): 0.060, (0.5, 1): 0.060, (1.0, 1): 0.063}
        out = pathlib.Path(workdir) / stage
        out.mkdir(parents=True, exist_ok=True)
        metrics = {"ndcg@10": valid[config.distill.temperature, config.seed]}
        (out / "result.json").write_text(
            json.dumps(
                {
                    "metrics": {"valid": metrics, "test": metrics},
                    "best_step": 1,
                    "train_seconds": 1.0,
                }
            )
        )

    monkeypatch.setattr(search.pipeline, "run", fake_run)
    workdir = tmp_path / "search"
    search.main(
        [
            "search",
            f"--config={SYNTHETIC}",
            "--config.distill.alpha=0.5",
            f"--teacher_workdir={tmp_path / 'quality' / 'seed_{seed}'}",
            "--seeds=0,1",
            "--grid=distill.temperature=0.5,1.0",
            "--stages=student_kd",
            f"--workdir={workdir}",
        ]
    )
    assert [(c[1], c[2]) for c in calls] == [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]
    assert {c[4] for c in calls} == {0.5}
    for _, t, seed, trial, _ in calls:
        assert trial == str(workdir / "student_kd" / f"temperature={t}" / f"seed_{seed}")
        assert os.path.realpath(os.path.join(trial, "teacher")) == str(
            tmp_path / f"quality/seed_{seed}/teacher"
        )
    table = capsys.readouterr().out
    assert "mean over seeds 0,1" in table
    chosen = [line for line in table.splitlines() if "**yes**" in line]
    assert len(chosen) == 1 and chosen[0].startswith("| student_kd | 1.0 | 0.0615 |")


def test_search_checks_every_point_before_the_first_trial(tmp_path, monkeypatch):
    _fake_teachers(tmp_path, (0,))
    calls = []
    monkeypatch.setattr(search.pipeline, "run", lambda config, workdir: calls.append(workdir))
    with pytest.raises(ValueError, match=r"--grid.*distill.temperature=warm"):
        search.main(
            [
                "search",
                f"--config={SYNTHETIC}",
                f"--teacher_workdir={tmp_path / 'quality' / 'seed_0'}",
                "--grid=distill.temperature=0.5,warm",
                f"--workdir={tmp_path / 'search'}",
            ]
        )
    assert calls == []


def test_search_seed_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="listed twice"):
        search.parse_seeds("0,1,0")
    with pytest.raises(ValueError, match="comma-separated integers"):
        search.parse_seeds("0,a")
    assert search.parse_seeds("") == [None]
    with pytest.raises(ValueError, match="no --seeds"):
        search.teacher_workdir("runs/seed_{seed}", None)
    assert search.teacher_workdir("runs/seed_{seed}", 2) == "runs/seed_2"
    assert search.teacher_workdir("runs/one", 2) == "runs/one"
    with pytest.raises(FileNotFoundError, match=r"\(seed 3\)"):
        search.main(
            [
                "search",
                f"--config={SYNTHETIC}",
                f"--teacher_workdir={tmp_path}/seed_{{seed}}",
                "--seeds=3",
                f"--workdir={tmp_path / 'w'}",
            ]
        )


# --------------------------------------------------------------------------
# The other scripts
# --------------------------------------------------------------------------


def test_distill_kernel_variants_agree_and_are_timed():
    class Args:
        rows, items, d_teacher, d_student, row_block = 16, 33, 8, 4, 8
        variants = ["plain", "row_blocks"]
        rounds, calls = 1, 1

    # run() compiles every variant and checks its value and gradients
    # against the first before timing any of them.
    rows = distill_kernel.run(Args)
    assert [r["variant"] for r in rows] == Args.variants
    assert rows[0]["ratio"] == 1.0
    assert all(r["median_ms"] > 0 and r["matmul_gflops"] > 0 for r in rows)
    with pytest.raises(ValueError, match="must divide"):
        Args.row_block = 5
        distill_kernel.run(Args)


def test_distill_kernel_flags_reach_run():
    args = common.parse_flags(
        ["distill_kernel", "--rows", "32", "--variants=plain,cpu_kernel"],
        distill_kernel.define_flags,
    )
    assert args.rows == 32 and args.variants == ["plain", "cpu_kernel"] and args.rounds == 8


def test_history_mass_against_a_hand_computed_example():
    # Column 0 is padding (never counted); items 1..4.
    scores = np.log(np.array([[9.0, 4.0, 3.0, 2.0, 1.0], [9.0, 1.0, 1.0, 1.0, 5.0]]))
    history = np.array([[1, 3, 0], [2, 0, 0]])
    out = history_mass.history_mass(scores, history, last_item=np.array([3, 2]))
    np.testing.assert_allclose(out["mass_on_history"], [0.6, 1 / 8])
    np.testing.assert_allclose(out["mass_on_last_item"], [0.2, 1 / 8])
    np.testing.assert_array_equal(out["top1_in_history"], [True, False])
    assert history_mass.repeat_share([np.array([5, 6, 5, 7]), np.array([1, 1])]) == 2 / 4


def _distill_loss_reference(v, n, d_s, d_t, seed, temperature, alpha):
    """float64 `alpha·CE + (1 − alpha)·T²·KL` on large_catalog.py's synthetic inputs
    (the same generator calls, in the same order)."""
    rng = np.random.default_rng(seed)
    rows = v + 1

    def normal(shape, scale):
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        return x.astype(np.float64)

    h_s, table_s, bias_s = normal((n, d_s), 1.0), normal((rows, d_s), d_s**-0.5), normal(rows, 0.1)
    h_t, table_t, bias_t = normal((n, d_t), 1.0), normal((rows, d_t), d_t**-0.5), normal(rows, 0.1)
    labels = rng.integers(1, rows, size=n, dtype=np.int32)

    def log_softmax(z):
        z = z.copy()
        z[:, 0] = -np.inf  # The padding column.
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    s, t = h_s @ table_s.T + bias_s, h_t @ table_t.T + bias_t
    log_ps, log_pt = log_softmax(s / temperature), log_softmax(t / temperature)
    # Column 0 (padding) has no teacher mass: the KL runs over the items.
    pt = np.exp(log_pt[:, 1:])
    kl = (pt * (log_pt[:, 1:] - log_ps[:, 1:])).sum(axis=1)
    ce = -log_softmax(s)[np.arange(n), labels]
    return float(np.mean(alpha * ce + (1 - alpha) * temperature**2 * kl))


def test_large_catalog_workers_run_as_package_modules(capsys):
    """Each (V, impl) runs in `python -m benchmarks.large_catalog --worker`; both
    impls report the loss of a float64 reference on the same inputs."""
    v, n, d_s, d_t, temperature, alpha = 40, 8, 4, 8, 2.0, 0.25
    large_catalog.main(
        [
            "large_catalog",
            f"--sizes={v}",
            f"--positions={n}",
            f"--d_student={d_s}",
            f"--d_teacher={d_t}",
            "--chunk_size=16",
            "--repeats=1",
            "--min_time_s=0",
            f"--temperature={temperature}",
            f"--alpha={alpha}",
            "--timeout_s=600",
        ]
    )
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    rows = {r["impl"]: r for r in lines if "impl" in r}
    assert set(rows) == {"plain", "chunked"}, rows
    want = _distill_loss_reference(v, n, d_s, d_t, 0, temperature, alpha)
    for impl, row in rows.items():
        assert "error" not in row, row
        np.testing.assert_allclose(row["loss"], want, rtol=1e-5, err_msg=impl)
    assert rows["plain"]["rows_scored"] == v + 1 and rows["chunked"]["rows_scored"] == 48


# --------------------------------------------------------------------------
# quality.py
# --------------------------------------------------------------------------


def test_missing_reports_names_the_seeds_and_the_stage():
    assert quality.missing_reports([0, 1], [{"models": {}}, {"models": {}}], "/w") is None
    why = quality.missing_reports([0, 1, 2], [{"models": {}}, None, None], "/w")
    assert "[1, 2]" in why and "/w/seed_1" in why and "'report'" in why
    assert "--config.stages" in why


def test_main_without_the_report_stage_says_so(tmp_path, monkeypatch, capsys):
    # Before, a run whose stages left out 'report' trained every stage and then
    # failed on the missing report with a TypeError.
    monkeypatch.chdir(ROOT)
    quality.main(
        [
            "quality",
            f"--config={SYNTHETIC}:tiny",
            "--config.stages=popularity",
            "--seeds=0",
            f"--workdir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert "No table: seeds [0] wrote no report" in out
    assert (tmp_path / "seed_0" / "popularity" / "result.json").exists()


def test_quality_draws_the_figures_over_seeds(tmp_path, capsys):
    quality.main(
        [
            "quality",
            f"--config={SYNTHETIC}:tiny",
            "--config.stages=popularity,report",
            "--seeds=0,1",
            f"--workdir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert "| popularity |" in out
    # Popularity alone: no training curves and no teacher to agree with.
    for name in ("quality_size", "long_tail"):
        assert f"{tmp_path / 'plots' / name}.png" in out
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 10_000
    assert not (tmp_path / "plots" / "curves.png").exists()


# benchmarks/compress.py: tests/test_pipeline.py runs it on the finished tiny main job.


def _cold_report(cold_hr: float, warm_ndcg: float, kd_bonus: float) -> dict:
    def metrics(hr, ndcg):
        m = {"hr@10": hr, "ndcg@10": ndcg, "tail_ndcg@10": ndcg / 2, "coverage@10": 0.5}
        return m

    models = {}
    for name in cold_start.MODELS:
        bonus = kd_bonus if name == "student_kd" else 0.0
        models[name] = {
            "metrics": {
                "test": metrics(0.1, warm_ndcg),
                "cold_items": metrics(cold_hr + bonus, (cold_hr + bonus) / 2),
                "cold_users": metrics(0.05 + bonus, 0.02 + bonus),
            }
        }
    counts = {"warm_users": 9, "cold_users": 2, "cold_item_users": 3}
    return {"dataset": {"name": "d", "split_counts": counts}, "models": models}


def test_cold_start_table_and_its_checks(tmp_path, capsys):
    for sub, seed, report in (
        ("without", 0, _cold_report(0.0, 0.050, 0.0)),
        ("without", 1, _cold_report(0.001, 0.052, 0.0)),
        ("with", 0, _cold_report(0.20, 0.0505, 0.01)),
        ("with", 1, _cold_report(0.22, 0.0500, 0.01)),
        ("with", 2, _cold_report(0.5, 0.1, 0.0)),  # no id-only run for seed 2: left out
    ):
        (tmp_path / sub / f"seed_{seed}").mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"seed_{seed}" / "report.json").write_text(json.dumps(report))
    cold_start.main(
        ["cold_start", f"--without={tmp_path / 'without'}", f"--with={tmp_path / 'with'}"]
    )
    out = capsys.readouterr().out
    assert "mean ± std over seeds [0, 1]" in out and "**cold_items**" in out
    # teacher, no features: cold-item HR@10 over seeds 0 and 1.
    assert "| teacher | no | 0.0005 ± 0.0007 |" in out
    assert "[held] teacher: cold-item HR@10 0.0005 without features, 0.2100 with" in out
    # Warm NDCG: 0.05025 against 0.051 is 0.985 x: held.
    assert "[held] teacher: warm test NDCG@10 0.0503 with features against 0.0510" in out
    assert "[held] with features, cold_users hr@10: student_kd 0.0600" in out
    with pytest.raises(SystemExit, match="No seed of"):
        cold_start.main(["cold_start", f"--without={tmp_path}", f"--with={tmp_path}"])


def test_cold_start_fills_the_new_item_figures_from_a_refresh_file(tmp_path, capsys):
    """Older reports lack new_hr@10; cold_items_refresh.json supplies them, report values win."""
    for sub, new_hr in (("without", 0.05), ("with", 0.30)):
        for seed in (0, 1):
            d = tmp_path / sub / f"seed_{seed}"
            d.mkdir(parents=True)
            report = _cold_report(0.0, 0.05, 0.0)
            (d / "report.json").write_text(json.dumps(report))
            assert cold_start._lacking(report) == list(cold_start.TRAINED)
            refresh = {
                m: {
                    "cold_items": {
                        "new_hr@10": new_hr + seed / 100,
                        "new_ndcg@10": 0.1,
                        "hr@10": 0.9,
                    }
                }
                for m in cold_start.TRAINED
            }
            (d / cold_start.REFRESH).write_text(json.dumps(refresh))
            merged = cold_start._report(str(tmp_path / sub), seed)
            assert merged["models"]["teacher"]["metrics"]["cold_items"]["hr@10"] == 0.0
            assert cold_start._lacking(merged) == []
    cold_start.main(
        [
            "cold_start",
            f"--without={tmp_path / 'without'}",
            f"--with={tmp_path / 'with'}",
            "--seeds=0,1",
        ]
    )
    out = capsys.readouterr().out
    assert "| teacher | yes | 0.0000 ± 0.0000 | 0.0000 ± 0.0000 |" in out
    assert (
        "[held] teacher: cold-item new_hr@10 (among the new items alone) 0.0550 without "
        "features, 0.3050 with (gain 0.2500 ± 0.0000)" in out
    )


def test_compile_time_compiles_every_shape_of_the_first_epoch(capsys):
    from benchmarks import compile_time

    rows = compile_time.main(
        [
            "compile_time",
            f"--config={SYNTHETIC}:tiny",
            "--config.data.fixed_shapes=False",
            "--config.student.max_len=8",
            "--model=student",
            "--threads=1,2",
        ]
    )
    assert [r["threads"] for r in rows] == [1, 2]
    # Length buckets: more than one shape, the same ones for both thread counts.
    assert rows[0]["shapes"] == rows[1]["shapes"] > 1
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows)
    assert capsys.readouterr().out.count('"threads"') == 2


def test_quality_prints_the_click_table_and_its_checks():
    def report(t, kd, sc):
        models = {}
        for name, auc, loss in (
            ("teacher", t, 0.5),
            ("student_kd", kd, 0.52),
            ("student_scratch", sc, 0.55),
        ):
            m = {"auc": auc, "logloss": loss, "ece": loss / 10}
            models[name] = {"params": 10, "metrics": {s: dict(m) for s in quality.CLICK_SLICES}}
        return {"task": "click", "dataset": {"name": "d", "counts": {}}, "models": models}

    lines = quality.click_table([report(0.80, 0.76, 0.70), report(0.82, 0.78, 0.72)], [0, 1])
    text = "\n".join(lines)
    assert "| teacher | 10 | 0.8100 ± 0.0141 |" in text
    # (0.76 - 0.70) / (0.80 - 0.70) = 0.6 on both seeds.
    assert "- gap_closed: 0.6000 ± 0.0000 (per seed: 0.6000, 0.6000)" in text
    assert "- kd_logloss_minus_scratch: -0.0300 ± 0.0000" in text


def test_merge_adds_the_models_of_another_workdir(tmp_path):
    for seed in (0, 1):
        d = tmp_path / "other" / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({"models": {"a": {"x": seed}, "b": {"x": 9}}}))
    reports = [{"models": {"a": {"x": -1}}}, {"models": {"a": {"x": -2}}}]
    quality.merge(reports, [0, 1], [str(tmp_path / "other")])
    assert reports[1]["models"] == {"a": {"x": -2}, "b": {"x": 9}}  # its own 'a' kept
    with pytest.raises(SystemExit, match="seed 2 not run there"):
        quality.merge([{"models": {}}], [2], [str(tmp_path / "other")])


def test_preemption_reads_where_a_killed_run_got_to():
    t = "2026-12-06 00:26:04,624 INFO "
    assert preemption.reached("") == "start-up"
    assert preemption.reached(t + "data synthetic(seed=0): 120 users\n") == "data"
    log = (
        f"{t}data synthetic(seed=0): 120 users\n"
        f"{t}[teacher] 164 training windows, 6 steps/epoch, 6 steps\n"
        f"{t}[teacher] step 4/6 loss 4.4555 grad_norm 0.975\n"
        f"{t}[teacher] step 4 valid hr@10=0.2750 (best)\n"
    )
    assert preemption.reached(log) == "teacher@4"
    assert preemption.reached(log + f"{t}[student_kd] 164 training windows\n") == "student_kd"


# --------------------------------------------------------------------------
# pipeline_time.py
# --------------------------------------------------------------------------


def test_pipeline_time_runs_each_loss_form_and_tabulates_the_stages(tmp_path, capsys, monkeypatch):
    """Two forms of a tiny main job, each in a process of its own: the stage seconds
    the pipeline wrote, the ratios, both variants' metrics and the machine in the JSON."""
    from benchmarks import pipeline_time

    # The runs on one device, as in test_pipeline.py: 8 virtual ones only slow the compiles.
    monkeypatch.setenv(
        "XLA_FLAGS",
        os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=1"),
    )

    steps = "4"
    pipeline_time.main(
        [
            "pipeline_time",
            f"--config={SYNTHETIC}:tiny",
            "--config.stages=teacher,report",
            f"--config.teacher.num_steps={steps}",
            "--config.teacher.warmup_steps=1",
            f"--config.eval.every_steps={steps}",
            f"--config.checkpoint.every_steps={steps}",
            "--config.eval.latency_repeats=1",
            "--config.eval.latency_batch_sizes=(1,)",
            "--variants=dense,auto",
            "--matmul_size=64",
            f"--workdir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert "| stage | dense s | auto s | auto/dense |" in out
    for row in ("data", "teacher", "  teacher: training", "report", "total wall time"):
        assert f"| {row} | " in out, row
    assert "| model | hr@10 dense | hr@10 auto | ndcg@10 dense | ndcg@10 auto |" in out
    assert "| teacher | 0." in out
    result = json.loads((tmp_path / "pipeline_time.json").read_text())
    assert result["variants"] == ["dense", "auto"]
    m = result["machine"]
    assert {"commit", "date", "cpu", "cores", "allocator", "tcmalloc_preloaded"} <= set(m)
    assert m["matmul_64_gflops"] > 0
    for form in ("dense", "auto"):
        run = result["runs"][form]
        assert list(run["stage_seconds"]) == ["data", "teacher", "report"]
        assert run["wall_seconds"] > sum(run["stage_seconds"].values()) > 0
        teacher = run["models"]["teacher"]
        assert teacher["steps_run"] == int(steps) and 0 <= teacher["test"]["ndcg@10"] <= 1
        assert 0 < teacher["train_seconds"] < run["stage_seconds"]["teacher"]
        config = json.loads((tmp_path / form / "report.json").read_text())["config"]
        assert config["loss"]["form"] == form
        assert (tmp_path / f"{form}.log").stat().st_size > 0


def test_pipeline_time_table_ratios_and_forwarded_flags():
    from benchmarks import pipeline_time

    runs = {
        v: {
            "wall_seconds": wall,
            "stage_seconds": {"data": 1.0, "teacher": teacher},
            "models": {
                "teacher": {
                    "train_seconds": teacher - 1,
                    "eval_seconds": 0.5,
                    "compressed": False,
                    "test": {"hr@10": 0.5, "ndcg@10": 0.25},
                }
            },
        }
        for v, wall, teacher in (("dense", 14.0, 10.0), ("auto", 8.0, 5.0))
    }
    rows = {r["row"]: r["seconds"] for r in pipeline_time.time_rows(runs)}
    assert rows["  teacher: training"] == {"dense": 9.0, "auto": 4.0}
    assert rows["start-up and exit"] == {"dense": 3.0, "auto": 2.0}
    table = pipeline_time.time_table(pipeline_time.time_rows(runs), ["dense", "auto"])
    assert "| teacher | 10.0 | 5.0 | 0.50 |" in table
    assert "| total wall time | 14.0 | 8.0 | 0.57 |" in table
    assert common.config_args(
        ["p", "--config", "c.py:tiny", "--config.seed=3", "--variants=auto", "--config.x", "1"]
    ) == ["--config=c.py:tiny", "--config.seed=3", "--config.x=1"]


def test_pipeline_time_checks_every_variant_before_running(tmp_path):
    from benchmarks import pipeline_time

    with pytest.raises(SystemExit, match=r"variant 'fastest'.*loss.form"):
        pipeline_time.main(
            [
                "pipeline_time",
                f"--config={SYNTHETIC}:tiny",
                "--variants=dense,fastest",
                f"--workdir={tmp_path}",
            ]
        )
    assert not (tmp_path / "dense").exists()
