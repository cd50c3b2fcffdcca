"""Checkpoints with Orbax: asynchronous, atomic; training state and data position in one step.

A checkpoint directory holds one subdirectory per step with two items: 'state' (params,
opt_state, step, rng) and 'data' (each process's iterator state, as JSON bytes in a
[processes, N] array). Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves no step that `latest_step` would return. This module
knows Orbax and nothing of work directories (`workdir.py` says where the directory is).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer import errors

DATA_STATE_BYTES = 1 << 16  # room for one process's JSON iterator state


class CheckpointError(errors.UsageError):
    """A checkpoint that is missing or cannot be read (one line naming the step)."""


def make_manager(directory: str, keep: int, *, asynchronous: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` keeping the last `keep` steps."""
    # Readers (evaluate, translate, average) neither create nor clean anything: a training run
    # may be writing into the same directory. (Orbax's own read_only mode logs three warnings.)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=asynchronous,
        create=not read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=('state', 'data'))


# -- the data iterator's state, one JSON document per process ---------------------------------

def _process_sharding() -> NamedSharding:
    devices = np.array([jax.local_devices(process_index=p)[0] for p in range(jax.process_count())])
    return NamedSharding(Mesh(devices, ('process',)), P('process'))


def _encode_data_state(state: dict) -> jax.Array:
    raw = json.dumps(state).encode()
    if len(raw) + 4 > DATA_STATE_BYTES:
        raise ValueError(f'data iterator state is {len(raw)} bytes, more than {DATA_STATE_BYTES}')
    row = np.zeros((1, DATA_STATE_BYTES), np.uint8)
    row[0, :4] = np.frombuffer(np.uint32(len(raw)).tobytes(), np.uint8)
    row[0, 4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    return jax.make_array_from_process_local_data(
        _process_sharding(), row, (jax.process_count(), DATA_STATE_BYTES))


def _decode_data_state(array: jax.Array) -> dict:
    row = np.asarray(array.addressable_shards[0].data)[0]
    length = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
    return json.loads(row[4:4 + length].tobytes().decode())


def _abstract_data_state():
    return jax.ShapeDtypeStruct((jax.process_count(), DATA_STATE_BYTES), jnp.uint8,
                                sharding=_process_sharding())


# -- saving and restoring ---------------------------------------------------------------------

def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    """Starts an asynchronous save of `state` and the iterator's `data_state` at `step`."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.StandardSave({'iterator': _encode_data_state(data_state)})))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """The training state (laid out as `abstract_state`) and this process's data state."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.StandardRestore({'iterator': _abstract_data_state()})))
    return restored['state'], _decode_data_state(restored['data']['iterator'])


def available_steps(directory: str) -> list[int]:
    """Complete checkpoint steps in `directory`, oldest first ([] when there is none)."""
    if not os.path.isdir(directory):
        return []
    manager = make_manager(directory, keep=1, asynchronous=False, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_params(directory: str, step: int, abstract_params):
    """Only the parameters of checkpoint `step` (no optimizer state is read)."""
    manager = make_manager(directory, keep=1, asynchronous=False, read_only=True)
    try:
        item = {'params': abstract_params}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
        return restored['state']['params']
    finally:
        manager.close()


def average_params(trees: list):
    """The element-wise mean of parameter trees (section 6.1), accumulated in float32."""
    total = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), total, tree)
    return jax.tree.map(lambda t, x: (t / len(trees)).astype(x.dtype), total, trees[0])


def save_params(path: str, params) -> None:
    """Writes a parameter tree to `path` (replacing what is there), synchronously."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), params, force=True)
    checkpointer.wait_until_finished()
