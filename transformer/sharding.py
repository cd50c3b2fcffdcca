"""The sharding rules, in one place: the mesh, where parameters live, where batches live.

The mesh has two named axes: 'data' (batch split, parameters replicated) and 'fsdp' (batch
split too, and parameters and optimizer state split along d_model). Parameters carry logical
axis names from the model ('layers', 'vocab', 'embed', 'heads', 'mlp'); `RULES` maps them onto
the mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = 'data', 'fsdp'
BATCH_AXES = (DATA, FSDP)  # the batch is split over every device

# Logical axis -> mesh axis. 'embed' (d_model) divides every layer's matrices evenly for the
# usual mesh sizes, unlike 'vocab' (37000 is not a multiple of 8), so FSDP shards it. 'layers'
# is the leading axis of a stack of layers (model.py scans over it).
RULES = {'embed': FSDP, 'vocab': None, 'heads': None, 'mlp': None, 'layers': None}


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all); -1 for data takes the rest."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f'train.mesh_fsdp={fsdp} does not divide the {n} devices')
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f'train.mesh_data={data} x train.mesh_fsdp={fsdp} != {n} devices')
    grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def logical_to_mesh(spec: P) -> P:
    """Maps a PartitionSpec of logical names to mesh axes with `RULES`."""
    return P(*(RULES.get(name) if isinstance(name, str) else None for name in spec))


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an (abstract) nnx.State whose Variables carry logical names."""
    specs = nnx.get_partition_spec(abstract_state)

    def to_sharding(spec):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, logical_to_mesh(spec))

    return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [rows, length] are split by rows over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain_batch(x):
    """Keeps activations [batch, ...] split by rows over every device while the step is traced
    under its mesh (`jax.sharding.use_abstract_mesh`, as `train_step.jit_sharded_step` does).

    With parameters split along d_model (fsdp), XLA would otherwise gather activations rather
    than weights (base on 8 devices, fsdp 8: 13.3 GiB a device instead of 4.8). Without a mesh
    (decoding, tests) it does nothing."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))
