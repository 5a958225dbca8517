"""The pallas form (distill_jax/losses/pallas_kernel.py) against float64 NumPy and the dense form.

On the CPU the kernels run in Pallas interpret mode; tiles of 8 slots × 16
items over 12 slots and 37 items leave partial tiles at both ends. That they
lower for Triton (GPU) and Mosaic (TPU) is checked through `jax.export`,
without compiling for either.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_jax import losses
from distill_jax import sharding as sharding_lib
from distill_jax.losses import auto, kernel_lib
from distill_jax.losses import pallas_kernel as pk

N, D, DT, V, S = 12, 8, 6, 37, 3
NUM_VALID = 36  # the table's last row is padding (-inf), as on a sharded mesh
TILES = dict(block_rows=8, block_items=16)
TEMP, ALPHA = 0.75, 0.25


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "h": rng.normal(size=(N, D)),
        "table": rng.normal(size=(V, D)) * 0.7,
        "bias": rng.normal(size=V) * 0.3,
        "ht": rng.normal(size=(N, DT)),
        "table_t": rng.normal(size=(V, DT)) * 0.7,
        "bias_t": rng.normal(size=V) * 0.3,
        "labels": rng.integers(1, NUM_VALID, size=N),
        "where": np.arange(N) % 4 != 2,  # three masked slots
    }
    # Teacher-only slots: one masked slot the teacher still supervises.
    x["kd_where"] = x["where"] | (np.arange(N) == 2)
    seen = rng.integers(1, NUM_VALID, size=(N, S))
    seen[:, -1] = 0  # 0: no id
    x["seen"] = np.where(seen == x["labels"][:, None], 0, seen)
    return x


def _masked(z, seen):
    z = z.copy()
    z[:, 0] = -np.inf
    z[:, NUM_VALID:] = -np.inf
    if seen is not None:
        for n in range(z.shape[0]):
            z[n, seen[n][seen[n] > 0]] = -np.inf
    return z


def _log_softmax(z):
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _reference(x, soft, exclude, slots):
    """(mean loss, d_hidden, d_table, d_bias) in float64."""
    seen = x["seen"] if exclude else None
    z = _masked(x["h"] @ x["table"].T + x["bias"], seen)
    log_q = _log_softmax(z)
    rows = np.arange(N)
    onehot = np.eye(V)[x["labels"]]
    ce = -log_q[rows, x["labels"]]
    labelled = x["where"]
    if soft:
        t = _masked(x["ht"] @ x["table_t"].T + x["bias_t"], seen)
        log_p, log_qt = _log_softmax(t / TEMP), _log_softmax(z / TEMP)
        p = np.exp(log_p)
        with np.errstate(invalid="ignore"):
            kl = np.where(p > 0, p * (log_p - log_qt), 0).sum(-1)
        valid = x["kd_where"] if slots else labelled
        per_row = ALPHA * np.where(labelled, ce, 0) + (1 - ALPHA) * TEMP**2 * kl
        grad = ALPHA * (np.exp(log_q) - onehot) * labelled[:, None]
        grad = grad + (1 - ALPHA) * TEMP * (np.exp(log_qt) - p)
    else:
        valid, per_row, grad = labelled, ce, np.exp(log_q) - onehot
    grad = np.where(valid[:, None] & np.isfinite(z), grad, 0) / valid.sum()
    loss = np.where(valid, per_row, 0).sum() / valid.sum()
    return loss, grad @ x["table"], grad.T @ x["h"], grad.sum(0)


def _garbage(x):
    """Masked slots hold anything: NaN hidden states, label -1, NaN teacher rows."""
    out = {k: np.array(v) for k, v in x.items()}
    out["h"][~x["kd_where"]] = np.nan
    out["ht"][~x["kd_where"]] = np.nan
    out["labels"][~x["where"]] = -1
    return out


def _loss_fns(x, soft, exclude, slots):
    """(pallas loss, dense loss) of (h, table, bias)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    seen = jnp.asarray(x["seen"], jnp.int32) if exclude else None
    labels, where = jnp.asarray(x["labels"], jnp.int32), jnp.asarray(x["where"])
    teacher = (f32(x["ht"]), f32(x["table_t"]), f32(x["bias_t"]))
    kd_where = jnp.asarray(x["kd_where"]) if slots else where

    def logits(h, table, bias):
        z = h @ table.T + bias
        col = jnp.arange(V)
        z = jnp.where((col == 0) | (col >= NUM_VALID), -jnp.inf, z)
        return z if seen is None else losses.exclude_columns(z, seen)

    def pallas(h, table, bias):
        if not soft:
            return pk.pallas_cross_entropy(
                h, table, bias, labels, where, seen=seen, num_valid_rows=NUM_VALID, **TILES
            )
        return pk.pallas_distill_loss(
            h, table, bias, *teacher, labels, kd_where, where if slots else None,
            temperature=TEMP, alpha=ALPHA, seen=seen, num_valid_rows=NUM_VALID, **TILES,
        )  # fmt: skip

    def dense(h, table, bias):
        if not soft:
            return losses.cross_entropy(logits(h, table, bias), labels, where=where)
        return losses.distill_loss(
            logits(h, table, bias), logits(*teacher), labels, temperature=TEMP, alpha=ALPHA,
            where=kd_where, label_where=where if slots else None,
        )  # fmt: skip

    return pallas, dense


