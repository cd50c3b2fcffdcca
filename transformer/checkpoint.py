"""Checkpoints: Orbax, asynchronous, atomic; training state and data position in one step.

Layout of a work directory:
  config.json             the resolved config (written by train)
  vocab.model, vocab.json the shared BPE vocabulary
  checkpoints/<step>/     items 'state' (params, opt_state, step, rng) and 'data' (each
                          process's iterator state, as JSON bytes in a [processes, N] array)
  averaged/               the output of `python -m transformer.average`

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves no step that `latest_step` would return.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transformer import cli
from transformer.model import create_model

CHECKPOINTS = 'checkpoints'
AVERAGED = 'averaged'
DATA_STATE_BYTES = 1 << 16  # room for one process's JSON iterator state


def make_manager(workdir: str, keep: int, *, asynchronous: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over workdir/checkpoints keeping the last `keep` steps."""
    # Readers (evaluate, translate, average) neither create nor clean anything: a training run
    # may be writing into the same directory. (Orbax's own read_only mode logs three warnings.)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=asynchronous,
        create=not read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
                                 options=options, item_names=('state', 'data'))


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


# -- saving and restoring the training state ---------------------------------------------------

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


def available_steps(workdir: str) -> list[int]:
    """Complete checkpoint steps in the work directory, oldest first."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
        return []
    manager = make_manager(workdir, keep=1, asynchronous=False, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _restore_params(workdir: str, step: int, abstract_params):
    manager = make_manager(workdir, keep=1, asynchronous=False, read_only=True)
    try:
        item = {'params': abstract_params}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
        return restored['state']['params']
    finally:
        manager.close()


def _abstract_params(config):
    """(graphdef, abstract parameters on the first device) of the config's model."""
    model = nnx.eval_shape(lambda: create_model(config))
    graphdef, state = nnx.split(model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            nnx.to_pure_dict(state))
    return graphdef, abstract


def average_params(trees: list):
    """The element-wise mean of parameter trees (section 6.1), accumulated in float32."""
    total = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), total, tree)
    return jax.tree.map(lambda t, x: (t / len(trees)).astype(x.dtype), total, trees[0])


def average_last(workdir: str, last: int, config=None):
    """Averages the parameters of the last `last` checkpoints: (params, steps)."""
    _, abstract = _abstract_params(config or cli.load_workdir_config(workdir))
    return _average_last(workdir, last, abstract)


def _average_last(workdir: str, last: int, abstract):
    steps = available_steps(workdir)
    if not steps:
        raise cli.UsageError(f'no checkpoint in {os.path.join(workdir, CHECKPOINTS)}')
    if last > len(steps):
        raise cli.UsageError(f'asked to average the last {last} checkpoints, but '
                             f'{workdir} holds {len(steps)}: {steps}')
    chosen = steps[-last:]
    trees = [_restore_params(workdir, s, abstract) for s in chosen]
    return average_params(trees), chosen


def save_averaged(workdir: str, params, steps: list[int]) -> str:
    """Writes averaged parameters to workdir/averaged (replacing an older one)."""
    path = os.path.abspath(os.path.join(workdir, AVERAGED))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, 'params'), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, 'steps.json'), 'w') as f:
        json.dump({'steps': steps}, f)
    return path


def load_model(workdir: str, *, average: int = 1, step: int | None = None):
    """The trained model of a work directory: (model, config, info).

    Parameters come from the latest checkpoint (or `step`), averaged over the last `average`
    checkpoints when average > 1. `info['steps']` lists the steps used.
    """
    config = cli.load_workdir_config(workdir)
    if not os.path.exists(os.path.join(workdir, 'vocab.model')):
        raise cli.UsageError(f'{workdir} has no vocabulary (vocab.model)')
    graphdef, abstract = _abstract_params(config)
    if average > 1:
        params, steps = _average_last(workdir, average, abstract)
    else:
        available = available_steps(workdir)
        if not available:
            raise cli.UsageError(f'no checkpoint in {os.path.join(workdir, CHECKPOINTS)}')
        if step is not None and step not in available:
            raise cli.UsageError(f'no checkpoint of step {step} in {workdir}; have {available}')
        steps = [step if step is not None else available[-1]]
        params = _restore_params(workdir, steps[0], abstract)
    return nnx.merge(graphdef, params), config, {'steps': steps}
