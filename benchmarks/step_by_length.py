"""Teacher train-step time by batch shape: trimmed windows vs full windows.

  python -m benchmarks.step_by_length --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt

Batches hold users of similar length, and drop the all-padding columns on the
left (`inputs [B, S]`, S <= L). For one batch of each input width S, this
times the jitted teacher step on the trimmed batch and on the same batch padded
back to the full window L (the baseline), in the same run, after a warm-up
step. Prints JSON lines and a markdown table with the per-epoch estimate.
"""

import json
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from benchmarks import common
from distill_jax import pipeline, sharding
from distill_jax.data.pipeline import TrainBatches
from distill_jax.train import state, steps


def _time(fn, st, batch, repeats):
    st, m = fn(st, None, batch, jax.random.key(0))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(repeats):
        st, m = fn(st, None, batch, jax.random.key(0))
    jax.block_until_ready(m)
    return st, (time.perf_counter() - t0) / repeats * 1e3


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """step_by_length.py's flags: `--config` (and overrides), `--repeats`."""
    common.define_config(flag_values, argv)
    flags.DEFINE_integer("repeats", 5, "Timed steps per batch shape.", flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
    """Times the teacher step on each batch width, trimmed and full, and prints the table."""
    args = common.parse_flags(argv, define_flags, __doc__)
    cfg = args.config
    data, mesh, rules = common.data_and_mesh(cfg)
    m = cfg.teacher
    model = pipeline.build(cfg, "teacher", data.split.num_items)
    st, shard = state.create_state(model, m, mesh, rules, jax.random.key(0))
    fn = steps.make_train_step(model, task="train", mesh=mesh, state_shardings=shard)
    tb = TrainBatches(
        data.split.train,
        num_items=data.split.num_items,
        max_len=m.max_len,
        batch_size=m.batch_size,
        causal=model.is_causal,
        mask_prob=m.mask_prob,
        seed=0,
    )
    first, counts = {}, {}
    for i in range(tb.steps_per_epoch):
        b = tb.batch(i)
        k = b["inputs"].shape[1]
        first.setdefault(k, b)
        counts[k] = counts.get(k, 0) + 1
    rows = []
    for k, b in sorted(first.items()):
        cut = m.max_len - b["inputs"].shape[1]
        row, pos = np.divmod(b["target_index"], b["inputs"].shape[1])
        full = dict(
            b,
            inputs=np.pad(b["inputs"], ((0, 0), (cut, 0))),
            target_index=row * m.max_len + pos + cut,
        )
        st, t_trim = _time(fn, st, sharding.put_batch(b, mesh), args.repeats)
        st, t_full = _time(fn, st, sharding.put_batch(full, mesh), args.repeats)
        row = {
            "S": k,
            "N": b["targets"].shape[0],
            "batches_per_epoch": counts[k],
            "trimmed_ms": round(t_trim, 1),
            "full_ms": round(t_full, 1),
            "speedup": round(t_full / t_trim, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    ep_trim = sum(r["trimmed_ms"] * r["batches_per_epoch"] for r in rows) / 1e3
    ep_full = sum(r["full_ms"] * r["batches_per_epoch"] for r in rows) / 1e3
    print(
        f"\n{data.info['name']}, teacher {m.name} d={m.embed_dim} blocks={m.num_blocks} "
        f"B={m.batch_size} L={m.max_len}\n"
    )
    print("| S | N (first batch) | batches/epoch | trimmed ms | full-window ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['S']} | {r['N']} | {r['batches_per_epoch']} | {r['trimmed_ms']} | "
            f"{r['full_ms']} | {r['speedup']} |"
        )
    print(
        f"\nepoch estimate: trimmed {ep_trim:.1f} s, full windows {ep_full:.1f} s "
        f"({ep_full / ep_trim:.2f}x)"
    )


if __name__ == "__main__":
    main(sys.argv)
