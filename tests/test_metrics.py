"""Tests for distill_jax.evaluation.metrics against a brute-force NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from distill_jax.evaluation import metrics

KS = (1, 5, 10, 20)


# --------------------------------------------------------------------------
# Brute-force float64 references: one user at a time, explicit candidate set.
# --------------------------------------------------------------------------


def reference_rank(scores, target, history, exclude_history):
    scores = np.asarray(scores, np.float64)
    candidates = set(range(1, scores.shape[0]))
    if exclude_history and history is not None:
        candidates -= {int(h) for h in history}
    candidates.add(int(target))  # the target is always a candidate
    others = candidates - {int(target)}
    return 1 + sum(1 for c in others if scores[c] >= scores[target])


def reference_ranks(scores, targets, history, exclude_history):
    return np.array(
        [
            reference_rank(
                scores[b], targets[b], None if history is None else history[b], exclude_history
            )
            for b in range(len(targets))
        ]
    )


def reference_metrics(ranks, ks, where=None):
    ranks = np.asarray(ranks)
    valid = np.ones(len(ranks), bool) if where is None else np.asarray(where, bool)
    r = ranks[valid].astype(np.float64)
    n = len(r)
    out = {"mrr": (np.sum(1.0 / r), n)}
    for k in ks:
        out[f"hr@{k}"] = (float(np.sum(r <= k)), n)
        out[f"ndcg@{k}"] = (float(sum(1.0 / math.log2(x + 1) for x in r if x <= k)), n)
    return out


def random_case(seed, batch=24, num_items=40, hist_len=12):
    """Integer scores in a small range (many ties), -inf/+inf, messy histories."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(batch, num_items + 1)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    scores[rng.random(scores.shape) < 0.03] = np.inf
    # Column 0 is never a candidate, whatever it holds; +inf would beat everything.
    scores[:, 0] = np.where(rng.random(batch) < 0.5, np.inf, -np.inf)
    targets = rng.integers(1, num_items + 1, size=batch).astype(np.int32)
    history = rng.integers(1, num_items + 1, size=(batch, hist_len)).astype(np.int32)
    history[:, 1] = history[:, 0]  # duplicates in every row
    history[::3, 2] = targets[::3]  # the target in some histories
    for b in range(batch):  # 0-padding of varying length
        history[b, rng.integers(3, hist_len + 1) :] = 0
    scores[::4, targets[::4]] = -np.inf  # some targets at -inf
    scores[1::8, targets[1::8]] = np.inf  # and some at +inf
    return scores, targets, history


# --------------------------------------------------------------------------
# target_ranks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_history", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_ranks_matches_reference(seed, exclude_history):
    scores, targets, history = random_case(seed)
    # The case really exercises what it claims to.
    assert np.any(history == targets[:, None])
    assert np.isneginf(scores[np.arange(len(targets)), targets]).any()
    got = metrics.target_ranks(scores, targets, history, exclude_history=exclude_history)
    assert got.dtype == jnp.int32 and got.shape == targets.shape
    want = reference_ranks(scores, targets, history, exclude_history)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_ties_count_against_the_model():
    scores = np.array([[-np.inf, 1.0, 1.0, 1.0, 0.0]], np.float32)
    ranks = metrics.target_ranks(scores, np.array([2]))
    assert int(ranks[0]) == 3  # items 1 and 3 tie with the target: both ahead


def test_padding_column_is_never_a_candidate():
    scores = np.array([[np.inf, 0.0, 1.0, 2.0]], np.float32)
    assert int(metrics.target_ranks(scores, np.array([3]))[0]) == 1
    # 0-padding in the history excludes nothing, nor does it break the target.
    history = np.array([[0, 0, 0]])
    assert int(metrics.target_ranks(scores, np.array([1]), history)[0]) == 3


def test_constant_model_gets_number_of_candidates():
    rng = np.random.default_rng(3)
    batch, num_items = 16, 50
    scores = np.full((batch, num_items + 1), 0.25, np.float32)
    scores[:, 0] = -np.inf
    targets = rng.integers(1, num_items + 1, size=batch)
    history = rng.integers(0, num_items + 1, size=(batch, 30))
    history[:, 0] = targets  # target in history: still a candidate
    ranks = np.asarray(metrics.target_ranks(scores, targets, history))
    num_candidates = np.array(
        [
            len(set(range(1, num_items + 1)) - set(history[b].tolist()) | {int(targets[b])})
            for b in range(batch)
        ]
    )
    np.testing.assert_array_equal(ranks, num_candidates)
    assert ranks.min() > 10
    no_excl = np.asarray(metrics.target_ranks(scores, targets, history, exclude_history=False))
    np.testing.assert_array_equal(no_excl, np.full(batch, num_items))
    result = metrics.finalize(metrics.ranking_metrics(ranks, ks=(10,)))
    assert result["hr@10"] == 0.0 and result["ndcg@10"] == 0.0


