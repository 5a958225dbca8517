"""Step throughput against the machine's own matmul rate, measured in one run.

  python -m benchmarks.throughput --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt

Times, after a warm-up pass that compiles every batch shape, over the same
`--batches` training batches repeated `--repeats` times:

* `teacher_train`: the teacher's train step (forward, backward, AdamW);
* `teacher_forward`: the teacher's forward pass to catalogue logits at the
  target slots (what distillation adds per step);
* `student_train`: the student's plain train step;
* `distill`: the distillation step (teacher forward + student step + KL);
* `evaluate`: full-ranking evaluation of the teacher on the test split.

Each line gives ms per step (of the fastest of the `--repeats` passes over the
batches; the mean over all passes is printed beside it), valid target
positions per second, achieved GFLOP/s and its share of the matmul rate of a `--matmul_size`^3
product timed in the same run (three times: before, between and after the
steps; the best of the three is the reference). FLOPs are counted from the shapes (matmuls
only; LayerNorm, softmax and the optimiser are not counted). For a model of
width D, MLP width M, `nb` blocks, and a batch of B rows of S inputs with N
target slots (filler slots included, they are computed):

    encoder forward  = nb * (B*S*(8*D^2 + 4*D*M) + 4*B*S^2*D)
    logits forward   = 2 * N * D * (V + 1)
    train step       = 3 * (encoder forward + logits forward)
    teacher forward  = encoder forward + logits forward        (teacher shapes)
    distill step     = teacher forward + student train step
    evaluate         = sum over eval batches [B, S] of
                       encoder forward + 2 * B * D * (V + 1)   (one scored position per row)

(backward = 2 x forward: one product for the input gradient, one for the
weight gradient.) Prints JSON lines, then a markdown table.

`--profile=STEP` (student_train, distill or teacher_train) then runs that step
once more over the same batches under `jax.profiler.trace` (trace files in
`--profile_dir`) and prints where its time goes: the compiled programs' ops
(XLA fusions, matmuls), summed by the jax operation each came from (the HLO
`op_name`), in milliseconds per step. The runtime may run independent
ops at the same time, so the column can add up to more than the step's wall
time. CPU backend only: the steps are found by the XLA CPU runtime's trace
events; elsewhere the script stops with an error naming the trace file.
"""

import collections
import glob
import gzip
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import common, machine
from distill_jax import pipeline, sharding
from distill_jax.evaluation import evaluator as evaluator_lib
from distill_jax.train import loop, state, steps


def encoder_flops(model, rows: int, width: int) -> float:
    D, M, nb = model.embed_dim, model.mlp_dim, model.num_blocks
    return float(nb * (rows * width * (8 * D * D + 4 * D * M) + 4 * rows * width * width * D))


def logits_flops(model, slots: int) -> float:
    return float(2 * slots * model.embed_dim * (model.num_items + 1))


def _time_steps(fn, carry, batches, repeats):
    """Runs fn over every batch once (warm-up), then `repeats` timed passes.

    Returns the seconds per step of the fastest pass and of all passes
    together, and the carry. The fastest pass is the figure used: like the
    matmul reference (best of three), it is what the step ran at in this
    machine's quietest spell of the run, where the mean mixes in the slow
    spells of a shared VM (BENCHMARKS.md).
    """
    for b in batches:
        carry = fn(carry, b)
    jax.block_until_ready(carry)
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            carry = fn(carry, b)
        jax.block_until_ready(carry)
        passes.append((time.perf_counter() - t0) / len(batches))
    return min(passes), sum(passes) / len(passes), carry


