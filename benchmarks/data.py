"""Data benchmark: time to build (read + preprocess + TFDS ArrayRecord) and to
iterate one training epoch of batches, for Amazon Beauty and MovieLens 100K.

  python benchmarks/data.py --datasets=../shared/datasets

Prints one JSON line per data set, then a markdown table.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from configs import beauty, ml100k
from distill_jax.data import dataset, loader
from distill_jax.data.pipeline import TrainBatches

CASES = {
    "ml-100k": (ml100k, "ml-100k"),
    "beauty": (beauty, "amazon-beauty/Beauty.txt"),
}


def bench(name: str, root: Path) -> dict:
    module, rel = CASES[name]
    config = module.get_config()
    config.data.path = str(root / rel)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        data = dataset.load(config, work)  # read, preprocess, build TFDS, load back
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dataset.load(config, work)  # cached TFDS dataset: read + preprocess + load
        cached_s = time.perf_counter() - t0
    m = config.teacher
    batches = TrainBatches(
        data.split.train,
        num_items=data.split.num_items,
        max_len=m.max_len,
        batch_size=m.batch_size,
        causal=True,
        mask_prob=m.mask_prob,
        seed=0,
    )
    steps = batches.steps_per_epoch
    it = iter(loader.iter_dataset(batches, steps))
    t0 = time.perf_counter()
    positions = valid = 0
    for batch in it:
        positions += batch["where"].size
        valid += int(batch["where"].sum())
    epoch_s = time.perf_counter() - t0
    return {
        "dataset": name,
        "interactions": data.info["interactions"],
        "build_s": round(build_s, 3),
        "cached_load_s": round(cached_s, 3),
        "epoch_steps": steps,
        "batch_size": m.batch_size,
        "epoch_iter_s": round(epoch_s, 3),
        "batches_per_s": round(steps / epoch_s, 1),
        "valid_target_share": round(valid / positions, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--datasets", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets")
    )
    args = p.parse_args()
    rows = [bench(n, Path(args.datasets)) for n in CASES]
    for r in rows:
        print(json.dumps(r))
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}\n")
    print(
        "| data | interactions | build s | cached load s | epoch steps (B) | "
        "epoch iterate s | batches/s | valid share of target slots |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['interactions']:,} | {r['build_s']} | "
            f"{r['cached_load_s']} | {r['epoch_steps']} ({r['batch_size']}) | "
            f"{r['epoch_iter_s']} | {r['batches_per_s']} | {r['valid_target_share']} |"
        )


if __name__ == "__main__":
    main()
