"""Property tests of the catalogue losses (distill_jax/losses) against float64 NumPy references.

Logits hold finite values, -inf (excluded columns), +inf and NaN; masks may
select every row or none; temperatures span 1e-3..1e3. For every case a loss
gives the reference's value, or is NaN/inf where the reference is (a NaN or
+inf logit on a valid row is garbage in, and must show, never be averaged
away); rows the mask leaves out never matter, whatever they hold. Invalid
hyper-parameters raise naming the argument, and the config check names the key.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from configs import synthetic
from distill_jax import config_lib, losses
from distill_jax.config_checks import ConfigError
from distill_jax.losses import cached, chunked
from distill_jax.losses.common import masked_mean, masked_sum_and_count

N, V = 4, 6
FINITE = st.floats(-30, 30, width=32)
SPECIAL = st.sampled_from([-np.inf, np.inf, np.nan, 1e30, -1e30, 0.0])


@st.composite
def _poisoned(draw, shape: tuple[int, ...]) -> np.ndarray:
    """Finite logits with a few entries replaced by -inf, +inf, NaN or ±1e30."""
    out = draw(hnp.arrays(np.float32, shape, elements=FINITE))
    spots = st.tuples(*[st.integers(0, n - 1) for n in shape])
    for spot, value in draw(st.lists(st.tuples(spots, SPECIAL), max_size=4)):
        out[spot] = value
    return out


LOGITS = _poisoned((N, V))
FINITE_OR_EXCLUDED = hnp.arrays(
    np.float32, (N, V), elements=st.one_of(FINITE, st.just(np.float32(-np.inf)))
)
MASK = hnp.arrays(np.bool_, (N,))
LABELS = hnp.arrays(np.int32, (N,), elements=st.integers(0, V - 1))
TEMPERATURE = st.one_of(st.sampled_from([1.0, 0.5, 2.0, 1e-3, 1e3]), st.floats(0.05, 20.0))
ALPHA = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax of one row; NaN where the row holds NaN or +inf, or is all -inf."""
    x = x.astype(np.float64)
    if np.isnan(x).any() or np.isposinf(x).any() or np.isneginf(x).all():
        return np.full_like(x, np.nan)
    m = x.max()
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.exp(x - m).sum())


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> tuple[float, float]:
    """(KL(p || q) with 0 log 0 = 0, NaN if either side is; the float32 error scale).

    The scale, Σ p·(|log p| + |log q|), bounds what rounding the log-
    probabilities costs: KL is their small difference, so at a large T (p and
    q close) float32 keeps only about 1e-7 of the scale, whatever the method.
    """
    if np.isnan(log_p).any() or np.isnan(log_q).any():
        return math.nan, 0.0
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
        scale = np.where(p > 0, p * (np.abs(log_p) + np.abs(log_q)), 0.0)
    return math.fsum(terms), float(scale.sum())


def _sum(values) -> float:
    """The exact sum of finite floats; NaN/inf as float arithmetic gives them."""
    values = [float(v) for v in values]
    if all(math.isfinite(v) for v in values):
        return math.fsum(values)
    with np.errstate(invalid="ignore"):
        return float(np.sum(values))


def _check(got, rows: list, mask: np.ndarray, scales: list | None = None) -> None:
    """`got` (a sum) equals the reference's sum of `rows` over `mask`, or is non-finite
    where that is.

    Rows with a `scales` entry (KL terms) may be off by float32 rounding of that scale.
    """
    count = int(mask.sum())
    want = _sum(r for r, m in zip(rows, mask, strict=True) if m)
    slack = 1e-6 * _sum(abs(c) for c, m in zip(scales or [0.0] * len(rows), mask, strict=True) if m)
    if not math.isfinite(slack):
        slack = (
            math.inf
        )  # a row's scale overflowed: its rounding is unbounded, only finiteness holds
    got = float(got)
    if math.isnan(want):
        event("NaN shows")
        assert not math.isfinite(got), (got, want)
    elif math.isinf(want):
        event("inf shows")
        assert got == want, (got, want)
    else:
        assert math.isfinite(got), (got, want)
        assert got == pytest.approx(want, rel=2e-5, abs=2e-4 * max(count, 1) + slack), (got, want)


