"""Click-through metrics: AUC, log loss, expected calibration error and the reliability curve.

The click task scores (user, item, context) rows with a click probability;
its metrics read every row's probability and label at once, on the host
(a test split of a click data set fits in memory many times over). AUC and
log loss are scikit-learn's; the calibration error is computed here, over
equal-width probability bins:

    ECE = sum over bins b of (n_b / n) * |mean label in b - mean probability in b|

Report keys: `auc`, `logloss`, `ece`, plus `clicks` and `rows` (the slice's
size), and `reliability` (per bin: its bounds, rows, mean probability and
click rate) for the report's reliability diagram.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as sk_metrics

__all__ = ["BINS", "click_metrics", "expected_calibration_error", "reliability"]

BINS = 15
# Probabilities are clipped to [EPS, 1 - EPS] for the log loss only.
EPS = 1e-7


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if probs.shape != labels.shape:
        raise ValueError(f"{probs.size} probabilities for {labels.size} labels.")
    if probs.size and (not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1):
        raise ValueError("click probabilities must be finite and in [0, 1].")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("click labels must be 0 or 1.")
    return probs, labels.astype(np.float64)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict[str, list]:
    """Per equal-width bin of [0, 1]: bounds, rows, mean probability and click rate.

    A probability of exactly 1 falls in the last bin. Empty bins have None
    for their means.
    """
    probs, labels = _check(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.minimum((probs * bins).astype(np.int64), bins - 1)
    rows = np.bincount(which, minlength=bins)
    p_sum = np.bincount(which, weights=probs, minlength=bins)
    y_sum = np.bincount(which, weights=labels, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p, rate = p_sum / rows, y_sum / rows
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "rows": rows.tolist(),
        "mean_probability": [
            None if n == 0 else float(v) for n, v in zip(rows, mean_p, strict=True)
        ],
        "click_rate": [None if n == 0 else float(v) for n, v in zip(rows, rate, strict=True)],
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """The row-weighted mean gap between click rate and mean probability over the bins."""
    curve = reliability(probs, labels, bins)
    total = sum(curve["rows"])
    if total == 0:
        return float("nan")
    gaps = [
        n * abs(y - p)
        for n, p, y in zip(
            curve["rows"], curve["mean_probability"], curve["click_rate"], strict=True
        )
        if n
    ]
    return float(sum(gaps) / total)


def click_metrics(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """`auc`, `logloss`, `ece`, `rows`, `clicks` and the `reliability` curve of a slice.

    AUC is None where the slice holds only one class (it is undefined there).
    """
    probs, labels = _check(probs, labels)
    out = {"rows": int(labels.size), "clicks": int(labels.sum())}
    if labels.size == 0:
        return out | {"auc": None, "logloss": None, "ece": None, "reliability": None}
    both = 0 < out["clicks"] < labels.size
    out["auc"] = float(sk_metrics.roc_auc_score(labels, probs)) if both else None
    out["logloss"] = float(
        sk_metrics.log_loss(labels, np.clip(probs, EPS, 1 - EPS), labels=[0.0, 1.0])
    )
    out["ece"] = expected_calibration_error(probs, labels, bins)
    out["reliability"] = reliability(probs, labels, bins)
    return out
