"""Benchmark scripts: each prints JSON lines, then a markdown table.

Run from the repository root as modules, e.g.
`python -m benchmarks.quality --config=configs/synthetic.py:tiny --seeds=0 --workdir=/tmp/q`;
`--help` lists a script's flags. What several scripts share (flag parsing,
config overrides, loading a trained stage, the matmul reference rate) lives in
`benchmarks/common.py`. The package is not installed with distill_jax: it is
run from a checkout.
"""
