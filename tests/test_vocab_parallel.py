"""Tests for distill_jax.vocab_parallel on 8 virtual CPU devices.

Values and gradients must equal the single-device losses of distill_jax.losses;
the compiled program must never hold the full catalogue axis on one device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distill_jax import losses
from distill_jax.losses import vocab_parallel as vp

N = 16  # positions: divisible by both mesh axes below
V_COLS = 40  # logits columns: divisible by 2, 4 and 8
MESH_SHAPES = [(2, 4), (4, 2)]
TOL = dict(rtol=1e-5, atol=1e-5)


def make_mesh(shape):
    # jax.make_mesh's default axis type (Explicit), as in the brief; the
    # trainer's Auto mesh is exercised by the HLO test below.
    return jax.make_mesh(shape, ("data", "model"))


def make_logit_inputs(seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(N, V_COLS)).astype(np.float32)
    t = rng.normal(size=(N, V_COLS)).astype(np.float32)
    # Column 0 is padding; column 27 stands for an item masked out of the catalogue
    # and lies on another 'model' shard than column 0 for both meshes.
    s[:, [0, 27]] = t[:, [0, 27]] = -np.inf
    labels = rng.choice([c for c in range(1, V_COLS) if c != 27], size=N).astype(np.int32)
    where = rng.random(N) < 0.7
    where[0], where[-1] = True, False
    # Garbage at masked positions must not change values or gradients.
    s[~where], t[~where], labels[~where] = np.nan, -np.inf, -1
    return s, t, labels, where


def assert_trees_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **TOL)


def all_three(ce_sum, kl_sum, distill_sum, s, t, labels, where, alpha):
    """Values and gradients of CE, KL (T=2) and distill (T=2.5) for one backend."""

    def loss(s, alpha):
        ce = ce_sum(s, labels, where=where)[0]
        kl = kl_sum(s, t, temperature=2.0, where=where)[0]
        distill = distill_sum(s, t, labels, temperature=2.5, alpha=alpha, where=where)[0]
        return ce, kl, distill

    values = loss(s, alpha)
    grads = [jax.grad(lambda s, a, i=i: loss(s, a)[i], argnums=(0, 1))(s, alpha) for i in range(3)]
    return values, grads


def _vp_kl_sum(s, t, *, temperature, where):
    # Pure KD: the distillation loss at alpha=0 (its label term is dropped).
    labels = jnp.ones(s.shape[:1], jnp.int32)
    return vp.vocab_parallel_distill_loss_sum(
        s, t, labels, temperature=temperature, alpha=0.0, where=where
    )


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_logit_losses_match_single_device(mesh_shape):
    s, t, labels, where = make_logit_inputs()
    alpha = np.float32(0.3)
    want = all_three(
        losses.cross_entropy_sum,
        losses.kl_distill_sum,
        losses.distill_loss_sum,
        s,
        t,
        labels,
        where,
        alpha,
    )
    mesh = make_mesh(mesh_shape)
    blocks, rows = NamedSharding(mesh, P("data", "model")), NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
        placed = (
            jax.device_put(s, blocks),
            jax.device_put(t, blocks),
            jax.device_put(labels, rows),
            jax.device_put(where, rows),
        )
        got = jax.jit(
            lambda *a: all_three(
                vp.vocab_parallel_cross_entropy_sum,
                _vp_kl_sum,
                vp.vocab_parallel_distill_loss_sum,
                *a,
            )
        )(*placed, alpha)
    assert_trees_close(got, want)
    # The gradient stays vocab-sharded: no device holds a full row.
    assert got[1][0][0].sharding.spec == P("data", "model")


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_hidden_and_table_match_single_device(mesh_shape):
    rng = np.random.default_rng(1)
    num_rows, d_s, d_t = 38, 6, 10  # 38 = V + 1 rows: padded to 40 on a 4-way 'model' axis
    hs = rng.normal(size=(N, d_s)).astype(np.float32)
    es, bs = rng.normal(size=(num_rows, d_s)).astype(np.float32), rng.normal(size=num_rows)
    ht, et = rng.normal(size=(N, d_t)).astype(np.float32), rng.normal(size=(num_rows, d_t))
    bt = rng.normal(size=num_rows).astype(np.float32)
    bs, et = bs.astype(np.float32), et.astype(np.float32)
    labels = rng.integers(1, num_rows, size=N).astype(np.int32)
    where = rng.random(N) < 0.7
    where[-1] = False

    def plain(h, e, b):
        def logits(h, e, b):
            return jnp.where(jnp.arange(num_rows) == 0, -jnp.inf, h @ e.T + b)

        s, t = logits(h, e, b), logits(ht, et, bt)
        return losses.distill_loss(s, t, labels, temperature=1.5, alpha=0.4, where=where)

    def parallel(h, e, b):
        s, t = vp.vocab_parallel_logits(h, e, b), vp.vocab_parallel_logits(ht, et, bt)
        return vp.vocab_parallel_distill_loss(s, t, labels, temperature=1.5, alpha=0.4, where=where)

    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(hs, es, bs)
    with jax.set_mesh(make_mesh(mesh_shape)):
        got = jax.jit(jax.value_and_grad(parallel, argnums=(0, 1, 2)))(hs, es, bs)
    assert_trees_close(got, want)


# --------------------------------------------------------------------------
# The compiled program never gathers the catalogue.
# --------------------------------------------------------------------------

# One collective instruction of the compiled (per-device, SPMD-partitioned) HLO:
#   %name = f32[8,250]{1,0} all-gather(f32[8,125]{1,0} %x), ..., dimensions={1}, ...
# or with a tuple result "(f32[..], f32[..])" when XLA combines collectives.
_COLLECTIVE = re.compile(
    r"=\s*(?P<result>\([^=]*?\)|\w+\[[\d,]*\]\S*)\s+"
    r"(?P<op>all-gather|all-gather-start|all-reduce|all-reduce-start|reduce-scatter|"
    r"all-to-all|collective-permute|collective-permute-start)\((?P<rest>.*)$"
)
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _dims(text):
    return [tuple(int(d) for d in m.group(1).split(",") if d) for m in _SHAPE.finditer(text)]


def collectives(hlo_text):
    """``(op, result_shapes, gathered_dimension or None)`` for each collective."""
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        dimension = re.search(r"dimensions=\{(\d+)\}", match["rest"])
        found.append(
            (match["op"], _dims(match["result"]), int(dimension[1]) if dimension else None)
        )
    return found


def full_vocab_gathers(hlo_text, num_cols):
    """All-gathers whose gathered dimension reaches the full catalogue width.

    Small all-gathers (e.g. of [n] row statistics) would be legitimate, so a
    bare grep for "all-gather" is not the test: an all-gather is a problem only
    if its result holds all ``num_cols`` columns along the gathered axis.
    """
    return [
        (op, shapes, dim)
        for op, shapes, dim in collectives(hlo_text)
        if op.startswith("all-gather") and any(s[dim] >= num_cols for s in shapes if dim < len(s))
    ]


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_compiled_loss_and_grad_never_gather_the_catalogue(axis_type):
    # V' = 1000 is larger than every other dimension (and product of two) in
    # this program, so any array with a dimension >= 1000 must hold the full
    # vocab axis.
    n, num_cols, d_s, d_t = 16, 1000, 6, 10
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)

    def spec(shape, dtype, *axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))

    args = (
        spec((n, d_s), jnp.float32, "data"),
        spec((num_cols, d_s), jnp.float32, "model"),
        spec((num_cols,), jnp.float32, "model"),
        spec((n, d_t), jnp.float32, "data"),
        spec((num_cols, d_t), jnp.float32, "model"),
        spec((num_cols,), jnp.float32, "model"),
        spec((n,), jnp.int32, "data"),
        spec((n,), jnp.bool_, "data"),
    )

    def loss(hs, es, bs, ht, et, bt, labels, where):
        s, t = vp.vocab_parallel_logits(hs, es, bs), vp.vocab_parallel_logits(ht, et, bt)
        return vp.vocab_parallel_distill_loss(s, t, labels, temperature=2.0, alpha=0.3, where=where)

    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        hlo = step.lower(*args).compile().as_text()
        # Positive control: replicating the logits must be caught by the parser.
        replicate = jax.jit(lambda x: 2 * x, out_shardings=NamedSharding(mesh, P()))
        control = replicate.lower(spec((n, num_cols), jnp.float32, "data", "model"))
        control_hlo = control.compile().as_text()
    assert full_vocab_gathers(control_hlo, num_cols), "the HLO parser missed a known gather"

    ops = collectives(hlo)
    assert ops, "expected the pmax/psum collectives of the vocab-parallel loss"
    assert full_vocab_gathers(hlo, num_cols) == []
    # Stronger: no collective of any kind moves a full-vocab array, and no array
    # anywhere in the per-device program has the full vocab axis.
    assert all(max(s, default=0) < num_cols for _, shapes, _ in ops for s in shapes)
    assert all(max(s, default=0) < num_cols for s in _dims(hlo))


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def test_bad_layouts_name_what_was_expected():
    s, _, labels, _ = make_logit_inputs()
    mesh = make_mesh((2, 4))
    with pytest.raises(ValueError, match="no mesh is set"):
        vp.vocab_parallel_cross_entropy_sum(s, labels)
    with pytest.raises(ValueError, match="39 vocab columns.*'model' axis size 4"):
        vp.vocab_parallel_cross_entropy_sum(s[:, :39], labels, mesh=mesh)
    with pytest.raises(ValueError, match="'data' axis size 2"):
        vp.vocab_parallel_cross_entropy_sum(s[:15], labels[:15], mesh=mesh)
    with pytest.raises(ValueError, match="axes 'data' and 'model'"):
        vp.vocab_parallel_cross_entropy_sum(s, labels, mesh=jax.make_mesh((8,), ("batch",)))


def test_a_label_outside_the_catalogue_is_nan_not_a_logit_of_0():
    mesh = make_mesh((2, 4))
    logits = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    where = np.array([True, True, True, False])
    for bad in (-1, 16, 99):
        labels = np.array([3, bad, 5, -7], np.int32)  # the masked row's label does not matter
        total, _ = vp.vocab_parallel_cross_entropy_sum(logits, labels, where=where, mesh=mesh)
        assert np.isnan(float(total)), bad
    labels = np.array([3, 4, 5, -7], np.int32)
    total, _ = vp.vocab_parallel_cross_entropy_sum(logits, labels, where=where, mesh=mesh)
    want, _ = losses.cross_entropy_sum(logits, labels, where=where)
    np.testing.assert_allclose(float(total), float(want), rtol=1e-5)
