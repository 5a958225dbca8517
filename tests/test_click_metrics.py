"""Click metrics against brute-force float64 references."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_jax.evaluation import click_metrics as cm


def _auc_reference(p, y):
    """Share of (click, non-click) pairs ranked right; ties count one half."""
    pos = [a for a, b in zip(p, y, strict=True) if b == 1]
    neg = [a for a, b in zip(p, y, strict=True) if b == 0]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def _ece_reference(p, y, bins):
    total, gap = len(p), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = [
            (a, c)
            for a, c in zip(p, y, strict=True)
            if lo <= a < hi or (b == bins - 1 and a == 1.0)
        ]
        if rows:
            gap += (
                len(rows)
                / total
                * abs(np.mean([c for _, c in rows]) - np.mean([a for a, _ in rows]))
            )
    return gap


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0]), st.integers(0, 1)),
        min_size=2,
        max_size=40,
    )
)
def test_auc_logloss_and_ece_match_the_references(rows):
    p = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    out = cm.click_metrics(p, y, bins=4)
    assert out["rows"] == len(rows) and out["clicks"] == int(y.sum())
    if 0 < y.sum() < len(y):
        assert out["auc"] == pytest.approx(_auc_reference(p, y), abs=1e-12)
    else:
        assert out["auc"] is None
    clipped = np.clip(p, cm.EPS, 1 - cm.EPS)
    ref = -np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    assert out["logloss"] == pytest.approx(ref, rel=1e-9)
    assert out["ece"] == pytest.approx(_ece_reference(p, y, 4), abs=1e-12)
    assert sum(out["reliability"]["rows"]) == len(rows)


def test_a_calibrated_model_has_a_small_ece_and_the_curve_follows_the_diagonal():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    out = cm.click_metrics(p, y)
    assert out["ece"] < 0.01
    curve = out["reliability"]
    for mean_p, rate in zip(curve["mean_probability"], curve["click_rate"], strict=True):
        assert abs(mean_p - rate) < 0.02
    # Twice as confident as it should be: a large calibration error.
    assert cm.click_metrics(np.clip(2 * p - 0.5, 0, 1), y)["ece"] > 0.1


def test_empty_bins_and_empty_slices():
    curve = cm.reliability(np.array([0.05, 0.95]), np.array([0, 1]), bins=10)
    assert curve["rows"] == [1] + [0] * 8 + [1]
    assert curve["click_rate"][1] is None and curve["mean_probability"][9] == pytest.approx(0.95)
    out = cm.click_metrics(np.zeros(0), np.zeros(0))
    assert out["rows"] == 0 and out["auc"] is None and out["ece"] is None
    assert math.isnan(cm.expected_calibration_error(np.zeros(0), np.zeros(0)))


@pytest.mark.parametrize(
    "p, y, match",
    [
        ([0.5, 1.5], [0, 1], r"in \[0, 1\]"),
        ([0.5, np.nan], [0, 1], "finite"),
        ([0.5, 0.5], [0, 2], "0 or 1"),
        ([0.5], [0, 1], "1 probabilities for 2 labels"),
    ],
)
def test_bad_inputs_are_named(p, y, match):
    with pytest.raises(ValueError, match=match):
        cm.click_metrics(np.array(p), np.array(y))
