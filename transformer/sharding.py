"""The sharding rules, in one place: the mesh, where parameters live, where batches live.

The mesh has two named axes: 'data' (batch split, parameters replicated) and 'fsdp' (batch
split too, and parameters and optimizer state split along d_model). Parameters carry logical
axis names from the model ('layers', 'vocab', 'embed', 'heads', 'mlp'); `RULES` maps them onto
the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    if set(BATCH_AXES) & set(mesh.manual_axes):  # inside device_local: the rows are local
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def _split_dims(spec: P, mesh: Mesh) -> list[tuple[int, tuple[str, ...]]]:
    """(dimension, mesh axes) of each dimension a PartitionSpec splits over more than one
    device (a collective over an axis of size 1 would stay in the program as a no-op)."""
    out = []
    for dim, axes in enumerate(spec):
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
                     if mesh.shape[a] > 1)
        if axes:
            out.append((dim, axes))
    return out


def device_local(fn, mesh: Mesh, param_specs, compute_dtype=None):
    """Runs fn(params, batch, rng, scale) -> (gradient sums, sums) on each device's own rows and
    returns the sums over all devices, gradients laid out like the parameters.

    Inside, every device holds the whole parameters: each is all-gathered once, after its
    cast to `compute_dtype` where that is narrower (the model would cast it there anyway; half
    the bytes). Gradients are cast to float32 on the device that computed them and only then
    summed: a reduce-scatter over the axes a parameter is split along ('fsdp'), an all-reduce
    over the others, so no sum over devices is rounded to 16 bits. `rng` (a key or None) is
    folded with the device's index, for dropout masks of its own; `scale` (the float16 loss
    scale, a replicated scalar) is passed as it is.
    """
    narrow = compute_dtype is not None and jnp.dtype(compute_dtype).itemsize < 4

    def gather(x, spec):
        if narrow and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(compute_dtype)
        for dim, axes in _split_dims(spec, mesh):
            x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
        return x

    def reduce(g, spec):
        g = g.astype(jnp.float32)
        split = _split_dims(spec, mesh)
        others = tuple(a for a in BATCH_AXES
                       if mesh.shape[a] > 1 and all(a not in axes for _, axes in split))
        if others:
            g = jax.lax.psum(g, others)
        for dim, axes in split:
            g = jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
        return g

    def local(params, batch, rng, scale):
        full = jax.tree.map(gather, params, param_specs)
        if rng is not None and mesh.size > 1:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(BATCH_AXES))
        grads, sums = fn(full, batch, rng, scale)
        return jax.tree.map(reduce, grads, param_specs), jax.lax.psum(sums, BATCH_AXES)

    # check_vma=False: the sums above are over exactly the axes the out_specs need, skipping
    # those of size 1, which the check would still count as varying.
    def run(params, batch, rng, scale):
        specs = (param_specs, P(BATCH_AXES), P(), P())
        if rng is None:
            return jax.shard_map(lambda p, b, s: local(p, b, None, s), mesh=mesh,
                                 in_specs=specs[:2] + specs[3:], out_specs=(param_specs, P()),
                                 check_vma=False)(params, batch, scale)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(param_specs, P()),
                             check_vma=False)(params, batch, rng, scale)

    return run