_HLO_OP = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def profile_step(step, args, carry, batches, mesh, profile_dir: str, top: int = 20) -> list[dict]:
    """Traces one pass of `step(carry, batch)` over `batches`; its top ops per step.

    `step` is a train step from `steps.make_train_step` (its `jitted` attribute
    gives the compiled programs, whose op names the trace uses) and `args(carry,
    batch)` the arguments of that program. Each batch shape has its own
    program with its own op names, so the trace's ops are read step by step
    (inside that step's execution window) against that step's program, and
    summed by the jax operation they came from.
    """

    def shape_key(b):
        return tuple(x.shape for x in jax.tree.leaves(b))

    names = {}
    for b in batches:
        key = shape_key(b)
        if key in names:
            continue
        with jax.set_mesh(mesh):
            text = step.jitted.lower(*args(carry, b)).compile().as_text()
        names[key] = dict(m.groups() for m in map(_HLO_OP.match, text.splitlines()) if m)
    for b in batches:  # Warm-up, outside the trace.
        carry = step(*args(carry, b))[0]
    jax.block_until_ready(carry)
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for b in batches:
            carry = step(*args(carry, b))[0]
        jax.block_until_ready(carry)
        wall = (time.perf_counter() - t0) / len(batches)
    files = glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"--profile: no perfetto_trace.json.gz under {profile_dir}")
    trace_file = max(files, key=os.path.getmtime)
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    events = [e for e in events if e.get("ph") == "X"]
    # One "wait for completion" window per step, in dispatch order.
    windows = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0))
        for e in events
        if e["name"] == "ThunkExecutor::Execute (wait for completion)"
    )
    if len(windows) != len(batches):
        raise RuntimeError(
            f"--profile: found {len(windows)} step executions in {trace_file}, "
            f"expected {len(batches)} (one per batch); --profile reads the XLA CPU "
            f"runtime's events, so it needs the CPU backend (got {jax.default_backend()})"
        )
    total = collections.Counter()
    calls = collections.Counter()
    for e in events:
        for i, (lo, hi) in enumerate(windows):
            if lo <= e["ts"] <= hi:
                source = names[shape_key(batches[i])].get(e["name"])
                if source is not None:
                    total[source] += e.get("dur", 0) / 1e3
                    calls[source] += 1
                break
    executed = sum(hi - lo for lo, hi in windows) / 1e3 / len(batches)
    rows = [{"step_wall_ms": wall * 1e3, "step_executing_ms": executed, "trace": trace_file}]
    for source, ms in total.most_common(top):
        rows.append(
            {
                "from": source,
                "ms_per_step": ms / len(batches),
                "share_of_wall": ms / len(batches) / (wall * 1e3),
                "calls_per_step": calls[source] / len(batches),
            }
        )
    return rows


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """throughput.py's flags: `--config` (and overrides), then what is timed and how."""
    common.define_config(flag_values, argv)
    fv = flag_values
    flags.DEFINE_integer("batches", 24, "Distinct training batches timed.", flag_values=fv)
    flags.DEFINE_integer("repeats", 2, "Timed passes over the batches.", flag_values=fv)
    flags.DEFINE_integer("matmul_size", 4096, "n of the n^3 reference matmul.", flag_values=fv)
    flags.DEFINE_enum(
        "matmul_dtype",
        "float32",
        ["float32", "bfloat16"],
        "dtype of the reference matmul: bfloat16 for a bf16-compute run on GPU/TPU.",
        flag_values=fv,
    )
    flags.DEFINE_bool("skip_eval", False, "Do not time the evaluation.", flag_values=fv)
    flags.DEFINE_enum(
        "profile",
        None,
        ["student_train", "distill", "teacher_train"],
        "Trace this step once more and print its top ops.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "profile_dir",
        "/tmp/throughput_profile",
        "Where --profile writes the trace.",
        flag_values=fv,
    )


