"""The evaluator: popularity baseline vs a brute-force reference, exposure, agreement."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import synthetic
from distill_jax import models
from distill_jax import sharding as sharding_lib
from distill_jax.data import preprocess
from distill_jax.data import synthetic as synthetic_data
from distill_jax.evaluation import evaluator as ev
from distill_jax.evaluation import metrics
from distill_jax.train import state as state_lib


@pytest.fixture(scope="module")
def setup():
    config = synthetic.get_config("tiny")
    config.eval.batch_size = 32
    split = preprocess.leave_one_out(synthetic_data.generate(config.data.synthetic, config.seed))
    mesh = sharding_lib.make_mesh(config.mesh)
    return config, split, mesh


def _reference(split, scores_fn, ks, head):
    """float64 brute force: rank among all items not in the history (target kept)."""
    out = {f"{m}@{k}": [] for k in ks for m in ("hr", "ndcg", "tail_hr", "tail_ndcg")}
    out["mrr"] = []
    hists, targets = split.eval_examples("test")
    for h, t in zip(hists, targets, strict=True):
        s = scores_fn(h).astype(np.float64)
        cand = np.ones(split.num_items + 1, bool)
        cand[0] = False
        cand[h] = False
        cand[t] = True
        others = cand.copy()
        others[t] = False
        rank = 1 + np.sum(s[others] >= s[t])
        for k in ks:
            hit, gain = rank <= k, (1 / np.log2(rank + 1) if rank <= k else 0.0)
            out[f"hr@{k}"].append(hit)
            out[f"ndcg@{k}"].append(gain)
            if not head[t]:
                out[f"tail_hr@{k}"].append(hit)
                out[f"tail_ndcg@{k}"].append(gain)
        out["mrr"].append(1 / rank)
    return {key: float(np.mean(v)) for key, v in out.items()}


def test_popularity_matches_brute_force(setup):
    config, split, mesh = setup
    evaluator = ev.Evaluator(split, config, mesh)
    scorer = ev.popularity_scorer(split, mesh, config.teacher.max_len)
    got = evaluator.evaluate(scorer, "test")
    counts = np.bincount(np.concatenate(split.train), minlength=split.num_items + 1)
    head = preprocess.head_items(counts, config.eval.tail_share)
    want = _reference(split, lambda h: counts.astype(np.float64), config.eval.ks, head)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["users"] == len(split.test_targets)
    assert got["tail_users"] == int(np.sum(~head[split.test_targets]))
    # Popularity recommends (nearly) the same few items to everyone.
    assert got["coverage@10"] < 0.5 and got["gini@10"] > 0.5


def test_head_items_cover_the_share():
    counts = np.array([0, 50, 30, 10, 5, 5], np.float64)
    head = preprocess.head_items(counts, 0.2)
    np.testing.assert_array_equal(head, [False, True, False, False, False, False])
    head = preprocess.head_items(counts, 0.6)  # 50 < 60 <= 80
    np.testing.assert_array_equal(head, [False, True, True, False, False, False])


def test_exposure_stats_reference():
    rng = np.random.default_rng(0)
    counts = np.concatenate([[0], rng.integers(0, 5, size=40)])
    got = metrics.exposure_stats(counts, 10, 40)
    x = np.sort(counts[1:].astype(np.float64))
    # Gini as the mean absolute difference over twice the mean.
    gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    assert got["gini@10"] == pytest.approx(gini, rel=1e-9)
    assert got["coverage@10"] == np.count_nonzero(counts[1:]) / 40
    assert metrics.exposure_stats(np.r_[0, np.ones(40)], 10, 40)["gini@10"] == pytest.approx(0)


def test_top_k_excludes_history_and_padding():
    scores = np.array([[100.0, 1, 9, 8, 7, 6]])
    top = np.asarray(metrics.top_k_items(scores, np.array([[2, 0]]), 3))
    np.testing.assert_array_equal(top, [[3, 4, 5]])
    top = np.asarray(metrics.top_k_items(scores, np.array([[2, 0]]), 3, exclude_history=False))
    np.testing.assert_array_equal(top, [[2, 3, 4]])


def test_agreement_and_latency(setup):
    config, split, mesh = setup
    model = models.build_model(
        config.teacher, num_items=split.num_items, max_len=config.teacher.max_len
    )
    shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
    params = jax.jit(lambda r: models_unbox(model, r), out_shardings=shardings)(jax.random.key(0))
    other = jax.jit(lambda r: models_unbox(model, r), out_shardings=shardings)(jax.random.key(1))
    evaluator = ev.Evaluator(split, config, mesh)
    a = ev.model_scorer(model, params, shardings)
    b = ev.model_scorer(model, other, shardings)
    same = evaluator.agreement(a, a)
    assert same["top10_overlap"] == pytest.approx(1.0)
    assert abs(same["kl"]) < 1e-5
    diff = evaluator.agreement(a, b)
    assert diff["top10_overlap"] < 1.0 and diff["kl"] > 1e-3
    lat = evaluator.latency(a, 4, repeats=3)
    assert 0 < lat["p50_ms"] <= lat["p99_ms"]
    samples = evaluator.latency_samples(a, 4, repeats=5)
    assert len(samples) == 5 and min(samples) > 0
    assert a.flops_per_sequence == pytest.approx(ev.model_flops_per_sequence(model))


def models_unbox(model, rng):
    return nn.unbox(state_lib.init_params_fn(model)(rng))


def test_cold_items_are_also_ranked_among_the_new_items_alone():
    from tests.test_preprocess import _raw

    config = synthetic.get_config("tiny")
    config.eval.batch_size = 32
    pairs = [(f"u{u}", f"i{(u * 7 + j * 3) % 40}") for u in range(30) for j in range(8)]
    processed = preprocess.preprocess(_raw(*zip(*pairs, strict=True)), min_user_interactions=4)
    split = preprocess.cold_start_split(
        processed, cold_item_fraction=0.2, cold_item_rule="random", seed=5
    )
    mesh = sharding_lib.make_mesh(config.mesh)
    scores = np.random.default_rng(3).normal(size=split.num_items + 1).astype(np.float32)
    rep = sharding_lib.replicated(mesh)
    scorer = ev.Scorer(
        lambda p, inputs, users=None: jax.numpy.broadcast_to(p, (inputs.shape[0], p.shape[0])),
        jax.device_put(scores, rep),
        rep,
        config.teacher.max_len,
        True,
        0.0,
    )
    got = ev.Evaluator(split, config, mesh).evaluate(scorer, "cold_items")
    new = np.zeros(split.num_items + 1, bool)
    new[split.cold_items] = True
    hits, gains, recips = [], [], []
    for h, t in zip(*split.eval_examples("cold_items"), strict=True):
        assert new[t]
        cand = new.copy()
        cand[h] = False
        cand[t] = False
        rank = 1 + np.sum(scores[cand].astype(np.float64) >= scores[t])
        hits.append(rank <= 10)
        gains.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
        recips.append(1 / rank)
    assert got["new_hr@10"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert got["new_ndcg@10"] == pytest.approx(np.mean(gains), abs=1e-6)
    assert got["new_mrr"] == pytest.approx(np.mean(recips), abs=1e-6)
    assert got["new_hr@10"] >= got["hr@10"] and got["new_mrr"] > got["mrr"]
    assert "new_hr@10" not in ev.Evaluator(split, config, mesh).evaluate(scorer, "test")
