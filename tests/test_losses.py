"""Tests for distill_jax.losses against float64 NumPy references and properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses

NEG_INF_COLUMNS = (0, 4)  # 0 is padding; 4 stands for any item masked out of the catalogue
V = 9


# --------------------------------------------------------------------------
# float64 NumPy references, written independently of the code under test.
# --------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_masked_mean(values, where):
    if where is None:
        return float(np.mean(values))
    n = int(np.sum(where))
    return float(np.sum(values[where]) / n) if n else 0.0


def np_cross_entropy_rows(logits, labels):
    log_p = np_log_softmax(logits)
    return -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


def np_kl_rows(student, teacher, temperature):
    log_q = np_log_softmax(np.asarray(student, np.float64) / temperature)
    log_p = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    p = np.exp(log_p)
    terms = np.zeros_like(p)
    support = p > 0  # 0·log 0 = 0 on columns the teacher rules out
    terms[support] = p[support] * (log_p[support] - log_q[support])
    return temperature**2 * terms.sum(-1)


def np_cross_entropy(logits, labels, where=None):
    return np_masked_mean(np_cross_entropy_rows(logits, labels), where)


def np_kl_distill(student, teacher, temperature, where=None):
    return np_masked_mean(np_kl_rows(student, teacher, temperature), where)


def np_distill_loss(student, teacher, labels, temperature, alpha, where=None):
    rows = alpha * np_cross_entropy_rows(student, labels)
    rows = rows + (1 - alpha) * np_kl_rows(student, teacher, temperature)
    return np_masked_mean(rows, where)


def np_distill_grad(student, teacher, labels, temperature, alpha, where=None):
    """The closed form, computed directly (not through any autodiff)."""
    onehot = np.eye(student.shape[-1])[labels]
    q = np_softmax(np.asarray(student, np.float64) / temperature)
    p = np_softmax(np.asarray(teacher, np.float64) / temperature)
    grad = alpha * (np_softmax(student) - onehot) + (1 - alpha) * temperature * (q - p)
    if where is None:
        return grad / np.prod(labels.shape)
    return np.where(where[..., None], grad, 0.0) / max(int(where.sum()), 1)


def np_hard_label_distill(student, teacher, k, where=None):
    top = np.argsort(-np.asarray(teacher, np.float64), axis=-1, kind="stable")[..., :k]
    log_q = np_log_softmax(student)
    rows = -np.take_along_axis(log_q, top, axis=-1).mean(-1)
    return np_masked_mean(rows, where)


def np_binary_distill(student, teacher, labels, temperature, alpha, where=None):
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    y = np.asarray(labels, np.float64)
    bce = -(y * np_log_sigmoid(s) + (1 - y) * np_log_sigmoid(-s))
    p1, p0 = np_sigmoid(t / temperature), np_sigmoid(-t / temperature)
    kl = p1 * (np_log_sigmoid(t / temperature) - np_log_sigmoid(s / temperature)) + p0 * (
        np_log_sigmoid(-t / temperature) - np_log_sigmoid(-s / temperature)
    )
    rows = alpha * bce + (1 - alpha) * temperature**2 * kl
    return np_masked_mean(rows, where)


# --------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------


def make_logits(rng, shape, huge=False):
    """float32 logits; `huge` puts every entry near ±1e4 (no ties)."""
    x = rng.normal(size=shape)
    if huge:
        x = x + rng.choice([-1e4, 1e4], size=shape)
    x[..., list(NEG_INF_COLUMNS)] = -np.inf
    return x.astype(np.float32)


def make_batch(seed=0, lead=(3, 4), huge=False):
    rng = np.random.default_rng(seed)
    student = make_logits(rng, lead + (V,), huge)
    teacher = make_logits(rng, lead + (V,), huge)
    finite_columns = [c for c in range(V) if c not in NEG_INF_COLUMNS]
    labels = rng.choice(finite_columns, size=lead).astype(np.int32)
    where = rng.random(lead) < 0.6
    where.flat[0], where.flat[-1] = True, False  # at least one valid, one masked
    return student, teacher, labels, where


def corrupt_masked(student, teacher, labels, where):
    """Puts garbage at masked positions; results must not change."""
    student, teacher, labels = student.copy(), teacher.copy(), labels.copy()
    masked = ~where
    student[masked] = np.nan
    teacher[masked] = -np.inf  # an all -inf row has no softmax at all
    labels[masked] = -1
    return student, teacher, labels


def tolerance(huge):
    # Near ±1e4, float32 spacing is ~1e-3, so rounding of the inputs' shifts
    # alone costs absolute errors of that order in values of order 1e4.
    return {"rtol": 1e-5, "atol": 2e-2} if huge else {"rtol": 1e-5, "atol": 1e-5}


# --------------------------------------------------------------------------
# Reference checks.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_entropy_matches_numpy(huge, masked):
    student, _, labels, where = make_batch(1, huge=huge)
    where = where if masked else None
    got = losses.cross_entropy(student, labels, where=where)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(got, np_cross_entropy(student, labels, where), **tolerance(huge))


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_distill_matches_numpy(huge, temperature):
    student, teacher, _, where = make_batch(2, huge=huge)
    got = losses.kl_distill(student, teacher, temperature=temperature, where=where)
    want = np_kl_distill(student, teacher, temperature, where)
    np.testing.assert_allclose(got, want, **tolerance(huge))
    assert want > 0  # otherwise the comparison would be vacuous


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.3), (0.5, 0.0), (3.0, 0.7), (2.0, 1.0)])
def test_distill_loss_matches_numpy(huge, temperature, alpha):
    student, teacher, labels, where = make_batch(3, huge=huge)
    loss_fn = lambda s: losses.distill_loss(
        s, teacher, labels, temperature=temperature, alpha=alpha, where=where
    )
    value, grad = jax.value_and_grad(loss_fn)(jnp.asarray(student))
    want = np_distill_loss(student, teacher, labels, temperature, alpha, where)
    np.testing.assert_allclose(value, want, **tolerance(huge))
    want_grad = np_distill_grad(student, teacher, labels, temperature, alpha, where)
    chex.assert_shape(grad, student.shape)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (1.0, 0.0), (2.5, 0.3), (1.0, 1.0)])
def test_teacher_only_rows_add_their_kl_term_alone(temperature, alpha):
    student, teacher, labels, where = make_batch(21)
    rng = np.random.default_rng(22)
    label_where = where & (rng.random(where.shape) < 0.5)
    label_where.flat[0] = True
    assert (where & ~label_where).any()  # some teacher-only rows
    labels = np.where(label_where, labels, 0)  # column 0 is -inf: a label there would be inf
    loss_fn = lambda s: losses.distill_loss(
        s,
        teacher,
        labels,
        temperature=temperature,
        alpha=alpha,
        where=where,
        label_where=label_where,
    )
    value, grad = jax.value_and_grad(loss_fn)(jnp.asarray(student))
    # float64 reference: CE on labelled rows, KL on every valid row, mean over `where`.
    ce = np.where(label_where, np_cross_entropy_rows(student, np.where(label_where, labels, 1)), 0)
    rows = alpha * ce + (1 - alpha) * np_kl_rows(student, teacher, temperature)
    np.testing.assert_allclose(value, rows[where].sum() / where.sum(), rtol=1e-5, atol=1e-6)
    onehot = np.eye(V)[labels]
    q = np_softmax(np.asarray(student, np.float64) / temperature)
    p = np_softmax(np.asarray(teacher, np.float64) / temperature)
    a = alpha * label_where[..., None]
    want = a * (np_softmax(student) - onehot) + (1 - alpha) * temperature * (q - p)
    want = np.where(where[..., None], want, 0.0) / where.sum()
    chex.assert_tree_all_finite(grad)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    # Every row labelled: the same as no label_where at all.
    both = [
        losses.distill_loss(
            student,
            teacher,
            np.where(where, labels, 1),
            temperature=temperature,
            alpha=alpha,
            where=where,
            label_where=lw,
        )
        for lw in (where, None)
    ]
    np.testing.assert_allclose(both[0], both[1], rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("huge", [False, True])
def test_hard_label_distill_matches_numpy(k, huge):
    student, teacher, _, where = make_batch(4, huge=huge)
    got = losses.hard_label_distill(student, teacher, k=k, where=where)
    np.testing.assert_allclose(
        got, np_hard_label_distill(student, teacher, k, where), **tolerance(huge)
    )


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.2), (0.5, 1.0)])
def test_binary_distill_matches_numpy(huge, temperature, alpha):
    rng = np.random.default_rng(5)
    shape = (4, 6)
    student = rng.normal(size=shape) * 3 + (rng.choice([-1e4, 1e4], size=shape) if huge else 0)
    teacher = rng.normal(size=shape) * 3 + (rng.choice([-1e4, 1e4], size=shape) if huge else 0)
    student, teacher = student.astype(np.float32), teacher.astype(np.float32)
    labels = rng.integers(0, 2, size=shape)
    where = rng.random(shape) < 0.7
    got = losses.binary_distill(
        student, teacher, labels, temperature=temperature, alpha=alpha, where=where
    )
    want = np_binary_distill(student, teacher, labels, temperature, alpha, where)
    np.testing.assert_allclose(got, want, **tolerance(huge))


def test_sum_variants_return_sum_and_count():
    student, teacher, labels, where = make_batch(6)
    n = int(where.sum())
    cases = [
        (losses.cross_entropy_sum(student, labels, where=where),
         np_cross_entropy(student, labels, where)),
        (losses.kl_distill_sum(student, teacher, temperature=2.0, where=where),
         np_kl_distill(student, teacher, 2.0, where)),
        (losses.distill_loss_sum(student, teacher, labels, temperature=2.0, alpha=0.4,
                                 where=where),
         np_distill_loss(student, teacher, labels, 2.0, 0.4, where)),
        (losses.hard_label_distill_sum(student, teacher, k=2, where=where),
         np_hard_label_distill(student, teacher, 2, where)),
    ]  # fmt: skip
    for (total, count), mean in cases:
        assert float(count) == n
        np.testing.assert_allclose(total, mean * n, rtol=1e-5)
    total, count = losses.cross_entropy_sum(student, labels)
    assert float(count) == labels.size
    np.testing.assert_allclose(total, np_cross_entropy(student, labels) * labels.size, rtol=1e-5)


def test_masked_mean_and_sum_and_count():
    values = np.array([[1.0, 2.0, np.nan], [4.0, np.inf, 6.0]], np.float32)
    where = np.array([[True, True, False], [True, False, True]])
    total, count = losses.masked_sum_and_count(values, where)
    assert (float(total), float(count)) == (13.0, 4.0)
    assert float(losses.masked_mean(values, where)) == 13.0 / 4
    assert float(losses.masked_mean(values[:, :2][:1])) == 1.5
    grad = jax.grad(lambda v: losses.masked_mean(v, where))(jnp.asarray(values))
    np.testing.assert_array_equal(grad, np.where(where, 0.25, 0.0))


# --------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("huge", [False, True])
def test_kl_of_identical_distributions_is_zero(huge):
    logits, _, labels, _ = make_batch(7, huge=huge)
    for temperature in (0.5, 1.0, 3.0):
        kl = losses.kl_distill(logits, logits, temperature=temperature)
        assert abs(float(kl)) <= 1e-6 * temperature**2
        fused = losses.distill_loss(logits, logits, labels, temperature=temperature, alpha=0.0)
        assert abs(float(fused)) <= 1e-6 * temperature**2


def per_row_kl(student, teacher, temperature):
    return jax.vmap(lambda s, t: losses.kl_distill(s, t, temperature=temperature))(student, teacher)


def test_kl_is_nonnegative():
    student, teacher, labels, _ = make_batch(100, lead=(64,))
    for temperature in (0.5, 2.0):
        rows = per_row_kl(student, teacher, temperature)
        assert float(jnp.min(rows)) > 0.0  # distinct distributions: strictly positive
        fused = losses.distill_loss(student, teacher, labels, temperature=temperature, alpha=0.0)
        np.testing.assert_allclose(fused, jnp.mean(rows), rtol=1e-5)
    # Nearly identical distributions: KL is ~1e-9, and float32 rounding of the
    # O(1) terms may only push it below zero by a few ulps of those terms.
    close = np.where(np.isfinite(teacher), student + 1e-4 * teacher, teacher)
    for temperature in (0.5, 2.0):
        rows = per_row_kl(student, close, temperature)
        assert float(jnp.min(rows)) >= -1e-6 * temperature**2
        assert float(jnp.max(rows)) <= 1e-6 * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_distill_gradient_closed_form(temperature):
    student, teacher, _, where = make_batch(8)
    grad = jax.grad(lambda s: losses.kl_distill(s, teacher, temperature=temperature, where=where))(
        jnp.asarray(student)
    )
    q = np_softmax(student.astype(np.float64) / temperature)
    p = np_softmax(teacher.astype(np.float64) / temperature)
    want = temperature * (q - p) / where.sum()
    want[~where] = 0.0
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[~where] == 0.0)
    assert np.all(np.asarray(grad)[..., list(NEG_INF_COLUMNS)] == 0.0)


def test_t_squared_scaling():
    # Scaling logits and T by c leaves both softmaxes unchanged, so the
    # T²-weighted KL scales by exactly c².
    student, teacher, labels, where = make_batch(9)
    c = 3.0
    base = losses.kl_distill(student, teacher, temperature=1.5, where=where)
    scaled = losses.kl_distill(c * student, c * teacher, temperature=1.5 * c, where=where)
    np.testing.assert_allclose(scaled, c**2 * base, rtol=1e-5)
    fused = losses.distill_loss(
        c * student, c * teacher, labels, temperature=1.5 * c, alpha=0.0, where=where
    )
    np.testing.assert_allclose(fused, c**2 * base, rtol=1e-5)
    # And T² is really there: at T the loss is T² times the plain KL.
    plain = np_kl_distill(student / 1.5, teacher / 1.5, 1.0, where)
    np.testing.assert_allclose(base, 1.5**2 * plain, rtol=1e-5)


def test_alpha_endpoints_reduce_to_single_losses():
    student, teacher, labels, where = make_batch(10)
    student = jnp.asarray(student)
    ce = lambda s: losses.cross_entropy(s, labels, where=where)
    kl = lambda s: losses.kl_distill(s, teacher, temperature=2.0, where=where)
    mix = lambda alpha: (
        lambda s: losses.distill_loss(s, teacher, labels, temperature=2.0, alpha=alpha, where=where)
    )
    for alpha, single in ((1.0, ce), (0.0, kl)):
        np.testing.assert_allclose(mix(alpha)(student), single(student), rtol=1e-6)
        np.testing.assert_allclose(
            jax.grad(mix(alpha))(student), jax.grad(single)(student), rtol=1e-5, atol=1e-7
        )
    binary = losses.binary_distill(
        student[..., 1], teacher[..., 1], labels % 2, temperature=2.0, alpha=1.0
    )
    bce = -np.mean(
        np.where(labels % 2, np_log_sigmoid(student[..., 1]), np_log_sigmoid(-student[..., 1]))
    )
    np.testing.assert_allclose(binary, bce, rtol=1e-5)


def test_pure_kd_ignores_labels_even_on_neg_inf_columns():
    # alpha=0 must not read labels into the value: 0·inf would be NaN.
    student, teacher, _, where = make_batch(22)
    padding_labels = np.zeros(where.shape, np.int32)  # column 0 is -inf
    for temperature in (1.0, 2.0):
        pure = losses.distill_loss(
            student, teacher, padding_labels, temperature=temperature, alpha=0.0, where=where
        )
        kl = losses.kl_distill(student, teacher, temperature=temperature, where=where)
        np.testing.assert_allclose(pure, kl, rtol=1e-6)
    assert np.isinf(float(losses.cross_entropy(student, padding_labels, where=where)))


@pytest.mark.parametrize(
    "temperature,alpha", [(1.0, 0.0), (1.0, 0.5), (0.5, 0.3), (3.0, 0.8), (2.0, 1.0)]
)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_distill_equals_composition(temperature, alpha, masked):
    student, teacher, labels, where = make_batch(11)
    where = where if masked else None

    def composition(s, a):
        return a * losses.cross_entropy(s, labels, where=where) + (1 - a) * losses.kl_distill(
            s, teacher, temperature=temperature, where=where
        )

    def fused(s, a):
        return losses.distill_loss(
            s, teacher, labels, temperature=temperature, alpha=a, where=where
        )

    args = (jnp.asarray(student), jnp.float32(alpha))
    (v_fused, g_fused) = jax.value_and_grad(fused, argnums=(0, 1))(*args)
    (v_comp, g_comp) = jax.value_and_grad(composition, argnums=(0, 1))(*args)
    np.testing.assert_allclose(v_fused, v_comp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_fused[0], g_comp[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_fused[1], g_comp[1], rtol=1e-5, atol=1e-5)  # d/d alpha
    chex.assert_tree_all_finite(g_fused)


def test_fused_distill_under_jit_with_traced_hyperparameters():
    student, teacher, labels, where = make_batch(12)

    @jax.jit
    def step(s, t, temperature, alpha):
        return jax.value_and_grad(
            lambda s: losses.distill_loss(
                s, t, labels, temperature=temperature, alpha=alpha, where=where
            )
        )(s)

    value, grad = step(student, teacher, 2.0, 0.25)
    np.testing.assert_allclose(
        value, np_distill_loss(student, teacher, labels, 2.0, 0.25, where), rtol=1e-5
    )
    np.testing.assert_allclose(
        grad, np_distill_grad(student, teacher, labels, 2.0, 0.25, where), atol=1e-6
    )
    # Temperature is a hyper-parameter: it is documented to get no gradient.
    d_temperature = jax.grad(
        lambda temp: losses.distill_loss(student, teacher, labels, temperature=temp, alpha=0.5)
    )(2.0)
    assert float(d_temperature) == 0.0


def test_teacher_receives_no_gradient():
    student, teacher, labels, where = make_batch(13)
    teacher = jnp.asarray(teacher)
    fns = [
        lambda t: losses.kl_distill(student, t, temperature=2.0, where=where),
        lambda t: losses.distill_loss(student, t, labels, temperature=2.0, alpha=0.5, where=where),
        lambda t: losses.hard_label_distill(student, t, k=2, where=where),
        lambda t: losses.binary_distill(
            student[..., 1], t[..., 1], labels % 2, temperature=2.0, alpha=0.5
        ),
    ]
    for fn in fns:
        np.testing.assert_array_equal(jax.grad(fn)(teacher), np.zeros(teacher.shape))


def test_hard_label_k1_is_cross_entropy_against_teacher_argmax():
    student, teacher, _, where = make_batch(14)
    student = jnp.asarray(student)
    argmax = np.argmax(teacher, axis=-1)
    hard = lambda s: losses.hard_label_distill(s, teacher, k=1, where=where)
    ce = lambda s: losses.cross_entropy(s, argmax, where=where)
    np.testing.assert_allclose(hard(student), ce(student), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(hard)(student), jax.grad(ce)(student), atol=1e-7)


def all_losses(student, teacher, labels, where):
    """Every loss, as a function of the student logits only."""
    return {
        "cross_entropy": lambda s: losses.cross_entropy(s, labels, where=where),
        "kl_distill": lambda s: losses.kl_distill(s, teacher, temperature=2.0, where=where),
        "distill_loss": lambda s: losses.distill_loss(
            s, teacher, labels, temperature=2.0, alpha=0.3, where=where
        ),
        "distill_loss_t1": lambda s: losses.distill_loss(
            s, teacher, labels, temperature=1.0, alpha=0.3, where=where
        ),
        "hard_label_distill": lambda s: losses.hard_label_distill(s, teacher, k=2, where=where),
    }


def test_fully_masked_batch_gives_zero_and_finite_gradients():
    student, teacher, labels, where = make_batch(15)
    none_valid = np.zeros_like(where)
    student, teacher, labels = corrupt_masked(student, teacher, labels, none_valid)
    for name, fn in all_losses(student, teacher, labels, none_valid).items():
        value, grad = jax.value_and_grad(fn)(jnp.asarray(student))
        assert float(value) == 0.0, name
        np.testing.assert_array_equal(grad, np.zeros(student.shape), err_msg=name)
    binary = lambda s: losses.binary_distill(
        s, teacher[..., 1], labels, temperature=2.0, alpha=0.5, where=none_valid
    )
    value, grad = jax.value_and_grad(binary)(jnp.asarray(student[..., 1]))
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros(grad.shape))


def test_garbage_at_masked_positions_changes_nothing():
    student, teacher, labels, where = make_batch(16)
    dirty = corrupt_masked(student, teacher, labels, where)
    clean_fns = all_losses(student, teacher, labels, where)
    dirty_fns = all_losses(*dirty, where)
    for name in clean_fns:
        v_clean, g_clean = jax.value_and_grad(clean_fns[name])(jnp.asarray(student))
        v_dirty, g_dirty = jax.value_and_grad(dirty_fns[name])(jnp.asarray(dirty[0]))
        np.testing.assert_allclose(v_dirty, v_clean, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-6, atol=1e-8, err_msg=name)
        assert np.all(np.asarray(g_dirty)[~where] == 0.0), name


def test_neg_inf_columns_have_zero_finite_gradients():
    student, teacher, labels, where = make_batch(17, huge=True)
    for name, fn in all_losses(student, teacher, labels, where).items():
        value, grad = jax.value_and_grad(fn)(jnp.asarray(student))
        chex.assert_tree_all_finite((value, grad))
        assert np.all(np.asarray(grad)[..., list(NEG_INF_COLUMNS)] == 0.0), name


def test_bfloat16_logits_are_computed_in_float32():
    student, teacher, labels, where = make_batch(18)
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    fn = lambda s: losses.distill_loss(s, t16, labels, temperature=2.0, alpha=0.5, where=where)
    value, grad = jax.value_and_grad(fn)(s16)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    # Reference on the bf16-rounded inputs: only the final cast may lose bits.
    s32, t32 = np.asarray(s16, np.float32), np.asarray(t16, np.float32)
    np.testing.assert_allclose(value, np_distill_loss(s32, t32, labels, 2.0, 0.5, where), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grad, np.float32),
        np_distill_grad(s32, t32, labels, 2.0, 0.5, where),
        rtol=1e-2,
        atol=1e-4,
    )
    # The autodiff losses upcast too.
    others = [
        (losses.cross_entropy(s16, labels, where=where), np_cross_entropy(s32, labels, where)),
        (
            losses.kl_distill(s16, t16, temperature=2.0, where=where),
            np_kl_distill(s32, t32, 2.0, where),
        ),
        (
            losses.hard_label_distill(s16, t16, k=2, where=where),
            np_hard_label_distill(s32, t32, 2, where),
        ),
        (
            losses.binary_distill(
                s16[..., 1], t16[..., 1], labels % 2, temperature=2.0, alpha=0.5, where=where
            ),
            np_binary_distill(s32[..., 1], t32[..., 1], labels % 2, 2.0, 0.5, where),
        ),
    ]
    for got, want in others:
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sharded_inputs_give_the_same_result():
    # Data-parallel sharding must not change the mean (it is a global mean).
    student, teacher, labels, where = make_batch(19, lead=(8, 3))
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = [jax.device_put(x, sharding) for x in (student, teacher, labels, where)]
    fn = jax.jit(
        lambda s, t, y, w: losses.distill_loss(s, t, y, temperature=2.0, alpha=0.5, where=w)
    )
    np.testing.assert_allclose(
        fn(*sharded), np_distill_loss(student, teacher, labels, 2.0, 0.5, where), rtol=1e-5
    )


# --------------------------------------------------------------------------
# Argument validation.
# --------------------------------------------------------------------------


def test_bad_hyperparameters_raise_clear_errors():
    student, teacher, labels, _ = make_batch(20)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            losses.kl_distill(student, teacher, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            losses.distill_loss(student, teacher, labels, temperature=bad, alpha=0.5)
        with pytest.raises(ValueError, match="temperature"):
            losses.binary_distill(
                student[..., 1], teacher[..., 1], labels, temperature=bad, alpha=0.5
            )
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            losses.distill_loss(student, teacher, labels, temperature=1.0, alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            losses.binary_distill(
                student[..., 1], teacher[..., 1], labels, temperature=1.0, alpha=bad
            )
    for bad in (0, -1, V + 1, 1.0, True):
        with pytest.raises(ValueError, match="k must be a Python int"):
            losses.hard_label_distill(student, teacher, k=bad)


def test_bad_shapes_raise_clear_errors():
    student, teacher, labels, where = make_batch(21)
    with pytest.raises(ValueError, match="where must have shape"):
        losses.cross_entropy(student, labels, where=where[:, :2])
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.cross_entropy(student, labels[:, :2])
    with pytest.raises(TypeError, match="labels must be integer"):
        losses.cross_entropy(student, labels.astype(np.float32))
    with pytest.raises(ValueError, match="same shape"):
        losses.kl_distill(student, teacher[..., :-1], temperature=1.0)
    with pytest.raises(TypeError, match="boolean"):
        losses.kl_distill(student, teacher, temperature=1.0, where=where.astype(np.float32))