def test_perfect_model_gets_rank_one_and_ndcg_one():
    rng = np.random.default_rng(4)
    batch, num_items = 16, 30
    scores = rng.normal(size=(batch, num_items + 1)).astype(np.float32)
    targets = rng.integers(1, num_items + 1, size=batch)
    scores[np.arange(batch), targets] = 10.0
    scores[:, 0] = np.inf
    ranks = metrics.target_ranks(scores, targets)
    np.testing.assert_array_equal(np.asarray(ranks), np.ones(batch))
    result = metrics.finalize(metrics.ranking_metrics(ranks, ks=KS))
    assert all(v == 1.0 for v in result.values()), result


def test_exclude_history_removes_seen_items_only():
    # History items 1 and 2 outscore the target 4; item 3 does too but is unseen.
    scores = np.array([[-np.inf, 9.0, 8.0, 7.0, 5.0, 1.0]], np.float32)
    targets = np.array([4])
    history = np.array([[1, 2, 2, 4, 0]])
    excl = metrics.target_ranks(scores, targets, history, exclude_history=True)
    keep = metrics.target_ranks(scores, targets, history, exclude_history=False)
    none = metrics.target_ranks(scores, targets)
    assert int(excl[0]) == 2  # only item 3 ahead
    assert int(keep[0]) == 4  # items 1, 2, 3 ahead
    assert int(none[0]) == 4


def test_target_out_of_range_gets_worst_rank():
    # Column 0 and item V score highest, so reading either as the target would
    # give rank 1.
    scores = np.array([[9.0, 1.0, 2.0, 3.0]] * 3, np.float32)
    ranks = metrics.target_ranks(scores, np.array([0, 4, -1]), np.array([[2, 0]] * 3))
    # Never a hit: 1 + the number of candidates (items 1 and 3).
    np.testing.assert_array_equal(np.asarray(ranks), [3, 3, 3])


def test_history_ids_outside_catalogue_are_ignored():
    num_items = 5
    scores = np.array([[-np.inf, 1.0, 2.0, 3.0, 4.0, 9.0]], np.float32)
    # Clipping V+3 or wrapping -1 would both wrongly exclude item V.
    history = np.array([[num_items + 3, -1, 0]])
    ranks = metrics.target_ranks(scores, np.array([4]), history)
    assert int(ranks[0]) == 2  # item 5 is still a candidate and ahead


def test_target_ranks_jit_equals_eager():
    scores, targets, history = random_case(5)
    eager = metrics.target_ranks(scores, targets, history)
    jitted = jax.jit(metrics.target_ranks, static_argnames="exclude_history")(
        scores, targets, history
    )
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    np.testing.assert_array_equal(
        np.asarray(eager), reference_ranks(scores, targets, history, True)
    )


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_target_ranks_sharding_invariance(axis_type):
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
    scores, targets, history = random_case(6, batch=32)
    want = reference_ranks(scores, targets, history, True)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, sharding) for x in (scores, targets, history)]
    with jax.set_mesh(mesh):
        got = jax.jit(metrics.target_ranks)(*args)
        out = jax.jit(
            lambda s, t, h: metrics.ranking_metrics(metrics.target_ranks(s, t, h), ks=KS)
        )(*args)
    assert got.sharding.spec[0] == "data"  # stayed sharded, no gather to one device
    np.testing.assert_array_equal(np.asarray(got), want)
    expected = {k: s / c for k, (s, c) in reference_metrics(want, KS).items()}
    got_metrics = metrics.finalize(out)
    assert got_metrics.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got_metrics[key], value, rtol=1e-6, err_msg=key)


def test_target_ranks_memory_is_linear_in_catalogue():
    # Realistic eval shapes: a [B, H, V+1] one-hot exclusion would need ~600 MB.
    batch, hist_len, num_items = 256, 200, 12101
    compiled = (
        jax.jit(metrics.target_ranks)
        .lower(
            jax.ShapeDtypeStruct((batch, num_items + 1), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, hist_len), jnp.int32),
        )
        .compile()
    )
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("backend reports no memory analysis")
    scores_bytes = batch * (num_items + 1) * 4
    assert stats.temp_size_in_bytes < 3 * scores_bytes, stats


def test_target_ranks_rejects_bad_inputs():
    scores = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="scores"):
        metrics.target_ranks(scores[0], np.array([1]))
    with pytest.raises(ValueError, match="targets"):
        metrics.target_ranks(scores, np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="targets"):
        metrics.target_ranks(scores, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="history"):
        metrics.target_ranks(scores, np.array([1, 2]), np.zeros((3, 4), np.int32))


# --------------------------------------------------------------------------
# ranking_metrics, accumulate, finalize
# --------------------------------------------------------------------------


def random_ranks(seed, batch=64, max_rank=40):
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, max_rank + 1, size=batch).astype(np.int32)
    ranks[:5] = [1, 5, 10, 11, 20]  # the cutoff boundaries
    where = rng.random(batch) < 0.7
    where[:5] = True
    return ranks, where


def assert_pairs_close(got, want):
    assert set(got) == set(want)
    for key, (s, c) in want.items():
        np.testing.assert_allclose(float(got[key][0]), s, rtol=1e-6, err_msg=key)
        assert float(got[key][1]) == c, key