CASES = [
    pytest.param(False, False, False, id="label"),
    pytest.param(False, True, False, id="label-exclude"),
    pytest.param(True, True, False, id="soft-exclude"),
    pytest.param(True, True, True, id="soft-exclude-slots"),
]


@pytest.mark.parametrize("soft,exclude,slots", CASES)
def test_values_and_gradients_match_float64_and_the_dense_form(soft, exclude, slots):
    x = _data()
    want = _reference(x, soft, exclude, slots)
    pallas, dense = _loss_fns(_garbage(x), soft, exclude, slots)
    args = tuple(jnp.asarray(_garbage(x)[k], jnp.float32) for k in ("h", "table", "bias"))
    got = jax.jit(jax.value_and_grad(pallas, argnums=(0, 1, 2)))(*args)
    chex.assert_shape(got[1], [(N, D), (V, D), (V,)])
    chex.assert_tree_all_finite(got)
    np.testing.assert_allclose(float(got[0]), want[0], rtol=2e-5)
    for g, ref, name in zip(got[1], want[1:], ("d_hidden", "d_table", "d_bias"), strict=True):
        np.testing.assert_allclose(np.asarray(g), ref, rtol=2e-4, atol=2e-6, err_msg=name)
    # The dense form multiplies masked slots' hidden states into d_table: give it zeros.
    finite = (jnp.nan_to_num(args[0]),) + args[1:]
    other = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2)))(*finite)
    chex.assert_trees_all_close(got, other, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("mesh_shape", [(4, 2), (2, 1)])
def test_on_a_mesh_each_device_takes_its_slots(mesh_shape):
    """Slots split along 'data' (3 or 6 per device: a partial block each), tables whole."""
    x = _data()
    want = _reference(x, True, True, True)
    pallas, _ = _loss_fns(_garbage(x), True, True, True)
    args = tuple(jnp.asarray(_garbage(x)[k], jnp.float32) for k in ("h", "table", "bias"))
    cfg = ml_collections.ConfigDict({"data": mesh_shape[0], "model": mesh_shape[1]})
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    with jax.set_mesh(sharding_lib.make_mesh(cfg, devices=devices)):
        got = jax.jit(jax.value_and_grad(pallas, argnums=(0, 1, 2)))(*args)
        with pytest.raises(ValueError, match=r"pallas form splits its 9 rows .* 'data'"):
            pk.pallas_cross_entropy(args[0][:9], args[1], None, jnp.ones(9, jnp.int32))
    np.testing.assert_allclose(float(got[0]), want[0], rtol=2e-5)
    for g, ref, name in zip(got[1], want[1:], ("d_hidden", "d_table", "d_bias"), strict=True):
        np.testing.assert_allclose(np.asarray(g), ref, rtol=2e-4, atol=2e-6, err_msg=name)


def test_alpha_gets_its_gradient_and_bfloat16_comes_back_in_kind():
    x = _data(1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    labels, where = jnp.asarray(x["labels"], jnp.int32), jnp.asarray(x["where"])
    h, table = f32(x["h"]), f32(x["table"])
    t = f32(x["ht"]) @ f32(x["table_t"]).T
    t = jnp.where(jnp.arange(V) == 0, -jnp.inf, t)

    def pallas(alpha, h):
        return pk.pallas_distill_loss(
            h, table, None, f32(x["ht"]), f32(x["table_t"]), None, labels, where,
            temperature=1.0, alpha=alpha, **TILES,
        )  # fmt: skip

    def dense(alpha, h):
        z = jnp.where(jnp.arange(V) == 0, -jnp.inf, h @ table.T)
        return losses.distill_loss(z, t, labels, temperature=1.0, alpha=alpha, where=where)

    got = jax.jit(jax.grad(pallas, argnums=(0, 1)))(0.4, h)
    want = jax.jit(jax.grad(dense, argnums=(0, 1)))(0.4, h)
    chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-6)
    g16 = jax.jit(jax.grad(pallas, argnums=1))(0.4, h.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16


def test_large_logits_and_a_small_temperature_stay_exact():
    """The online logsumexp: logits of a few hundred, T = 0.25, item tiles of 16."""
    x = _data(2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    h, ht = f32(x["h"]) * 40, f32(x["ht"]) * 40
    table, tt = f32(x["table"]), f32(x["table_t"])
    labels = jnp.asarray(x["labels"], jnp.int32)
    pad = jnp.arange(V) == 0

    def pallas(h):
        return pk.pallas_distill_loss(
            h, table, None, ht, tt, None, labels, temperature=0.25, alpha=0.5, **TILES
        )

    def dense(h):
        z, t = jnp.where(pad, -jnp.inf, h @ table.T), jnp.where(pad, -jnp.inf, ht @ tt.T)
        return losses.distill_loss(z, t, labels, temperature=0.25, alpha=0.5)

    got = jax.jit(jax.value_and_grad(pallas))(h)
    want = jax.jit(jax.value_and_grad(dense))(h)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_wrong_arguments_are_refused_in_one_message_each():
    x = _data()
    h, table = jnp.asarray(x["h"], jnp.float32), jnp.asarray(x["table"], jnp.float32)
    labels = jnp.asarray(x["labels"], jnp.int32)
    with pytest.raises(ValueError, match=r"block_items must be a power of two >= 16 on GPU"):
        pk.pallas_cross_entropy(h, table, None, labels, platform="gpu", block_items=48)
    with pytest.raises(ValueError, match=r"block_rows must be a multiple of 8 on TPU, got 12"):
        pk.pallas_cross_entropy(h, table, None, labels, platform="tpu", block_rows=12)
    with pytest.raises(ValueError, match=r"no CPU lowering.*interpret mode"):
        pk.pallas_cross_entropy(h, table, None, labels, platform="cpu", interpret=False)
    with pytest.raises(ValueError, match=r"num_valid_rows=40 must be in \[2, 37\]"):
        pk.pallas_cross_entropy(h, table, None, labels, num_valid_rows=40)
    # A label outside the table at a valid slot: NaN, never a finite wrong loss.
    bad = labels.at[0].set(V)
    assert np.isnan(float(pk.pallas_cross_entropy(h, table, None, bad, **TILES)))


@pytest.mark.parametrize("platform,target", [("gpu", "cuda"), ("tpu", "tpu")])
def test_the_kernels_lower_for_triton_and_mosaic(platform, target):
    """Lowered (not compiled) for the accelerator from this CPU: the forward and both
    backward kernels of the soft target with exclude_history, at the platform's tiles."""
    # 70 slots and 300 items: padded sizes (96, 384 on GPU) that are no powers of two.
    f32, i32, n, v = jnp.float32, jnp.int32, 70, 300
    shapes = [(n, D, f32), (v, D, f32), (v, f32), (n, DT, f32), (v, DT, f32), (v, f32)]
    shapes += [(n, i32), (n, jnp.bool_), (n, S, i32)]
    specs = [jax.ShapeDtypeStruct(s[:-1], s[-1]) for s in shapes]

    def loss(h, table, bias, ht, tt, bt, labels, where, seen):
        return pk.pallas_distill_loss(
            h, table, bias, ht, tt, bt, labels, where,
            temperature=TEMP, alpha=ALPHA, seen=seen, platform=platform,
        )  # fmt: skip

    checks = [
        jax.export.DisabledSafetyCheck.custom_call(name)
        for name in ("__gpu$xla.gpu.triton", "tpu_custom_call")
    ]
    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
        platforms=[target],
        disabled_checks=checks,
    )(*specs)
    text = exported.mlir_module()
    for name in ("forward", "d_hidden", "d_table"):
        assert f"distill_jax_pallas_{name}" in text


def test_auto_picks_pallas_on_gpu_and_tpu_never_on_the_cpu(monkeypatch):
    """Once in auto's accelerator slot (empty until the kernels are timed on a device)."""
    monkeypatch.setattr(auto, "_logged", set())
    monkeypatch.setattr(auto, "ACCELERATOR_FORMS", ("pallas",))
    for backend in ("gpu", "tpu"):
        where = auto.Where(backend)
        for target in ("label", "soft", "hard"):
            options = dict(exclude_history=True, teacher_only_slots=target != "label")
            assert losses.resolve_form("auto", target, where, **options) == "pallas"
        # Refused where it has no pair or option: those stages keep the dense form.
        assert losses.resolve_form("auto", "ranking", where) == "dense"
        assert losses.resolve_form("auto", "soft", where, model_logits=True) == "dense"
        assert losses.resolve_form("auto", "soft", auto.Where(backend, 8, 1)) == "pallas"
        assert losses.resolve_form("auto", "soft", auto.Where(backend, 8, 2)) == "vocab_parallel"
    for built in (None, "no compiler"):
        monkeypatch.setattr(kernel_lib, "unavailable_reason", lambda b=built: b)
        for target in ("label", "soft", "ranking"):
            assert losses.resolve_form("auto", target, auto.Where("cpu")) != "pallas"
    with pytest.raises(ValueError, match=r"config\.loss\.form='pallas' has no vocab-sharded"):
        losses.resolve_form("pallas", "soft", auto.Where("gpu", 8, 2))


def test_the_benchmark_times_dense_against_pallas_on_tiny_shapes():
    """benchmarks/distill_kernel.py --variants dense,pallas (interpreted here: tiny shapes)."""
    from benchmarks import common, distill_kernel

    args = common.parse_flags(
        ["distill_kernel", "--variants=dense,pallas", "--rows=16", "--items=33"]
        + ["--d_teacher=8", "--d_student=4", "--rounds=1", "--calls=1"]
        + ["--pallas_block_rows=8", "--pallas_block_items=16"],
        distill_kernel.define_flags,
    )
    # run() checks the pallas variant's value and gradients against dense first.
    rows = distill_kernel.run(args)
    assert [r["variant"] for r in rows] == ["dense", "pallas"]
    assert all(r["median_ms"] > 0 for r in rows)
