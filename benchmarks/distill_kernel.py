"""The catalogue part of a distill step, in variants timed side by side.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
      python -m benchmarks.distill_kernel --rows 1600 --items 12102 --rounds 8

  # On a GPU or TPU: the dense form against the Pallas kernels.
  python -m benchmarks.distill_kernel --variants dense,pallas

Times value-and-gradient of `T²·KL(teacher ‖ student)` (T=1, alpha=0, the
Beauty settings) computed from hidden states: the teacher's `[N, D_t] x
[D_t, V]` product, the student's `[N, D_s] x [D_s, V]` product, the fused loss
and the student's two backward products. Defaults are the Beauty shapes
(~1,600 valid target slots per batch of 256, V = 12,101 items + padding,
D_t = 128, D_s = 16). Column 0 is the padding item and must not count:

* `plain` (or `dense`, the same): what the trainer does with
  `loss.form='dense'`: each product's column 0 set to -inf by a `jnp.where`
  (as `Model.logits` does), then `losses.distill_loss` (fused closed-form
  backward) under autodiff;
* `cpu_kernel`: what the trainer does with `loss.form='cpu_kernel'`:
  `losses.cpu_kernel.kernel_distill_loss` from the hidden states (XLA's
  teacher product, then the fused C++ kernel of `distill_jax/losses/distill_rows.cc`: the
  student's logits, the loss, the logits' gradient and its two products,
  four rows at a time in cache, the padding column masked inside);
* `pallas`: what the trainer does with `loss.form='pallas'`:
  `losses.pallas_kernel.pallas_distill_loss` (the Pallas kernels: both
  products tile by tile over the items, online logsumexp, backward kernels
  recomputing the tiles; `--pallas_block_rows`/`--pallas_block_items`, 0 for
  the platform's `TILES`). Meant for a GPU or TPU; on the CPU it runs in
  Pallas interpret mode, far slower than anything else here (tiny shapes
  only there);
* `row_blocks`: a `lax.scan` over blocks of `--row_block` rows, each block's
  logits, loss and gradients computed together so they could stay in cache
  (a hand-fused alternative; not used by the trainer).

Variants are compiled once, then run in interleaved rounds (`--rounds` x
`--calls` calls each) in one process, so a slow spell of the machine hits
them alike; the table gives each variant's median ms per call and its ratio
to `plain`, and the rate of its counted product FLOPs
(2·N·V·(D_t + 3·D_s)) against a float32 matmul measured in the same run.
"""

import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import common, machine
from distill_jax import losses
from distill_jax.losses import cpu_kernel, pallas_kernel

VARIANTS = ("plain", "dense", "cpu_kernel", "pallas", "row_blocks")


