"""The report: popularity deciles, the figures, report.html, TensorBoard events, progress."""

import base64
import copy
import io
import json
import logging
import re

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2

from configs import synthetic
from distill_jax import pipeline, progress
from distill_jax import sharding as sharding_lib
from distill_jax.data import preprocess, splits
from distill_jax.data import synthetic as synthetic_data
from distill_jax.evaluation import evaluator as ev
from distill_jax.evaluation import plots
from distill_jax.evaluation import report as report_lib

STAGES = ("teacher", "student_kd", "student_scratch")


def test_popularity_groups_cut_the_catalogue_into_equal_runs():
    pop = np.array([0, 5, 9, 9, 0, 1, 7, 3])  # 7 items, ties broken by smaller id
    got = splits.popularity_groups(pop, groups=3)
    # by decreasing count: 2, 3 (9), 6 (7), 1 (5), 7 (3), 5 (1), 4 (0)
    order = [2, 3, 6, 1, 7, 5, 4]
    want = np.full(8, -1)
    want[order] = [0, 0, 0, 1, 1, 2, 2]  # floor(i * 3 / 7)
    np.testing.assert_array_equal(got, want)
    ten = splits.popularity_groups(np.r_[0, np.arange(100)], 10)
    assert np.all(np.bincount(ten[1:]) == 10) and ten[100] == 0 and ten[1] == 9
    with pytest.raises(ValueError, match="groups must be in 1..7"):
        splits.popularity_groups(pop, groups=8)


