"""Several processes: starting JAX's distributed runtime, agreeing on host-side decisions, and
merging what each process decoded.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from transformer import errors, supervisor
from transformer import workdir as workdir_lib
from transformer.errors import RunError


def initialize(timeout_seconds: int = 60) -> None:
    """jax.distributed.initialize() when the environment names a multi-process job.

    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (our launch scripts), or
    the cluster's own variables (SLURM, Cloud TPU pods), which JAX detects by itself.

    A process that does not come up, or stops answering, is given up on after
    `timeout_seconds` (train.peer_timeout_seconds; JAX's defaults are five minutes to connect
    and 100 s of missed heartbeats). JAX's client then aborts the process, which the
    supervisor (supervisor.py) reports in one line; where JAX raises instead, it is a RunError
    naming the timeout.
    """
    # Collectives between CPU processes (tests, CPU clusters) go through gloo.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    # The processes agree on a stop signal themselves (stopping.py). JAX's preemption service,
    # for multihost_utils.reached_preemption_sync_point, would take SIGTERM over in C and only
    # log it.
    jax.config.update('jax_enable_preemption_service', False)
    if 'JAX_COORDINATOR_ADDRESS' in os.environ:
        where = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                     num_processes=int(os.environ.get('JAX_NUM_PROCESSES', '1')),
                     process_id=int(os.environ.get('JAX_PROCESS_ID', '0')))
    elif supervisor.multi_process_job(os.environ):  # SLURM, Cloud TPU: JAX finds the rest
        where = {}
    else:
        return
    try:
        jax.distributed.initialize(**where, initialization_timeout=timeout_seconds,
                                   heartbeat_timeout_seconds=timeout_seconds,
                                   shutdown_timeout_seconds=timeout_seconds)
    except jax.errors.JaxRuntimeError as e:
        process = where.get('process_id', '?')
        raise RunError(f'process {process} of {where.get("num_processes", "?")} could not '
                       'start: not every process connected to the coordinator '
                       f'{where.get("coordinator_address", "")} within {timeout_seconds} s '
                       f'(train.peer_timeout_seconds): {errors.reason(e)}; a process did not '
                       'start or died (see its own error)') from None


def is_main() -> bool:
    """Process 0: the one that writes shared files and prints."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(*conditions: bool) -> list[bool]:
    """Any-reduce of host-side decisions, so every process saves and stops together."""
    if jax.process_count() == 1:
        return list(conditions)
    votes = multihost_utils.process_allgather(np.array(conditions, np.int32))
    return [bool(v) for v in np.asarray(votes).reshape(-1, len(conditions)).max(axis=0)]


def merge(parts: dict[int, str], scratch_dir: str, label: str) -> dict[int, str]:
    """Every process's `parts` merged, exchanged through files in a shared directory."""
    if jax.process_count() == 1:
        return parts
    own = os.path.join(scratch_dir, workdir_lib.merge_part_name(label, jax.process_index()))
    with errors.written(own, 'the evaluation scratch file', 'w') as f:
        json.dump(parts, f)
    sync(f'{label} parts written')
    merged = {}
    for p in range(jax.process_count()):
        with open(os.path.join(scratch_dir, workdir_lib.merge_part_name(label, p))) as f:
            merged.update({int(k): v for k, v in json.load(f).items()})
    sync(f'{label} parts read')
    os.remove(own)
    return merged
