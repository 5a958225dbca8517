"""Compile time of a stage's train step over every batch shape of its first epoch.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
  python -m benchmarks.compile_time --config=configs/beauty.py \\
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \\
      --model=teacher --threads=1,2

With length buckets (config.data.length_buckets, fixed_shapes off) every
batch shape is a program of its own, compiled when the first batch of that
shape arrives; on the CPU that is most of a short stage's time (BENCHMARKS.md,
"The whole Beauty job per stage"). This script collects the distinct shapes of
the model's first epoch of training batches and compiles the train step
(`jitted.lower(...).compile()`, no persistent cache) for all of them, once per
`--threads` value: with 1 one after the other, with n from n threads at once
(each value gets a freshly built step, so nothing is reused). Prints one JSON
line per value: the number of shapes, the wall seconds, the process's CPU
seconds and their ratio (how many cores the compiles kept busy).
"""

import concurrent.futures
import json
import logging
import resource
import sys
import time
from collections.abc import Sequence

import jax
from absl import flags

from benchmarks import common
from distill_jax import pipeline, sharding
from distill_jax.train import loop, state, steps


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """compile_time.py's flags: `--config` (and overrides), `--model`, `--threads`."""
    common.define_config(flag_values, argv)
    flags.DEFINE_enum(
        "model", "teacher", ["teacher", "student"], "Whose train step.", flag_values=flag_values
    )
    flags.DEFINE_list(
        "threads", ["1", "2"], "Compile threads, one measurement each.", flag_values=flag_values
    )


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: Sequence[str]) -> list[dict]:
    """Compiles the step for every shape once per --threads value; returns the JSON rows."""
    args = common.parse_flags(argv, define_flags, __doc__)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    cfg = args.config
    data, mesh, rules = common.data_and_mesh(cfg)
    split = data.split
    model = pipeline.build(cfg, args.model, split.num_items)
    mcfg = cfg[args.model]
    tb = loop.train_batches(model, mcfg, cfg, split, mesh)
    by_shape = {}
    for i in range(tb.steps_per_epoch):
        b = tb.batch(i)
        by_shape.setdefault(tuple((k, v.shape) for k, v in sorted(b.items())), b)
    batches = [sharding.put_batch(b, mesh) for b in by_shape.values()]
    rng = jax.random.key(0)
    rows = []
    for n in (int(t) for t in args.threads):
        st, shardings = state.create_state(model, mcfg, mesh, rules, jax.random.key(0))
        step = steps.make_train_step(
            model,
            task="train",
            mesh=mesh,
            state_shardings=shardings,
            loss_cfg=cfg.loss,
            vocab_shards=sharding.vocab_shards(cfg, mesh),
        )

        def compile_one(batch, step=step, st=st):
            with jax.set_mesh(mesh):
                return step.jitted.lower(st, None, batch, rng).compile()

        t0, c0 = time.perf_counter(), _cpu_seconds()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            list(pool.map(compile_one, batches))
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        row = {
            "model": args.model,
            "loss_form": step.loss_form,
            "threads": n,
            "shapes": len(batches),
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "cores_busy": round(cpu / wall, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv)