def test_deciles_match_a_brute_force_reference():
    config = synthetic.get_config("tiny")
    config.eval.batch_size = 32
    split = preprocess.leave_one_out(synthetic_data.generate(config.data.synthetic, config.seed))
    mesh = sharding_lib.make_mesh(config.mesh)
    evaluator = ev.Evaluator(split, config, mesh)
    scorer = ev.popularity_scorer(split, mesh, config.teacher.max_len)
    metrics, deciles = evaluator.evaluate_splits(scorer, ("test", "valid"))
    assert set(metrics) == {"test", "valid"} and set(deciles) == {"test"}
    assert metrics["test"] == evaluator.evaluate(scorer, "test")
    d = deciles["test"]
    # float64 reference: popularity scores, history excluded, ties against the target.
    counts = np.bincount(np.concatenate(split.train), minlength=split.num_items + 1)
    group = splits.popularity_groups(counts, 10)
    recs, hits, users = np.zeros(10), np.zeros(10), np.zeros(10)
    for h, t in zip(*split.eval_examples("test"), strict=True):
        s = counts.astype(np.float64)
        s[0] = -np.inf
        s[h] = -np.inf
        top = np.argsort(-s, kind="stable")[:10]  # what the user is shown
        np.add.at(recs, group[top], 1)
        s[t] = counts[t]  # the target is ranked even where it repeats a history item
        others = np.isfinite(s)
        others[t] = False
        rank = 1 + np.sum(s[others] >= s[t])
        users[group[t]] += 1
        hits[group[t]] += rank <= 10
    assert d["k"] == 10 and d["users"] == users.tolist() and sum(d["items"]) == split.num_items
    np.testing.assert_allclose(d["rec_share@10"], recs / recs.sum(), atol=1e-12)
    want_hr = [h / u if u else None for h, u in zip(hits, users, strict=True)]
    assert [None if x is None else pytest.approx(x) for x in want_hr] == d["hr@10"]
    assert d["hr@10"][0] > 0.5  # popularity's hits are all in the head


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short main job: popularity, the three trained stages and the report."""
    config = synthetic.get_config("tiny")
    config.stages = "popularity,teacher,student_kd,student_scratch,report"
    config.teacher.num_steps = config.student.num_steps = 8
    config.eval.every_steps, config.checkpoint.every_steps, config.log_every_steps = 4, 4, 2
    config.eval.latency_repeats = 2
    workdir = tmp_path_factory.mktemp("report_run")
    report = pipeline.run(config, str(workdir))
    return workdir, report


def test_the_report_stage_writes_every_figure_and_a_self_contained_page(run):
    workdir, report = run
    for name in plots.FIGURES:
        img = matplotlib.image.imread(workdir / "plots" / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, name
        assert img[..., :3].std() > 0.05, f"{name}.png is blank"
    page = (workdir / "report.html").read_text()
    # Self-contained: every image is inline data, nothing is fetched.
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(srcs) == len(plots.FIGURES) and all(
        s.startswith("data:image/png;base64,") for s in srcs
    )
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("popularity", *STAGES):
        assert f"<td>{name}</td>" in page
    ndcg = f"{report['models']['student_kd']['metrics']['test']['ndcg@10']:.4f}"
    assert ndcg in page and ndcg in (workdir / "report.md").read_text()
    # The page rebuilds from report.json alone.
    assert report_lib.main(["report", str(workdir)]) == 0
    assert (workdir / "report.html").read_text() == page


def test_results_carry_curves_and_deciles_and_tensorboard_reads_them_back(run):
    workdir, report = run
    for stage in STAGES:
        m = report["models"][stage]
        steps = [s for s, _ in m["curves"]["train"]]
        assert steps == [2, 4, 6, 8]
        assert [s for s, _ in m["curves"]["valid"]] == [4, 8]
        d = m["popularity_deciles"]["test"]
        assert sum(d["users"]) == m["metrics"]["test"]["users"]
        assert sum(d["rec_share@10"]) == pytest.approx(1.0)

        acc = ea.EventAccumulator(str(workdir / stage / "tb"), size_guidance={ea.TENSORS: 0})
        acc.Reload()
        loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        assert [s for s, _ in loss] == steps
        np.testing.assert_allclose([v for _, v in loss], [v for _, v in m["curves"]["train"]])
        valid = [(e.step, e.value) for e in acc.Scalars("valid/ndcg_10")]
        np.testing.assert_allclose(valid, m["curves"]["valid"], rtol=1e-6)
        assert {"train/grad_norm", "train/steps_per_second", "valid/hr_10"} <= set(
            acc.Tags()["scalars"]
        )
        # ("@" reads "_" in TensorBoard tags.) The stage's config as text.
        (text,) = acc.Tensors("config/text_summary")
        body = text.tensor_proto.string_val[0].decode()
        assert f"**{stage}**" in body and '"embed_dim"' in body
        # Hyperparameters with the final metrics.
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        ).session_start_info
        assert start.hparams["stage"].string_value == stage
        model_key = "teacher" if stage == "teacher" else "student"
        embed = report["config"][model_key]["embed_dim"]
        assert start.hparams["model.embed_dim"].number_value == embed
        best = acc.Scalars("best_valid/ndcg_10")[-1].value
        assert best == pytest.approx(max(v for _, v in m["curves"]["valid"]), rel=1e-6)
        assert ("distill.temperature" in start.hparams) == (stage == "student_kd")


def test_figures_over_seeds_draw_error_bars(run):
    _, report = run
    reports = []
    for seed, shift in ((0, 0.0), (1, 0.01), (2, 0.03)):
        r = json.loads(json.dumps(report))
        r["config"]["seed"] = seed
        for m in r["models"].values():
            m["metrics"]["test"]["ndcg@10"] += shift
        reports.append(r)
    fig = plots.quality_size(reports)
    bars = [c for c in fig.axes[0].containers if c.has_yerr]
    assert bars, "no error bars over seeds"
    (seg,) = bars[0].lines[2]
    half = np.diff(seg.get_segments()[0][:, 1])[0] / 2
    assert half == pytest.approx(np.std([0.0, 0.01, 0.03], ddof=1), rel=1e-6)
    assert plots.curves(reports) is not None and plots.long_tail(reports) is not None


def test_progress_draws_a_bar_or_writes_log_lines(monkeypatch, caplog):
    monkeypatch.setenv(progress.ENV, "log")
    assert not progress.bars_enabled()
    monkeypatch.setenv(progress.ENV, "bar")
    assert progress.bars_enabled()
    monkeypatch.setattr(progress.jax, "process_index", lambda: 1)
    assert not progress.bars_enabled()  # only process 0 draws
    monkeypatch.setenv(progress.ENV, "sometimes")
    monkeypatch.setattr(progress.jax, "process_index", lambda: 0)
    with pytest.raises(ValueError, match="DISTILL_JAX_PROGRESS='sometimes'"):
        progress.bars_enabled()

    with caplog.at_level(logging.INFO, logger="distill_jax"):
        with progress.Progress("[x]", 4, bar=False) as p:
            p.update(2, loss=1.5)
            p.note("[x] step %d valid", 2)
    assert not p.is_bar and "[x] step 2 valid" in caplog.text

    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    with progress.Progress("[teacher]", 10, initial=2, bar=True) as p:
        p.update(3, loss=4.25)
    text = out.getvalue()
    assert "[teacher]" in text and "5/10" in text and "loss=4.25" in text


def test_cold_slices_get_their_own_table(run):
    _, report = run
    assert report_lib.cold_table(report) is None  # a plain leave-one-out run has none
    cold = copy.deepcopy(report)
    cold["dataset"]["split_counts"] = {"cold_users": 7, "cold_item_users": 5}
    for i, r in enumerate(cold["models"].values()):
        r["metrics"]["cold_items"] = dict(r["metrics"]["test"], **{"hr@10": 0.125 + i})
    header, rows = report_lib.cold_table(cold)
    assert header == ["model"] + [f"cold_items {c}" for c in report_lib.COLD_COLUMNS]
    assert [r[0] for r in rows] == list(cold["models"]) and rows[0][1] == "0.1250"
    md = report_lib.markdown(cold)
    assert "7 cold users, 5 cold item users" in md and "| cold_items hr@10 |" in md
    assert "<th>cold_items hr@10</th>" in report_lib.to_html(cold, {})