def make_inputs(rows: int, items: int, d_teacher: int, d_student: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    return dict(
        hs=jax.random.normal(keys[0], (rows, d_student)),
        ws=0.1 * jax.random.normal(keys[1], (items, d_student)),
        ht=jax.random.normal(keys[2], (rows, d_teacher)),
        wt=0.1 * jax.random.normal(keys[3], (items, d_teacher)),
        labels=jax.random.randint(keys[4], (rows,), 1, items),
    )


def make_variant(name: str, labels: jax.Array, row_block: int, tiles: tuple[int, int] = (0, 0)):
    """jit(value_and_grad) of the mean KL w.r.t. the student's (hidden, table).

    `tiles`: the pallas variant's (block_rows, block_items); 0: the platform's.
    """
    rows = labels.shape[0]
    where = jnp.ones((rows,), bool)

    def loss(hs, ws, ht, wt):
        s, t = hs @ ws.T, jax.lax.stop_gradient(ht @ wt.T)
        padding = jnp.arange(s.shape[-1]) == 0
        s, t = jnp.where(padding, -jnp.inf, s), jnp.where(padding, -jnp.inf, t)
        return losses.distill_loss(s, t, labels, temperature=1.0, alpha=0.0, where=where)

    def kernel_loss(hs, ws, ht, wt):
        return cpu_kernel.kernel_distill_loss(
            hs, ws, None, ht, wt, None, labels, where, temperature=1.0, alpha=0.0
        )

    block_rows, block_items = (t or None for t in tiles)

    def pallas_loss(hs, ws, ht, wt):
        return pallas_kernel.pallas_distill_loss(
            hs,
            ws,
            None,
            ht,
            wt,
            None,
            labels,
            where,
            temperature=1.0,
            alpha=0.0,
            block_rows=block_rows,
            block_items=block_items,
        )

    if name in ("plain", "dense"):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    if name == "cpu_kernel":
        return jax.jit(jax.value_and_grad(kernel_loss, argnums=(0, 1)))
    if name == "pallas":
        return jax.jit(jax.value_and_grad(pallas_loss, argnums=(0, 1)))
    if name != "row_blocks":
        raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    if rows % row_block:
        raise ValueError(f"--row_block={row_block} must divide --rows={rows}")

    @jax.jit
    def blocked(hs, ws, ht, wt):
        items = ws.shape[0]
        col = jax.lax.broadcasted_iota(jnp.int32, (row_block, items), 1)

        def body(d_ws, block):
            h, h_t = block
            s = jnp.where(col == 0, -jnp.inf, h @ ws.T)
            t = jnp.where(col == 0, -jnp.inf, h_t @ wt.T)
            a, b = t - t.max(-1, keepdims=True), s - s.max(-1, keepdims=True)
            e_a, e_b = jnp.exp(a), jnp.exp(b)
            sum_a, sum_b = e_a.sum(-1, keepdims=True), e_b.sum(-1, keepdims=True)
            cross = jnp.sum(jnp.where(e_a > 0, e_a * (a - b), 0), -1, keepdims=True)
            kl = cross / sum_a - jnp.log(sum_a) + jnp.log(sum_b)
            g = e_b / sum_b - e_a / sum_a  # d KL / d s, per row
            return d_ws + g.T @ h, (kl.sum(), g @ ws)

        blocks = (hs.reshape(-1, row_block, hs.shape[1]), ht.reshape(-1, row_block, ht.shape[1]))
        d_ws, (kl, d_hs) = jax.lax.scan(body, jnp.zeros_like(ws), blocks)
        return kl.sum() / rows, (d_hs.reshape(hs.shape) / rows, d_ws / rows)

    return blocked


def run(args) -> list[dict]:
    x = make_inputs(args.rows, args.items, args.d_teacher, args.d_student)
    operands = (x["hs"], x["ws"], x["ht"], x["wt"])
    # The pallas variant's tile flags (read only when it runs).
    tiles = (
        (args.pallas_block_rows, args.pallas_block_items) if "pallas" in args.variants else (0, 0)
    )
    fns = {v: make_variant(v, x["labels"], args.row_block, tiles) for v in args.variants}
    reference = None
    for name, fn in fns.items():  # Compile, and check every variant agrees.
        value, grads = jax.block_until_ready(fn(*operands))
        if reference is None:
            reference = (value, grads)
        else:
            np.testing.assert_allclose(value, reference[0], rtol=1e-4, err_msg=name)
            for g, r in zip(grads, reference[1], strict=True):
                np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-9, err_msg=name)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = fn(*operands)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
    rate = machine.matmul_rate(2048)
    flops = 2 * args.rows * args.items * (args.d_teacher + 3 * args.d_student)
    base = float(np.median(times[args.variants[0]]))
    rows = []
    for name, ms in times.items():
        median = float(np.median(ms))
        rows.append(
            dict(
                variant=name,
                median_ms=median,
                min_ms=float(np.min(ms)),
                max_ms=float(np.max(ms)),
                ratio=median / base,
                product_gflops=flops / median / 1e6,
                share_of_matmul=flops / median / 1e6 / rate,
                matmul_gflops=rate,
            )
        )
    return rows


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """distill_kernel.py's flags: the shapes, the variants and the rounds."""
    del argv  # No config: the shapes are flags.
    fv = flag_values
    flags.DEFINE_integer("rows", 1600, "Valid target slots N.", flag_values=fv)
    flags.DEFINE_integer("items", 12102, "Catalogue columns V (with padding).", flag_values=fv)
    flags.DEFINE_integer("d_teacher", 128, "Teacher width.", flag_values=fv)
    flags.DEFINE_integer("d_student", 16, "Student width.", flag_values=fv)
    flags.DEFINE_integer("row_block", 64, "Rows per block of row_blocks.", flag_values=fv)
    flags.DEFINE_integer(
        "pallas_block_rows", 0, "Slots per block of pallas; 0: the platform's.", flag_values=fv
    )
    flags.DEFINE_integer(
        "pallas_block_items", 0, "Items per tile of pallas; 0: the platform's.", flag_values=fv
    )
    flags.DEFINE_list(
        "variants",
        ["plain", "row_blocks"],
        f"Comma-separated, of {VARIANTS}; the first is the baseline of the ratios.",
        flag_values=fv,
    )
    flags.DEFINE_integer("rounds", 8, "Interleaved rounds.", flag_values=fv)
    flags.DEFINE_integer("calls", 5, "Calls per variant per round.", flag_values=fv)


def main(argv: Sequence[str]) -> None:
    """Times the variants side by side and prints the table."""
    args = common.parse_flags(argv, define_flags, __doc__)
    rows = run(args)
    print(
        f"N={args.rows} V={args.items} D_t={args.d_teacher} D_s={args.d_student}, "
        f"{args.rounds} rounds x {args.calls} calls, backend {jax.default_backend()}; "
        f"float32 matmul 2048^3: {rows[0]['matmul_gflops']:.1f} GFLOP/s\n"
    )
    print(
        f"| variant | median ms | min–max ms | / {args.variants[0]} | GFLOP/s | share of matmul |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.0f}–{r['max_ms']:.0f} "
            f"| {r['ratio']:.3f} | {r['product_gflops']:.1f} | {r['share_of_matmul']:.0%} |"
        )


if __name__ == "__main__":
    main(sys.argv)
