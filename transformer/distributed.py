"""Several processes: starting JAX's distributed runtime, agreeing on host-side decisions, and
merging what each process decoded.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from transformer import workdir as workdir_lib


def initialize() -> None:
    """jax.distributed.initialize() when the environment names a multi-process job.

    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (our launch scripts), or
    the cluster's own variables (SLURM, Cloud TPU pods), which JAX detects by itself.
    """
    # Collectives between CPU processes (tests, CPU clusters) go through gloo.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if 'JAX_COORDINATOR_ADDRESS' in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
            num_processes=int(os.environ.get('JAX_NUM_PROCESSES', '1')),
            process_id=int(os.environ.get('JAX_PROCESS_ID', '0')))
    elif (int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ
          or 'TPU_PROCESS_ADDRESSES' in os.environ or _on_cloud_tpu_vm()):
        jax.distributed.initialize()


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM has PCI devices of Google's vendor id 0x1ae0; JAX then finds the pod
    slice's other workers through the metadata server (harmless on a single host)."""
    for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
        try:
            with open(path) as f:
                if f.read().strip() == '0x1ae0':
                    return True
        except OSError:
            continue
    return False


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
    with open(own, 'w') as f:
        json.dump(parts, f)
    sync(f'{label} parts written')
    merged = {}
    for p in range(jax.process_count()):
        with open(os.path.join(scratch_dir, workdir_lib.merge_part_name(label, p))) as f:
            merged.update({int(k): v for k, v in json.load(f).items()})
    sync(f'{label} parts read')
    os.remove(own)
    return merged
