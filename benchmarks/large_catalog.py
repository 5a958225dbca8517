"""Plain vs chunked distillation loss on catalogues too large to materialise.

  python -m benchmarks.large_catalog

For each catalogue size V in `--sizes` (default 10^4, 10^5, 10^6) this times
one distillation loss step, the value and the gradient of
`alpha·CE + (1 − alpha)·T²·KL` with respect to the student's hidden states,
item table and output bias (the teacher under stop_gradient), computed two
ways from the same synthetic inputs:

* `plain`: full `[N, V+1]` logits `h @ table.T + bias` for student and
  teacher (column 0 at -inf, as `SequenceRecommender.logits` does), then
  `losses.distill_loss` (fused closed-form backward);
* `chunked`: `losses.chunked.chunked_distill_loss` with `--chunk_size`
  table rows per block (online logsumexp scan, re-scan backward): no more
  than an `[N, chunk_size]` block of logits exists at a time.

Inputs: N = `--positions` target positions (all valid, as the trainer packs
them), student width `--d_student`, teacher width `--d_teacher`, float32,
random labels in [1, V]; T and alpha default to `configs/base.py`'s.

Every (V, impl) runs in a fresh subprocess, so that one configuration's
memory cannot hide in another's. Each reports:

* compiled memory: `jax.jit(step).lower(...).compile().memory_analysis()`,
  temp + argument + output bytes (XLA's own plan for the program);
* peak RSS: the process's peak resident memory while running the step
  (warm-up and timed repeats) minus its resident memory just before, after
  imports, input creation and compilation. The peak is reset first (`5` into
  `/proc/self/clear_refs`, Linux), so the inputs' creation does not count.
  It covers the step's temporaries and outputs (the gradients), not its
  arguments, which were resident before;
* ms/step: the median over at least `--repeats` timed steps (and at least
  `--min_time_s` seconds) after one warm-up step.

A worker whose resident memory passes `--max_rss_gib` is killed (to spare the
machine's other jobs) and, like one that XLA or the kernel stops for lack of
memory, is reported as "out of memory". Prints JSON lines, then a markdown
table with chunked/plain ratios.
"""

import gc
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import flags

from benchmarks import common

IMPLS = ("plain", "chunked")
# The repository root: workers run as `python -m benchmarks.large_catalog` from there.
ROOT = pathlib.Path(__file__).resolve().parents[1]
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "bad_alloc", "MemoryError")


# --------------------------------------------------------------------------
# Worker: one (V, impl) configuration in this process.
# --------------------------------------------------------------------------


def _status_mib(key: str) -> float:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _make_inputs(args, num_items: int):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(args.seed)
    n, rows = args.positions, num_items + 1

    def normal(shape, scale):
        # float32 straight from the generator: no float64 copy of a 10^6-row table.
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    # Unit-variance hidden states, tables scaled by 1/sqrt(D): logits of order 1.
    inputs = {
        "h_s": normal((n, args.d_student), 1.0),
        "table_s": normal((rows, args.d_student), args.d_student**-0.5),
        "bias_s": normal((rows,), 0.1),
        "h_t": normal((n, args.d_teacher), 1.0),
        "table_t": normal((rows, args.d_teacher), args.d_teacher**-0.5),
        "bias_t": normal((rows,), 0.1),
        "labels": jnp.asarray(rng.integers(1, rows, size=n, dtype=np.int32)),
    }
    return inputs


def _logits(h, table, bias):
    """`h @ table.T + bias` with column 0 (padding) at -inf, as models/base.py."""
    import jax.numpy as jnp

    scores = jnp.einsum("nd,vd->nv", h, table, preferred_element_type=jnp.float32) + bias
    return jnp.where(jnp.arange(table.shape[0]) == 0, -jnp.inf, scores)


