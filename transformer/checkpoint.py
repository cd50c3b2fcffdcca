"""Checkpoints with Orbax: asynchronous, atomic; training state and data position in one step.

A checkpoint directory holds one subdirectory per step with two items: 'state' (params,
opt_state, step, rng) and 'data' (each process's iterator state, as JSON bytes in a
[processes, N] array). Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves no step that `latest_step` would return. This module
is Orbax's input and output only: saving, restoring the training state, reading one tree, the
info or the metadata of a step, listing steps. Of work directories it knows only where their
checkpoints are (`steps_in`); which checkpoints a decoding program reads, and how their
parameters become a model, is `saved_runs.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer import errors
from transformer import workdir as workdir_lib
from transformer.errors import CheckpointError, SaveError, UsageError

DATA_STATE_BYTES = 1 << 16  # room for one process's JSON iterator state


class _KeepSteps:
    """Orbax preservation policy: the steps in a set the caller updates (the best one)."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context):
        del context
        return [c.step in self.steps for c in checkpoints]


def make_manager(directory: str, keep: int, *, asynchronous: bool = True,
                 read_only: bool = False, protected: set[int] | None = None
                 ) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` keeping the last `keep` steps, and any step in
    `protected` (a set the caller may change later: the best checkpoint of early stopping)."""
    # Readers (evaluate, translate, average) neither create nor clean anything: a training run
    # may be writing into the same directory. (Orbax's own read_only mode logs three warnings.)
    keeping = dict(max_to_keep=None if read_only else keep)
    if protected is not None and not read_only:
        keeping = dict(preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(keep), _KeepSteps(protected)]))
    options = ocp.CheckpointManagerOptions(
        **keeping, enable_async_checkpointing=asynchronous,
        create=not read_only, cleanup_tmp_directories=not read_only)
    # Handlers named up front (Orbax warns when it meets an item it has none for); readers
    # restore parts of the state (the parameters), which takes the general PyTree handler.
    handlers = {'state': (ocp.PyTreeCheckpointHandler() if read_only
                          else ocp.StandardCheckpointHandler()),
                'data': ocp.StandardCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers=handlers)


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

def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict,
         info: dict | None = None) -> None:
    """Starts an asynchronous save of `state` and the iterator's `data_state` at `step`.

    `info` (JSON) is stored beside them (Orbax's custom metadata). `Saver` is what the
    training loop uses: it also notices when the writing fails.
    """
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.StandardSave({'iterator': _encode_data_state(data_state)})),
        custom_metadata=info or {})


class Saver:
    """Asynchronous saves whose failure stops the run at once, with earlier steps intact.

    Before a save, the directory must have room for it (about the size of the newest
    checkpoint, or of the state before the first): a full disk is refused before anything is
    written. A watcher thread waits for each save to finish, so a failure while writing
    (permissions, a disk that filled up meanwhile) is seen by the next `raise_if_failed`, not
    at the next save. SaveError names the step and the reason.
    """

    MARGIN = 1.1  # room asked for, over the expected size of a checkpoint

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self._step = None  # the step being written, or last written
        self._error = None
        self._watcher = None

    def save(self, step: int, state, data_state: dict, info: dict | None = None) -> None:
        self.wait()
        directory = str(self.manager.directory)
        free, needed = self._room(state)
        if free < needed:
            raise SaveError(f'could not save checkpoint {step} in {directory}: No space left '
                            f'on device ({free / 2**20:.0f} MiB free, about '
                            f'{needed / 2**20:.0f} MiB needed)')
        self._step = step
        try:
            save(self.manager, step, state, data_state, info)
        except Exception as e:  # noqa: BLE001 - any failure of the save is the user's one line
            raise self._failed(e) from e
        self._watcher = threading.Thread(target=self._watch, name='save-watcher', daemon=True)
        self._watcher.start()

    def _room(self, state) -> tuple[int, float]:
        """(free bytes where checkpoints go, bytes a checkpoint needs with the margin)."""
        directory = str(self.manager.directory)
        steps = self.manager.all_steps()
        if steps:
            needed = _tree_size(os.path.join(directory, str(max(steps))))
        else:  # this process's shards of the state, each written once however replicated
            needed = sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
                         for shard in leaf.addressable_shards if shard.replica_id == 0)
        return shutil.disk_usage(directory).free, self.MARGIN * needed

    def _watch(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._error = e

    def _failed(self, e: BaseException) -> SaveError:
        directory = str(self.manager.directory)
        room = f' ({errors.free_space(directory)})' if errors.is_full_disk(e) else ''
        return SaveError(f'could not save checkpoint {self._step} in {directory}: '
                         f'{errors.reason(e)}{room}')

    def raise_if_failed(self) -> None:
        """SaveError if the last save failed (cheap: a flag)."""
        if self._error is not None:
            raise self._failed(self._error)

    def wait(self) -> None:
        """Waits for the last save to be complete; SaveError if it failed."""
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        self.raise_if_failed()


def _tree_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _metadata(manager: ocp.CheckpointManager, step: int):
    """Orbax's metadata of checkpoint `step`. Orbax reads the items' metadata here too and
    warns about a damaged one; the damage is reported when the step is restored, in one line."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return manager.metadata(step)
    finally:
        absl_logging.set_verbosity(verbosity)


def info(manager: ocp.CheckpointManager, step: int) -> dict:
    """The `info` saved with checkpoint `step` ({} if none)."""
    return dict(_metadata(manager, step).custom_metadata or {})


def _arrays(tree, prefix: str = '') -> dict[str, tuple]:
    """{'params.embed.embedding': (shape, dtype name)} of a tree of arrays, abstract arrays or
    Orbax's array metadata (the names Orbax gives them), those under `prefix` only."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                        for k in path)
        if name.startswith(prefix):
            out[name] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return out


def mismatch(manager: ocp.CheckpointManager, step: int, abstract, item: str = 'state',
             prefix: str = '') -> str | None:
    """How the arrays of checkpoint `step`'s `item` (those whose names start with `prefix`)
    differ from `abstract`'s in names, shapes or dtypes, in words; None when they fit.

    Read from the checkpoint's metadata only. A checkpoint of another config is not damage:
    nothing of it is read, moved or skipped for it. Raises when the metadata cannot be read.
    """
    stored = _metadata(manager, step).item_metadata[item]
    if stored is None:  # damage, as any failure to read it (not a UsageError)
        raise ValueError(f'checkpoint {step} has no metadata for {item!r}')
    have, want = _arrays(stored, prefix), _arrays(abstract, prefix)
    # The parameters first: their names say what in the config differs.
    differing = sorted(set(have) ^ set(want) | {k for k in set(have) & set(want)
                                                  if have[k] != want[k]},
                       key=lambda name: (not name.startswith('params.'), name))
    if not differing:
        return None

    def describe(name):
        where = lambda arrays: (f'{arrays[name][1]}{list(arrays[name][0])}' if name in arrays
                                else 'nothing')
        return f'{name} is {where(have)} there, {where(want)} here'

    more = f' (and {len(differing) - 2} more)' if len(differing) > 2 else ''
    return '; '.join(describe(name) for name in differing[:2]) + more


@contextlib.contextmanager
def reader(directory: str):
    """A read-only manager over the checkpoint directory `directory`, closed after."""
    manager = make_manager(directory, keep=1, asynchronous=False, read_only=True)
    try:
        yield manager
    finally:
        manager.close()


def read_info(directory: str, step: int) -> dict:
    """The `info` of checkpoint `step` in `directory`; {} if it cannot be read."""
    with reader(directory) as manager:
        try:
            return info(manager, step)
        except Exception:  # noqa: BLE001 - a broken step is reported when it is restored
            return {}


def read_params(manager: ocp.CheckpointManager, step: int, abstract, item: str = 'params'):
    """The tree `item` of checkpoint `step`'s state ('params', or 'ema': their moving average),
    laid out as `abstract`; nothing else of the state (no optimizer state) is read."""
    wanted = {item: abstract}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True)))
    return restored['state'][item]


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """The training state (laid out as `abstract_state`) and this process's data state."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.StandardRestore({'iterator': _abstract_data_state()})))
    return restored['state'], _decode_data_state(restored['data']['iterator'])


def restore_newest(manager: ocp.CheckpointManager, abstract_state, broken_dir: str | None):
    """(step, state, data state, info) of the newest checkpoint that reads back whole; None if
    there is no checkpoint.

    A checkpoint whose arrays do not fit `abstract_state` (another config: other shapes,
    other parameters) is a UsageError naming them, and nothing is moved. A checkpoint that
    fails to read as itself is named in a one-line warning and, with `broken_dir`, moved there
    (never deleted) so that the run can write that step again; the next older one is tried.
    CheckpointError when none can be read.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            # The structure first: a checkpoint of another config is refused, not set aside.
            problem = (mismatch(manager, step, abstract_state)
                       or mismatch(manager, step, {'iterator': _abstract_data_state()}, 'data'))
            if problem:
                raise UsageError(f'checkpoint {step} in {manager.directory} does not fit this '
                                 f'run: {problem} (a config, or a number of processes, that '
                                 'differs from the run\'s; nothing was moved: use the run\'s, '
                                 'or a new --workdir)')
            state, data_state = restore(manager, step, abstract_state)
            return step, state, data_state, info(manager, step)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken checkpoint, whatever broke it
            failures.append(f'step {step} ({errors.reason(e)})')
            where = os.path.join(str(manager.directory), str(step))
            if broken_dir is not None:
                os.makedirs(broken_dir, exist_ok=True)
                moved = os.path.join(broken_dir, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
                shutil.move(where, moved)
                manager.reload()
                errors.warn(f'checkpoint {step} in {manager.directory} cannot be read '
                            f'({errors.reason(e)}); moved it to {moved}')
            else:
                errors.warn(f'checkpoint {step} in {manager.directory} cannot be read '
                            f'({errors.reason(e)}); trying the one before')
    if failures:
        raise CheckpointError(f'no checkpoint in {manager.directory} can be read: '
                              f'{"; ".join(failures)}')
    return None


def available_steps(directory: str) -> list[int]:
    """Complete checkpoint steps in `directory`, oldest first ([] when there is none)."""
    if not os.path.isdir(directory):
        return []
    with reader(directory) as manager:
        return sorted(manager.all_steps())


def steps_now(manager: ocp.CheckpointManager) -> list[int]:
    """The complete steps of `manager`'s directory as they are now (listed again: a train
    running beside saves and deletes), oldest first."""
    manager.reload()
    return sorted(manager.all_steps())


def steps_in(workdir: str) -> list[int]:
    """Complete checkpoint steps of the run in `workdir`, oldest first."""
    return available_steps(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR))


def keep_newest(manager: ocp.CheckpointManager, keep: int,
                protected: set[int] = frozenset()) -> list[int]:
    """Deletes all but the newest `keep` checkpoints and those in `protected` (Orbax does so
    after each save; a run killed between a commit and that clean-up, its last one, leaves
    one more); returns the steps deleted. Every process calls it (a collective)."""
    old = [step for step in sorted(manager.all_steps())[:-keep] if step not in protected]
    for step in old:
        manager.delete(step)
    return old


def save_params(path: str, params) -> None:
    """Writes a parameter tree to `path` (replacing what is there), synchronously."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), params, force=True)
    checkpointer.wait_until_finished()