@settings(max_examples=120)
@given(LOGITS, LABELS, MASK, hnp.arrays(np.int32, (N,), elements=st.integers(-3, V + 3)))
def test_cross_entropy(logits, labels, mask, masked_labels):
    # Masked rows may carry any label, in range or not.
    labels = np.where(mask, labels, masked_labels)
    total, count = losses.cross_entropy_sum(logits, labels, where=mask)
    rows = [-_log_softmax(row)[y] for row, y in zip(logits, labels % V, strict=True)]
    assert float(count) == mask.sum()
    _check(total, rows, mask)
    if not mask.any():
        event("nothing valid")
        assert float(losses.cross_entropy(logits, labels, where=mask)) == 0.0


@settings(max_examples=30)
@given(FINITE_OR_EXCLUDED, hnp.arrays(np.int32, (N,), elements=st.integers(-(2**31), 2**31 - 1)))
def test_labels_outside_the_catalogue_are_nan_not_another_item(logits, labels):
    outside = (labels < 0) | (labels >= V)
    for total in (
        losses.cross_entropy_sum(logits, labels)[0],
        losses.distill_loss_sum(logits, logits, labels, temperature=1.0, alpha=0.5)[0],
    ):
        if outside.any():
            event("outside")
            assert math.isnan(float(total))


@settings(max_examples=120)
@given(LOGITS, LOGITS, MASK, TEMPERATURE)
def test_kl_distill(student, teacher, mask, temperature):
    total, count = losses.kl_distill_sum(student, teacher, temperature=temperature, where=mask)
    kls = [
        _kl(_log_softmax(t / temperature), _log_softmax(s / temperature))
        for s, t in zip(student.astype(np.float64), teacher.astype(np.float64), strict=True)
    ]
    assert float(count) == mask.sum()
    t2 = temperature**2
    _check(total, [t2 * k for k, _ in kls], mask, [t2 * c for _, c in kls])


def _distill_reference(s, t, labels, label_mask, temperature, alpha):
    """Per row: (alpha·CE (labelled rows) + (1 − alpha)·T²·KL, a term of weight 0 dropped;
    the KL part's error scale)."""
    rows, scales = [], []
    for z, tt, y, labelled in zip(s, t, labels, label_mask, strict=True):
        z, tt = z.astype(np.float64), tt.astype(np.float64)
        kl, scale = _kl(_log_softmax(tt / temperature), _log_softmax(z / temperature))
        ce = -_log_softmax(z)[y] if labelled else 0.0
        row = 0.0 if alpha == 0 else alpha * ce
        if alpha != 1:
            row += (1 - alpha) * temperature**2 * kl
        rows.append(row)
        scales.append((1 - alpha) * temperature**2 * scale)
    return rows, scales


@settings(max_examples=120)
@given(LOGITS, LOGITS, LABELS, MASK, MASK, TEMPERATURE, ALPHA)
def test_fused_distill_loss(student, teacher, labels, mask, label_mask, temperature, alpha):
    total, count = losses.distill_loss_sum(
        student,
        teacher,
        labels,
        temperature=temperature,
        alpha=alpha,
        where=mask,
        label_where=label_mask,
    )
    rows, scales = _distill_reference(student, teacher, labels, label_mask, temperature, alpha)
    assert float(count) == mask.sum()
    _check(total, rows, mask, scales)


@settings(max_examples=60)
@given(
    FINITE_OR_EXCLUDED,
    hnp.arrays(np.float32, (N, V), elements=FINITE),
    LABELS,
    MASK,
    LOGITS,
    TEMPERATURE,
    ALPHA,
)
def test_fused_distill_gradient_is_the_closed_form_and_ignores_masked_rows(
    student, teacher, labels, mask, garbage, temperature, alpha
):
    # Every valid row's label is a finite column; masked rows hold anything.
    finite = np.isfinite(student[np.arange(N), labels]) & np.isfinite(student).any(axis=1)
    mask = mask & finite
    student = np.where(mask[:, None], student, garbage)

    def loss(s):
        return losses.distill_loss_sum(
            s, teacher, labels, temperature=temperature, alpha=alpha, where=mask
        )[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(student)), np.float64)
    assert np.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    for r in np.flatnonzero(mask):
        z, t = student[r].astype(np.float64), teacher[r].astype(np.float64)
        q, q_t = np.exp(_log_softmax(z)), np.exp(_log_softmax(z / temperature))
        p_t = np.exp(_log_softmax(t / temperature))
        onehot = np.eye(V)[labels[r]]
        want = alpha * (q - onehot) + (1 - alpha) * temperature * (q_t - p_t)
        np.testing.assert_allclose(grad[r], want, rtol=1e-4, atol=1e-5)