def _loss_fn(args, impl: str):
    import jax

    from distill_jax import losses
    from distill_jax.losses import chunked as catalogue_losses

    def plain(h_s, table_s, bias_s, h_t, table_t, bias_t, labels):
        t_logits = jax.lax.stop_gradient(_logits(h_t, table_t, bias_t))
        return losses.distill_loss(
            _logits(h_s, table_s, bias_s),
            t_logits,
            labels,
            temperature=args.temperature,
            alpha=args.alpha,
        )

    def chunked(h_s, table_s, bias_s, h_t, table_t, bias_t, labels):
        h_t, table_t, bias_t = jax.lax.stop_gradient((h_t, table_t, bias_t))
        return catalogue_losses.chunked_distill_loss(
            h_s,
            table_s,
            bias_s,
            h_t,
            table_t,
            bias_t,
            labels,
            temperature=args.temperature,
            alpha=args.alpha,
            chunk_size=args.chunk_size,
        )

    return {"plain": plain, "chunked": chunked}[impl]


def run_worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    inputs = _make_inputs(args, args.num_items)
    names = ("h_s", "table_s", "bias_s", "h_t", "table_t", "bias_t", "labels")
    operands = [inputs[k] for k in names]
    del inputs
    step = jax.jit(jax.value_and_grad(_loss_fn(args, args.impl), argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    compiled = step.lower(*operands).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
    rss_before = _status_mib("VmRSS")

    out = compiled(*operands)  # warm-up
    jax.block_until_ready(out)
    times = []
    start = time.perf_counter()
    while len(times) < args.repeats or (
        time.perf_counter() - start < args.min_time_s and len(times) < 50
    ):
        out = None  # free the previous gradients before the next step allocates its own
        t0 = time.perf_counter()
        out = compiled(*operands)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    loss, (d_h, d_table, d_bias) = out
    grad_sq = sum(float(jnp.sum(jnp.square(g))) for g in (d_h, d_table, d_bias))
    mib = 2.0**20
    return {
        "num_items": args.num_items,
        "impl": args.impl,
        # Catalogue rows scored per pass: chunked pads V+1 up to a multiple of the chunk.
        "rows_scored": (
            -(-(args.num_items + 1) // args.chunk_size) * args.chunk_size
            if args.impl == "chunked"
            else args.num_items + 1
        ),
        "compiled_mib": (
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        )
        / mib,
        "temp_mib": mem.temp_size_in_bytes / mib,
        "argument_mib": mem.argument_size_in_bytes / mib,
        "output_mib": mem.output_size_in_bytes / mib,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak - rss_before,
        "ms_per_step": statistics.median(times) * 1e3,
        "timed_steps": len(times),
        "compile_s": compile_s,
        "loss": float(loss),
        "grad_norm": grad_sq**0.5,
    }


# --------------------------------------------------------------------------
# Driver: one subprocess per configuration, a memory watchdog, the table.
# --------------------------------------------------------------------------


def _watch(proc: subprocess.Popen, limit_mib: float, flag: dict) -> None:
    """Kills `proc` if its resident memory passes `limit_mib` (polled every 20 ms)."""
    path = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(path) as f:
                rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            rss = 0.0
        if rss > limit_mib:
            flag["over"] = rss
            proc.kill()
            return
        time.sleep(0.02)


def run_config(args, num_items: int, impl: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.large_catalog", "--worker"]
    cmd += [f"--num_items={num_items}"]
    cmd += [f"--impl={impl}"] + [
        f"--{k}={getattr(args, k)}"
        for k in (
            "positions",
            "d_student",
            "d_teacher",
            "chunk_size",
            "repeats",
            "min_time_s",
            "temperature",
            "alpha",
            "seed",
        )
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    flag = {}
    watchdog = threading.Thread(target=_watch, args=(proc, args.max_rss_gib * 1024, flag))
    watchdog.start()
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return {"num_items": num_items, "impl": impl, "error": f"timed out ({args.timeout_s} s)"}
    finally:
        watchdog.join()
    result = {"num_items": num_items, "impl": impl}
    if proc.returncode == 0:
        return json.loads(stdout.strip().splitlines()[-1])
    if "over" in flag:
        result["error"] = (
            f"out of memory (RSS {flag['over'] / 1024:.1f} GiB > --max_rss_gib="
            f"{args.max_rss_gib}, killed)"
        )
    elif proc.returncode == -9 or any(m in stderr for m in OOM_MARKERS):
        result["error"] = f"out of memory (exit {proc.returncode})"
    else:
        tail = stderr.strip().splitlines()[-1:] or [""]
        result["error"] = f"failed (exit {proc.returncode}): {tail[0][:200]}"
    return result


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nN={args.positions} positions, student D={args.d_student}, teacher "
        f"D={args.d_teacher}, float32, T={args.temperature}, alpha={args.alpha}, "
        f"chunk_size={args.chunk_size}; value and gradient w.r.t. student h, table, bias\n"
    )
    print(
        "| V | impl | compiled memory MiB | peak RSS MiB | ms/step | "
        "chunked/plain compiled | chunked/plain RSS | chunked/plain time |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    by_key = {(r["num_items"], r["impl"]): r for r in rows}
    for r in rows:
        if "error" in r:
            print(f"| {r['num_items']:,} | {r['impl']} | {r['error']} | | | | | |")
            continue
        ratios = [None, None, None]
        base = by_key.get((r["num_items"], "plain"))
        if r["impl"] == "chunked" and base is not None and "error" not in base:
            ratios = [
                r[k] / base[k] if base[k] > 0 else None
                for k in ("compiled_mib", "peak_rss_mib", "ms_per_step")
            ]
        print(
            f"| {r['num_items']:,} | {r['impl']} | {r['compiled_mib']:,.0f} | "
            f"{r['peak_rss_mib']:,.0f} | {r['ms_per_step']:,.1f} | "
            + " | ".join(_fmt(x, ".3f") for x in ratios)
            + " |"
        )


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """large_catalog.py's flags: the sizes and shapes, the limits, and the worker's own."""
    del argv  # No config: the shapes are flags.
    fv = flag_values
    flags.DEFINE_string("sizes", "10000,100000,1000000", "Catalogue sizes V.", flag_values=fv)
    flags.DEFINE_string(
        "impls", ",".join(IMPLS), "Comma-separated subset of IMPLS.", flag_values=fv
    )
    flags.DEFINE_integer("positions", 512, "Target positions N.", flag_values=fv)
    flags.DEFINE_integer("d_student", 64, "Student width.", flag_values=fv)
    flags.DEFINE_integer("d_teacher", 128, "Teacher width.", flag_values=fv)
    flags.DEFINE_integer("chunk_size", 8192, "Table rows per chunk.", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "Least timed steps.", flag_values=fv)
    flags.DEFINE_float("min_time_s", 2.0, "Least timed seconds.", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "Distillation temperature T.", flag_values=fv)
    flags.DEFINE_float("alpha", 0.0, "Weight of the label's CE.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic inputs.", flag_values=fv)
    flags.DEFINE_float("max_rss_gib", 16.0, "Kill a worker above this.", flag_values=fv)
    flags.DEFINE_float("timeout_s", 900.0, "Per configuration.", flag_values=fv)
    # Set by the driver for the subprocess that measures one configuration.
    flags.DEFINE_bool("worker", False, "Internal: measure one (V, impl) here.", flag_values=fv)
    flags.DEFINE_integer("num_items", None, "Internal: the worker's V.", flag_values=fv)
    flags.DEFINE_enum("impl", None, list(IMPLS), "Internal: the worker's impl.", flag_values=fv)


def main(argv: Sequence[str]) -> None:
    """Runs every (V, impl) in its own worker and prints the rows and the table."""
    args = common.parse_flags(argv, define_flags, __doc__)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    impls = args.impls.split(",")
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise SystemExit(f"--impls: unknown {bad}; expected a subset of {IMPLS}.")
    rows = []
    for num_items in (int(v) for v in args.sizes.split(",")):
        for impl in impls:
            row = run_config(args, num_items, impl)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for num_items in sorted({r["num_items"] for r in rows}):
        pair = [r for r in rows if r["num_items"] == num_items and "loss" in r]
        if len(pair) == 2:
            diff = abs(pair[0]["loss"] - pair[1]["loss"]) / max(abs(pair[0]["loss"]), 1e-30)
            print(json.dumps({"num_items": num_items, "loss_rel_diff_plain_vs_chunked": diff}))
    print_table(rows, args)


if __name__ == "__main__":
    main(sys.argv)