def test_ranking_metrics_matches_reference():
    ranks, where = random_ranks(7)
    got = metrics.ranking_metrics(ranks, ks=KS, where=where)
    assert all(s.dtype == jnp.float32 and c.dtype == jnp.float32 for s, c in got.values())
    assert_pairs_close(got, reference_metrics(ranks, KS, where))
    assert_pairs_close(metrics.ranking_metrics(ranks, ks=KS), reference_metrics(ranks, KS))


def test_ranking_metrics_values_at_cutoffs():
    got = metrics.finalize(metrics.ranking_metrics(np.array([1, 3, 10, 11]), ks=(10,)))
    np.testing.assert_allclose(got["hr@10"], 3 / 4)
    np.testing.assert_allclose(got["ndcg@10"], (1 + 1 / 2 + 1 / math.log2(11)) / 4, rtol=1e-6)
    np.testing.assert_allclose(got["mrr"], (1 + 1 / 3 + 1 / 10 + 1 / 11) / 4, rtol=1e-6)


def test_where_mask_is_respected():
    ranks, where = random_ranks(8)
    garbage = ranks.copy()
    garbage[~where] = np.array([0, -3, 1, 2])[np.arange((~where).sum()) % 4]
    a = metrics.finalize(metrics.ranking_metrics(ranks, ks=KS, where=where))
    b = metrics.finalize(metrics.ranking_metrics(garbage, ks=KS, where=where))
    assert a == b and all(math.isfinite(v) for v in b.values())
    full = metrics.finalize(metrics.ranking_metrics(ranks, ks=KS))
    assert a != full  # the masked rows would have changed the result
    none = metrics.ranking_metrics(ranks, ks=KS, where=np.zeros_like(where))
    assert all(float(c) == 0.0 for _, c in none.values())
    assert metrics.finalize(none) == {k: 0.0 for k in none}


def test_ranking_metrics_jit_equals_eager():
    ranks, where = random_ranks(9)
    eager = metrics.ranking_metrics(ranks, ks=KS, where=where)
    jitted = jax.jit(lambda r, w: metrics.ranking_metrics(r, ks=KS, where=w))(ranks, where)
    for key in eager:
        for e, j in zip(eager[key], jitted[key], strict=True):
            np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, err_msg=key)


def test_accumulate_two_halves_equals_whole():
    scores, targets, history = random_case(10, batch=40)
    where = np.random.default_rng(10).random(40) < 0.6
    ranks = metrics.target_ranks(scores, targets, history)
    whole = metrics.ranking_metrics(ranks, ks=KS, where=where)
    # Uneven halves, unevenly masked: a mean of means would differ.
    cut = 13
    halves = [
        metrics.ranking_metrics(ranks[sl], ks=KS, where=where[sl])
        for sl in (slice(None, cut), slice(cut, None))
    ]
    assert float(halves[0]["mrr"][1]) != float(halves[1]["mrr"][1])
    total = metrics.accumulate(metrics.accumulate(None, halves[0]), halves[1])
    assert_pairs_close(total, {k: (float(s), float(c)) for k, (s, c) in whole.items()})
    want = {
        k: s / c
        for k, (s, c) in reference_metrics(
            reference_ranks(scores, targets, history, True), KS, where
        ).items()
    }
    got = metrics.finalize(total)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
    # Works on host copies too, as the evaluator does after device_get.
    host = metrics.accumulate(jax.device_get(halves[0]), jax.device_get(halves[1]))
    assert metrics.finalize(host) == pytest.approx(got, rel=1e-6)


def test_accumulate_and_finalize_on_nested_pytrees():
    a = {"valid": {"m": (2.0, 4.0)}, "test": {"m": (1.0, 1.0), "e": (0.0, 0.0)}}
    b = {"valid": {"m": (1.0, 2.0)}, "test": {"m": (0.0, 1.0), "e": (0.0, 0.0)}}
    total = metrics.accumulate(a, b)
    assert total == {"valid": {"m": (3.0, 6.0)}, "test": {"m": (1.0, 2.0), "e": (0.0, 0.0)}}
    assert metrics.finalize(total) == {"valid": {"m": 0.5}, "test": {"m": 0.5, "e": 0.0}}
    with pytest.raises(ValueError, match="structure"):
        metrics.accumulate(a, {"valid": {"m": (1.0, 2.0)}})
    with pytest.raises(ValueError, match="pairs"):
        metrics.finalize({"m": 1.0})


def test_ranking_metrics_rejects_bad_arguments():
    ranks = np.array([1, 2, 3])
    for ks in [(0,), (5, 5), (2.5,), (True,)]:
        with pytest.raises(ValueError, match="ks"):
            metrics.ranking_metrics(ranks, ks=ks)
    with pytest.raises(ValueError, match="where"):
        metrics.ranking_metrics(ranks, where=np.ones(4, bool))
    with pytest.raises(TypeError, match="where"):
        metrics.ranking_metrics(ranks, where=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="ranks"):
        metrics.ranking_metrics(ranks[None])