@settings(max_examples=80)
@given(LOGITS, LOGITS, MASK, st.integers(1, V))
def test_hard_label_distill(student, teacher, mask, k):
    total, _ = losses.hard_label_distill_sum(student, teacher, k=k, where=mask)
    rows = []
    for s, t in zip(student, teacher, strict=True):
        if np.isnan(t).any() or np.isposinf(t).any():
            rows.append(math.nan)  # a garbage teacher row must show
            continue
        top = np.argsort(-t.astype(np.float64), kind="stable")[:k]
        rows.append(float(-_log_softmax(s)[top].mean()))
    _check(total, rows, mask)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


@settings(max_examples=80)
@given(
    _poisoned((N,)),
    _poisoned((N,)),
    hnp.arrays(np.float32, (N,), elements=st.sampled_from([0.0, 1.0, 0.25])),
    MASK,
    TEMPERATURE,
    ALPHA,
)
def test_binary_distill(student, teacher, labels, mask, temperature, alpha):
    total, _ = losses.binary_distill_sum(
        student, teacher, labels, temperature=temperature, alpha=alpha, where=mask
    )
    rows, scales = [], []
    for s, t, y in zip(student.astype(float), teacher.astype(float), labels, strict=True):
        if not math.isfinite(s) or math.isnan(t):
            # A student that is certain (±inf) or NaN is garbage: it must show.
            rows.append(math.nan)
            scales.append(0.0)
            continue
        with np.errstate(invalid="ignore"):
            # A teacher at ±inf is certain: the formula's limit, computed in float64.
            bce = -(_xlogy(y, _log_sigmoid(s)) + _xlogy(1 - y, _log_sigmoid(-s)))
            lp = np.array([_log_sigmoid(t / temperature), _log_sigmoid(-t / temperature)])
            lq = np.array([_log_sigmoid(s / temperature), _log_sigmoid(-s / temperature)])
        kl, scale = _kl(lp, lq)
        row = 0.0 if alpha == 0 else alpha * bce
        if alpha != 1:
            row += (1 - alpha) * temperature**2 * kl
        rows.append(row)
        scales.append((1 - alpha) * temperature**2 * scale)
    _check(total, rows, mask, scales)


def _xlogy(x: float, log_y: float) -> float:
    return 0.0 if x == 0 else x * log_y


@settings(max_examples=60)
@given(
    hnp.arrays(np.float32, (N, V), elements=FINITE),
    st.lists(st.permutations(range(V)), min_size=N, max_size=N),
    hnp.arrays(np.float32, (N, 3), elements=st.floats(-20, 0, width=32)),
    LABELS,
    MASK,
    TEMPERATURE,
    ALPHA,
    LOGITS,
)
def test_cached_distill(student, orders, log_p, labels, mask, temperature, alpha, garbage):
    ids = np.asarray([order[:3] for order in orders], np.int32)  # distinct per row
    # Stored probabilities that sum to less than 1; the rest's mass is the remainder.
    log_p = log_p - np.log(np.exp(log_p.astype(np.float64)).sum(1, keepdims=True) + 0.5)
    rest = np.log1p(-np.exp(log_p).sum(1))
    rows, scales, tiny_rest = [], [], False
    for z, i, lp, lr, y, valid in zip(student, ids, log_p, rest, labels, mask, strict=True):
        log_q = _log_softmax(z.astype(np.float64) / temperature)
        q_rest = 1.0 - np.exp(log_q[i]).sum()
        tiny_rest |= bool(valid and q_rest < 1e-4)
        with np.errstate(divide="ignore"):
            log_q_rest = np.log(max(q_rest, 0.0))
        kl, scale = _kl(np.append(lp, lr), np.append(log_q[i], log_q_rest))
        row = 0.0 if alpha == 0 else alpha * -_log_softmax(z)[y]
        if alpha != 1:
            row += (1 - alpha) * temperature**2 * kl
        rows.append(row)
        scales.append((1 - alpha) * temperature**2 * scale)
    student = np.where(mask[:, None], student, garbage)
    total, count = cached.cached_distill_sum(
        student, ids, log_p, rest, labels, temperature=temperature, alpha=alpha, where=mask
    )
    assert float(count) == mask.sum()
    if tiny_rest:
        # The student's rest mass is 1 − Σ q of the top-K, lost to rounding in float32.
        event("student rest ~ 0")
        assert math.isfinite(float(total))
        return
    _check(total, rows, mask, scales)


