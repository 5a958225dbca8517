"""Benchmark scripts: each prints JSON lines, then a markdown table.

Run them from the repository root as modules, e.g.
`python -m benchmarks.quality --config=configs/synthetic.py:tiny --seeds=0 --workdir=/tmp/q`;
`--help` lists a script's flags. A config and its overrides are read as by
distill_jax.main (`--config=FILE[:variants] --config.KEY=VALUE`). What several
scripts share is public here: `common.py` (flag parsing, config overrides),
`trained.py` (reading back a workdir's trained stages), `machine.py` (the
matmul reference rate, the allocator, the commit). `peers/` holds scripts that
measure other systems beside ours (their libraries: setup.py's `peers` extra).
The package is not installed with distill_jax (setup.py): it runs from a checkout.
"""