def main(argv: Sequence[str]) -> None:
    """Times every step against the matmul reference and prints the table."""
    args = common.parse_flags(argv, define_flags, __doc__)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    cfg = args.config
    data, mesh, rules = common.data_and_mesh(cfg)
    split = data.split
    teacher = pipeline.build(cfg, "teacher", split.num_items)
    student = pipeline.build(cfg, "student", split.num_items)
    t_state, t_shard = state.create_state(teacher, cfg.teacher, mesh, rules, jax.random.key(0))
    s_state, s_shard = state.create_state(student, cfg.student, mesh, rules, jax.random.key(1))
    # A second student state for the distill step (train steps donate their state).
    s_state2, s_shard2 = state.create_state(student, cfg.student, mesh, rules, jax.random.key(1))
    m = cfg.student
    # The student stages' batches (the distill step's teacher-only slots aside).
    tb = loop.train_batches(student, m, cfg, split, mesh)
    host = [tb.batch(i) for i in range(min(args.batches, tb.steps_per_epoch))]
    batches = [sharding.put_batch(b, mesh) for b in host]
    valid = sum(int(b["where"].sum()) for b in host) / len(host)
    shapes = [(b["inputs"].shape[0], b["inputs"].shape[1], b["targets"].shape[0]) for b in host]

    def per_step(fn):
        return sum(fn(*s) for s in shapes) / len(shapes)

    def train_flops(model):
        return per_step(lambda B, S, N: 3 * (encoder_flops(model, B, S) + logits_flops(model, N)))

    t_fwd_flops = per_step(lambda B, S, N: encoder_flops(teacher, B, S) + logits_flops(teacher, N))
    rng = jax.random.key(0)
    # config.loss (form, chunk_size) goes to every step, as in training.
    shards = sharding.vocab_shards(cfg, mesh)
    t_step = steps.make_train_step(
        teacher,
        task="train",
        mesh=mesh,
        state_shardings=t_shard,
        loss_cfg=cfg.loss,
        vocab_shards=shards,
    )
    s_step = steps.make_train_step(
        student,
        task="train",
        mesh=mesh,
        state_shardings=s_shard,
        loss_cfg=cfg.loss,
        vocab_shards=shards,
    )
    d_step = steps.make_train_step(
        student,
        task="distill",
        mesh=mesh,
        state_shardings=s_shard2,
        teacher=teacher,
        teacher_shardings=t_shard.params,
        distill_cfg=cfg.distill,
        loss_cfg=cfg.loss,
        vocab_shards=shards,
    )
    # config.loss.form, and the form each step runs ('auto' resolved).
    forms = {
        "config": cfg.loss.form,
        "teacher_train": t_step.loss_form,
        "student_train": s_step.loss_form,
        "distill": d_step.loss_form,
    }
    t_params = t_state.params
    fwd = jax.jit(lambda params, b: steps.logits_at_targets(teacher, params, b, train=False))

    def run_fwd(carry, b):
        with jax.set_mesh(mesh):
            return fwd(t_params, b)

    # The reference rate is timed before, between and after the steps, and
    # the best is used: this machine's speed swings between runs a minute
    # apart (BENCHMARKS.md), and the best is the limit it showed in this run.
    rates = [machine.matmul_rate(args.matmul_size, dtype=args.matmul_dtype)]
    results = {}
    # Students first: the teacher's train step donates (consumes) t_state.
    *seconds, s_state = _time_steps(
        lambda s, b: s_step(s, None, b, rng)[0], s_state, batches, args.repeats
    )
    results["student_train"] = (*seconds, train_flops(student))
    results["teacher_forward"] = (
        *_time_steps(run_fwd, None, batches, args.repeats)[:2],
        t_fwd_flops,
    )
    *seconds, s_state2 = _time_steps(
        lambda s, b: d_step(s, t_params, b, rng)[0], s_state2, batches, args.repeats
    )
    results["distill"] = (*seconds, t_fwd_flops + train_flops(student))
    rates.append(machine.matmul_rate(args.matmul_size, dtype=args.matmul_dtype))
    profiles = None
    if args.profile == "student_train":
        profiles = profile_step(
            s_step, lambda s, b: (s, None, b, rng), s_state, batches, mesh, args.profile_dir
        )
    elif args.profile == "distill":
        profiles = profile_step(
            d_step, lambda s, b: (s, t_params, b, rng), s_state2, batches, mesh, args.profile_dir
        )
    t_copy = jax.tree.map(jnp.copy, t_state)
    if args.profile == "teacher_train":
        t_copy2 = jax.tree.map(jnp.copy, t_state)
        profiles = profile_step(
            t_step, lambda s, b: (s, None, b, rng), t_copy2, batches, mesh, args.profile_dir
        )
    results["teacher_train"] = (
        *_time_steps(lambda s, b: t_step(s, None, b, rng)[0], t_copy, batches, args.repeats)[:2],
        train_flops(teacher),
    )
    rates.append(machine.matmul_rate(args.matmul_size, dtype=args.matmul_dtype))
    rate = max(rates)
    rows = []
    for name, (seconds, mean_seconds, flops) in results.items():
        rows.append(
            {
                "name": name,
                "ms_per_step": seconds * 1e3,
                "ms_per_step_mean": mean_seconds * 1e3,
                "share_of_matmul_mean": flops / mean_seconds / 1e9 / rate,
                "valid_positions_per_s": valid / seconds,
                "gflops": flops / seconds / 1e9,
                "share_of_matmul": flops / seconds / 1e9 / rate,
            }
        )
    if not args.skip_eval:
        ev = evaluator_lib.Evaluator(split, cfg, mesh)
        scorer = evaluator_lib.model_scorer(teacher, t_params, t_shard.params)
        ev.evaluate(scorer, "test")  # warm-up: compiles every history bucket
        t0 = time.perf_counter()
        ev.evaluate(scorer, "test")
        seconds = time.perf_counter() - t0
        # FLOPs of the batches evaluate() actually scores: each is trimmed to its
        # own history length (padding rows included, they are computed).
        eval_batches, users = ev.batches(scorer, "test")
        flops = 0.0
        for b in eval_batches:
            B, S = b["inputs"].shape
            flops += encoder_flops(teacher, B, S) + logits_flops(teacher, B)
        rows.append(
            {
                "name": "evaluate (teacher, test split)",
                "ms_per_step": seconds * 1e3,
                "valid_positions_per_s": users / seconds,
                "gflops": flops / seconds / 1e9,
                "share_of_matmul": flops / seconds / 1e9 / rate,
            }
        )
    ratio = results["distill"][0] / (results["teacher_forward"][0] + results["student_train"][0])
    for r in rows:
        print(json.dumps(r))
    print(
        json.dumps(
            {
                "matmul_gflops": rate,
                "matmul_gflops_each": rates,
                "matmul_dtype": args.matmul_dtype,
                "distill_over_parts": ratio,
                "allocator": machine.allocator(),
                "loss_form": forms,
            }
        )
    )
    t, s = cfg.teacher, cfg.student
    print(
        f"\n{data.info['name']}; teacher d={t.embed_dim} blocks={t.num_blocks} mlp={t.mlp_dim}, "
        f"student d={s.embed_dim} blocks={s.num_blocks} mlp={s.mlp_dim}; B={s.batch_size}, "
        f"{len(host)} batches x {args.repeats} (mean valid targets per batch {valid:.0f}); "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"allocator {machine.allocator()}; loss forms {forms}\n"
    )
    print(
        "| step | ms/step (fastest pass) | valid positions/s | GFLOP/s | share of matmul rate "
        "| ms/step (all passes) | share (all passes) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mean_ms = r.get("ms_per_step_mean")
        mean_cols = (
            f"{mean_ms:.1f} | {r['share_of_matmul_mean']:.0%}" if mean_ms is not None else "— | —"
        )
        print(
            f"| {r['name']} | {r['ms_per_step']:.1f} | {r['valid_positions_per_s']:,.0f} | "
            f"{r['gflops']:.1f} | {r['share_of_matmul']:.0%} | {mean_cols} |"
        )
    print(
        f"\n{args.matmul_dtype} matmul {args.matmul_size}^3: {rate:.1f} GFLOP/s (best of "
        f"{', '.join(f'{r:.1f}' for r in rates)}, timed before, between and after); distill step / "
        f"(teacher forward + student train step) = {ratio:.2f}"
    )
    print("(evaluate row: ms for the whole split; positions/s = users/s.)")
    if profiles:
        head, *ops = profiles
        for r in profiles:
            print(json.dumps(r))
        print(
            f"\nProfile of {args.profile}: {head['step_wall_ms']:.1f} ms per step (wall, "
            f"traced), {head['step_executing_ms']:.1f} ms executing; top jax operations "
            f"by time per step (trace: {head['trace']})\n"
        )
        print("| jax operation | ms/step | share of wall | ops run/step |")
        print("|---|---:|---:|---:|")
        for r in ops:
            print(
                f"| {r['from']} | {r['ms_per_step']:.1f} | {r['share_of_wall']:.0%} | "
                f"{r['calls_per_step']:g} |"
            )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main(sys.argv)
