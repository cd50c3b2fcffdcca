"""The chips a run can be planned for from any host, by name, and their devices without the
hardware (`jax.experimental.topologies`): TPU slices through libtpu, NVIDIA GPUs through the
CUDA plugin and a target description, simulated CPU devices.

Names (what `preflight --target=` takes):
  tpu:GEN:TOPOLOGY   a TPU slice, e.g. tpu:v5e:2x4 (8 chips), tpu:v5e:16x16 (256), tpu:v4:2x2x2,
                     tpu:v5p:2x2x2, tpu:v6e:2x4; GEN is v4, v5e, v5p or v6e, TOPOLOGY the
                     slice's chip grid as Cloud TPU names it
  gpu:MODEL[xN]      N (default 1) GPUs of one host: gpu:h100, gpu:h100x8, gpu:a100, gpu:h200x8
  cpu:N              N simulated CPU devices (a plan for this host's compiler)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from typing import NamedTuple

import jax

from transformer.errors import UsageError

GIB = 1024 ** 3


class Chip(NamedTuple):
    memory_bytes: int  # what one device may hold
    peak_flops: float | None  # dense bfloat16 FLOP/s, vendors' data sheets (None: CPU)
    kind: str  # how JAX names the device


# TPU: HBM per chip and dense bf16 peak (Cloud TPU's system architecture pages).
TPU_CHIPS = {
    'v4': Chip(32 * GIB, 275e12, 'TPU v4'),
    'v5e': Chip(16 * GIB, 197e12, 'TPU v5 lite'),
    'v5p': Chip(95 * GIB, 459e12, 'TPU v5'),
    'v6e': Chip(32 * GIB, 918e12, 'TPU v6 lite'),
}

# NVIDIA GPUs (SXM parts): memory as the driver reports it, dense bf16 tensor-core peak.
GPU_CHIPS = {
    'h100': Chip(84_929_347_584, 989e12, 'NVIDIA H100 80GB HBM3'),
    'h200': Chip(150_754_820_096, 989e12, 'NVIDIA H200'),
    'a100': Chip(85_899_345_920, 312e12, 'NVIDIA A100-SXM4-80GB'),
}

# What XLA's GPU compiler needs to know of a GPU it cannot see (a GpuTargetConfigProto), from
# the data sheets: streaming multiprocessors, FP32 lanes per SM, clock, memory bandwidth, L2,
# shared memory, compute capability. The CUDA runtime and cuDNN versions are those of the
# `cuda` extra's wheels.
_GPU_SPECS = {
    'h100': dict(core_count=132, fpus_per_core=128, clock_rate_ghz=1.98,
                 memory_bandwidth=3_352_320_000_000, l2_cache_size=50 * 1024 ** 2,
                 shared_memory_per_core=228 * 1024, shared_memory_per_block_optin=227 * 1024,
                 major=9, minor=0),
    'h200': dict(core_count=132, fpus_per_core=128, clock_rate_ghz=1.98,
                 memory_bandwidth=4_800_000_000_000, l2_cache_size=50 * 1024 ** 2,
                 shared_memory_per_core=228 * 1024, shared_memory_per_block_optin=227 * 1024,
                 major=9, minor=0),
    'a100': dict(core_count=108, fpus_per_core=64, clock_rate_ghz=1.41,
                 memory_bandwidth=2_039_000_000_000, l2_cache_size=40 * 1024 ** 2,
                 shared_memory_per_core=164 * 1024, shared_memory_per_block_optin=163 * 1024,
                 major=8, minor=0),
}

EXAMPLES = ('tpu:v5e:2x4', 'tpu:v4:2x2x2', 'tpu:v5p:2x2x2', 'tpu:v5e:16x16', 'gpu:h100',
            'gpu:h100x8', 'gpu:a100', 'gpu:h200', 'cpu:8')


class Target(NamedTuple):
    name: str
    platform: str  # 'tpu', 'gpu' or 'cpu', as JAX's devices say
    chips: int
    chip: Chip
    topology: str  # TPU: the slice's grid; GPU: MODEL; CPU: ''


def parse(name: str) -> Target:
    """The Target a name stands for; UsageError (one line, with examples) otherwise."""
    def bad(why: str):
        return UsageError(f'--target={name}: {why}; e.g. {", ".join(EXAMPLES)}')

    parts = name.lower().split(':')
    if parts[0] == 'tpu':
        if len(parts) != 3 or parts[1] not in TPU_CHIPS:
            raise bad(f'want tpu:GEN:TOPOLOGY with GEN one of {", ".join(TPU_CHIPS)}')
        if not re.fullmatch(r'\d+(x\d+){1,2}', parts[2]):
            raise bad(f'{parts[2]!r} is not a chip grid such as 2x4 or 2x2x2')
        chips = math.prod(int(d) for d in parts[2].split('x'))
        return Target(name, 'tpu', chips, TPU_CHIPS[parts[1]], f'{parts[1]}:{parts[2]}')
    if parts[0] == 'gpu':
        m = re.fullmatch(r'([a-z0-9]+?)(?:x(\d+))?', parts[1]) if len(parts) == 2 else None
        if m is None or m.group(1) not in GPU_CHIPS:
            raise bad(f'want gpu:MODEL[xN] with MODEL one of {", ".join(GPU_CHIPS)}')
        chips = int(m.group(2) or 1)
        if not 1 <= chips <= 8:
            raise bad('one host holds 1 to 8 GPUs')
        return Target(name, 'gpu', chips, GPU_CHIPS[m.group(1)], m.group(1))
    if parts[0] == 'cpu':
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise bad('want cpu:N with N >= 1 simulated devices')
        return Target(name, 'cpu', int(parts[1]), Chip(_host_memory(), None, 'cpu'), '')
    raise bad('unknown kind of target')


def _host_memory() -> int:
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 0


def gpu_target_config(model: str) -> str:
    """The text of the GpuTargetConfigProto XLA compiles for when the GPU is absent."""
    s, chip = _GPU_SPECS[model], GPU_CHIPS[model]
    return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {s["shared_memory_per_core"]}
  threads_per_core_limit: 2048
  core_count: {s["core_count"]}
  fpus_per_core: {s["fpus_per_core"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {s["memory_bandwidth"]}
  l2_cache_size: {s["l2_cache_size"]}
  clock_rate_ghz: {s["clock_rate_ghz"]}
  device_memory_size: {chip.memory_bytes}
  shared_memory_per_block_optin: {s["shared_memory_per_block_optin"]}
  cuda_compute_capability {{ major: {s["major"]} minor: {s["minor"]} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{chip.kind}"
'''


@contextlib.contextmanager
def _quiet_stderr():
    """Keeps what C++ libraries print while loading (libtpu's complaints that this host has no
    TPU) off the terminal; yields a function that returns it, for an error message."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode='w+b') as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors='replace'))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def prepare_host(target: Target) -> None:
    """Call before JAX starts: compiles run on this host's CPU (and cpu:N gets N devices)."""
    jax.config.update('jax_platforms', 'cpu')
    if target.platform == 'tpu':
        # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) for the chips it drives; a
        # compile-only topology drives none, so plans may run beside each other or a run.
        os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    if target.platform == 'cpu':
        jax.config.update('jax_num_cpu_devices', target.chips)