@functools.partial(jax.jit, static_argnames="chunk")
def _chunked(h, table, h_t, labels, mask, temperature, alpha, chunk):
    """Both chunked losses, jitted: one compile per chunk size, not per example."""
    ce, _ = chunked.chunked_cross_entropy_sum(h, table, None, labels, mask, chunk_size=chunk)
    kd, _ = chunked.chunked_distill_loss_sum(
        h,
        table,
        None,
        h_t,
        table,
        None,
        labels,
        mask,
        temperature=temperature,
        alpha=alpha,
        chunk_size=chunk,
    )
    return ce, kd


@settings(max_examples=40)
@given(
    hnp.arrays(np.float32, (N, 3), elements=FINITE),
    hnp.arrays(np.float32, (V, 3), elements=st.floats(-3, 3, width=32)),
    LABELS,
    MASK,
    TEMPERATURE,
    ALPHA,
    st.sampled_from([2, 4, 8]),
)
def test_chunked_losses_equal_the_dense_ones(h, table, labels, mask, temperature, alpha, chunk):
    labels = 1 + labels % (V - 1)  # table rows 1..V-1 are the items; row 0 is padding
    h_t = h[:, ::-1].copy()
    garbage = np.where(mask[:, None], h, np.nan)  # masked rows' hidden states are NaN
    ce, kd = _chunked(garbage, table, h_t, labels, mask, temperature, alpha, chunk)
    padding = jnp.asarray([-jnp.inf] + [0.0] * (V - 1))
    dense = jnp.asarray(h) @ table.T + padding
    want, _ = losses.cross_entropy_sum(dense, labels, where=mask)
    np.testing.assert_allclose(float(ce), float(want), rtol=1e-5, atol=1e-4)
    dense_t = jnp.asarray(h_t) @ table.T + padding
    want, _ = losses.distill_loss_sum(
        dense, dense_t, labels, temperature=temperature, alpha=alpha, where=mask
    )
    np.testing.assert_allclose(float(kd), float(want), rtol=1e-4, atol=1e-4)


@settings(max_examples=40)
@given(_poisoned((N, V)), hnp.arrays(np.bool_, (N, V)))
def test_masked_reductions_ignore_what_the_mask_leaves_out(values, mask):
    total, count = masked_sum_and_count(values, mask)
    assert float(count) == mask.sum()
    # A float32 sum is exact to about 1e-7 of the sum of magnitudes.
    _check(total, values.ravel().tolist(), mask.ravel(), np.abs(values).ravel().tolist())
    if not mask.any():
        assert float(total) == 0.0 and float(masked_mean(values, mask)) == 0.0


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_invalid_temperatures_are_refused_naming_them(temperature):
    logits = np.zeros((N, V), np.float32)
    for call in (
        lambda: losses.kl_distill_sum(logits, logits, temperature=temperature),
        lambda: losses.distill_loss_sum(
            logits, logits, np.zeros(N, np.int32), temperature=temperature, alpha=0.5
        ),
        lambda: losses.binary_distill_sum(
            logits, logits, logits, temperature=temperature, alpha=0.5
        ),
    ):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            call()
    config = synthetic.get_config("tiny")
    config.distill.temperature = temperature
    with pytest.raises(ConfigError, match=r"config\.distill\.temperature="):
        config_lib.validate(config)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, math.inf])
def test_invalid_alphas_are_refused_naming_them(alpha):
    logits = np.zeros((N, V), np.float32)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        losses.distill_loss_sum(logits, logits, np.zeros(N, np.int32), temperature=1.0, alpha=alpha)
    config = synthetic.get_config("tiny")
    config.distill.alpha = alpha
    with pytest.raises(ConfigError, match=r"config\.distill\.alpha="):
        config_lib.validate(config)
