"""The PartitionSpec of every parameter, pinned in tests/golden/partition_specs.json.

The logical-axis rules live in the config (`config.sharding.rules`); this test
fails when a model change or a rule change moves a parameter to another
layout (say, an item table that silently becomes replicated). After an
intended change, regenerate the file:

  DISTILL_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_partition_specs.py
"""

import json
import os
from pathlib import Path

import jax
import pytest

from configs import beauty
from distill_jax import models
from distill_jax import sharding as sharding_lib
from distill_jax.train import state as state_lib

GOLDEN = Path(__file__).parent / "golden" / "partition_specs.json"
NUM_ITEMS = 12101  # Amazon Beauty's catalogue; the specs do not depend on it.


def _specs() -> dict:
    out = {}
    for variant in ("", "bert4rec"):
        config = beauty.get_config(variant or None)
        config.mesh.data, config.mesh.model = 2, 4
        mesh = sharding_lib.make_mesh(config.mesh)
        for key in ("teacher", "student"):
            model = models.build_model(
                config[key], num_items=NUM_ITEMS, max_len=config[key].max_len
            )
            shardings = state_lib.param_shardings(model, mesh, sharding_lib.rules(config))
            flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
            out[f"{config[key].name}/{key}"] = {
                jax.tree_util.keystr(path): s.spec for path, s in flat
            }
    return out


def test_every_parameter_has_its_pinned_partition_spec():
    got = {name: {p: str(s) for p, s in specs.items()} for name, specs in _specs().items()}
    if os.environ.get("DISTILL_JAX_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name}: PartitionSpecs differ from {GOLDEN}"


def test_item_tables_are_row_sharded_and_small_parameters_replicated():
    for name, specs in _specs().items():
        for path, spec in specs.items():
            if "item_embedding" in path or "output_bias" in path:
                assert spec[0] == "model", f"{name} {path}: {spec}"
            else:
                assert all(a is None for a in spec), f"{name} {path}: {spec}"
