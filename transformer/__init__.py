"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) in JAX/Flax NNX."""

import glob
import importlib.util
import os
import sys

from transformer import allocator, stopping, supervisor


def _skip_tpu_runtime_without_tpus() -> None:
    """libtpu installed (the `tpu` extra, for pre-flight compiles) on a host without TPU
    chips: JAX would start a TPU runtime in every program and libtpu print a page of
    complaints about the missing hardware. Such a host runs JAX on its other platforms;
    preflight loads libtpu for its compiles all the same. JAX_PLATFORMS, when set, decides."""
    if 'JAX_PLATFORMS' in os.environ or importlib.util.find_spec('libtpu') is None:
        return
    for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
        try:
            with open(vendor) as f:
                if f.read().strip() == '0x1ae0':  # Google: a TPU chip
                    return
        except OSError:
            continue
    cuda = any(importlib.util.find_spec(name) for name in ('jax_cuda12_plugin',
                                                             'jax_cuda13_plugin'))
    os.environ['JAX_PLATFORMS'] = 'cuda,cpu' if cuda else 'cpu'



# `python -m transformer.PROGRAM` restarts itself with tcmalloc when it is installed (see
# allocator.py), installs the one handler of SIGINT and SIGTERM, by which a signal while it
# loads is one line (stopping.py), and, a multi-process train, runs as the child of a
# supervisor that turns JAX's aborts into one line and passes signals on (supervisor.py);
# importing the library does nothing of the kind. Before any of it, a host with libtpu but no
# TPU keeps JAX off the TPU runtime.
_skip_tpu_runtime_without_tpus()
allocator.use_tcmalloc()
if supervisor.is_program(sys.orig_argv):
    stopping.enter(stopping.Phase.LOADING)
supervisor.supervise(stopping.forward_to)
