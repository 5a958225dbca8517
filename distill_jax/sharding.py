"""Device mesh, logical-axis rules and the placement of batches and state.

One code path from one CPU to a pod: a `('data', 'model')` mesh sized from
`config.mesh`; parameters carry logical axis names (set in the models) which
`config.sharding.rules` maps to mesh axes; batches are split along 'data'.
"""

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """Builds the mesh from `config.mesh` (`-1` on one axis fills the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, model = cfg.data, cfg.model
    if data == -1 and model == -1:
        raise ValueError(
            "config.mesh.data and config.mesh.model are both -1; at most one may "
            "fill the remaining devices."
        )
    if data == -1:
        data = n // model if model and n % model == 0 else 0
    if model == -1:
        model = n // data if data and n % data == 0 else 0
    if data * model != n:
        raise ValueError(
            f"config.mesh.data={cfg.data}, config.mesh.model={cfg.model} do not "
            f"tile the {n} available devices; expected data * model == {n}."
        )
    return jax.make_mesh(
        (data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices
    )


def rules(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules of `config.sharding.rules` as a tuple of pairs."""
    return tuple((str(name), axis) for name, axis in cfg.sharding.rules)


def vocab_shards(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """How many pieces `config.sharding.rules` split the 'vocab' (catalogue) axis into."""
    shards = 1
    for name, axes in rules(cfg):
        if name == "vocab" and axes is not None:
            for axis in (axes,) if isinstance(axes, str) else axes:
                shards *= mesh.shape[axis]
            break  # flax uses the first rule that names the axis
    return shards


def logical_shardings(abstract_boxed: Any, mesh: jax.sharding.Mesh, rule_pairs) -> Any:
    """NamedShardings for a pytree whose leaves may be `nn.Partitioned` boxes."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rule_pairs)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split along 'data'; the rest replicated."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, key: str) -> None:
    """Every data shard and every process must get the same number of rows."""
    data = mesh.shape["data"]
    procs = jax.process_count()
    if batch_size % data or batch_size % procs:
        raise ValueError(
            f"config.{key}={batch_size} is invalid: expected a multiple of the "
            f"mesh's data axis ({data}) and of the process count ({procs})."
        )


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Places a GLOBAL numpy batch on the mesh; each process feeds its own rows.

    Every process computes the same global batch (cheap, deterministic), keeps
    its contiguous block of rows and hands it to
    `jax.make_array_from_process_local_data`, so the same code serves one
    process and many hosts.
    """
    sharding = batch_sharding(mesh)
    pid, procs = jax.process_index(), jax.process_count()
    out = {}
    for key, value in batch.items():
        rows = value.shape[0] // procs
        local = value[pid * rows : (pid + 1) * rows]
        out[key] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out


def put_local_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Places THIS process's block of a batch on the mesh (see `loader.ShardRows`).

    Every process passes its own contiguous block (process i holds block i),
    so the global arrays have `process_count` times the local rows.
    """
    sharding = batch_sharding(mesh)
    procs = jax.process_count()
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value, (value.shape[0] * procs,) + value.shape[1:]
        )
        for key, value in batch.items()
    }