def devices(target: Target) -> list:
    """The target's devices: real ones for cpu:N, compile-only ones (no hardware) otherwise."""
    if target.platform == 'cpu':
        found = jax.devices('cpu')
        if len(found) < target.chips:
            raise UsageError(f'--target={target.name}: JAX started with {len(found)} CPU '
                             'device(s) already (call prepare_host first)')
        return found[:target.chips]
    from jax.experimental import topologies
    jax_version = jax.__version__
    with _quiet_stderr() as printed:
        try:
            if target.platform == 'tpu':
                # v4 and v5p chips hold two TensorCores that JAX drives as one device
                # (megacore); libtpu's default description of a v4 slice has one per core.
                megacore = ({'chip_config_name': 'megacore'}
                            if target.topology.split(':')[0] in ('v4', 'v5p') else {})
                topology = topologies.get_topology_desc(platform='tpu',
                                                        topology_name=target.topology,
                                                        **megacore)
            else:
                topology = topologies.get_topology_desc(
                    'deviceless', 'cuda', target_config=gpu_target_config(target.topology),
                    topology=f'1x1x{target.chips}')
        except Exception as e:  # what each missing or refusing library raises differs
            text = f'{e} {printed()}'
            if target.platform == 'tpu' and 'not installed' in text:
                raise UsageError(
                    f'--target={target.name} needs libtpu to compile for TPUs (no TPU needed): '
                    f"pip install -e '.[tpu]' (or pip install 'jax[tpu]=={jax_version}')"
                ) from None
            if target.platform == 'gpu' and ('cuda' in text.lower() or 'plugin' in text):
                raise UsageError(
                    f'--target={target.name} needs the CUDA plugin to compile for GPUs (no GPU '
                    f"needed; several GB): pip install -e '.[cuda]' (or pip install "
                    f"'jax[cuda12]=={jax_version}'); JAX said: {str(e).splitlines()[0]}"
                ) from None
            raise UsageError(f'--target={target.name}: cannot make its devices: '
                             f'{str(e).splitlines()[0] if str(e) else type(e).__name__}'
                             ) from None
    found = list(topology.devices)
    if len(found) != target.chips:
        raise UsageError(f'--target={target.name}: the topology has {len(found)} devices, '
                         f'not {target.chips}')
    return found
