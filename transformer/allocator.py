"""The memory allocator of the programs: tcmalloc when the machine has it.

XLA:CPU allocates each step's large temporary buffers afresh and frees them afterwards. glibc's
malloc serves blocks over 32 MiB with mmap and returns them with munmap, so every step
page-faults its whole working memory anew: on the 2-core CPU about half of the Multi30k model's
training time went to the kernel (futex, munmap, page faults). tcmalloc keeps freed memory for
reuse: 1.35x faster training steps there (`benchmarks/allocator.py`).

A program (`python -m transformer.PROGRAM`) therefore re-executes itself once, at the import of
the package and before JAX is loaded, with tcmalloc in LD_PRELOAD when the library is installed
(Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) and not loaded yet.
TRANSFORMER_TCMALLOC=0 turns this off; nothing changes for code that imports the library.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping

from transformer import supervisor

OFF = 'TRANSFORMER_TCMALLOC'
PROGRAMS = ('train', 'evaluate', 'translate', 'average', 'summary', 'plot_attention',
            'report', 'prepare', 'score', 'export', 'preflight')
_NAMES = ('tcmalloc_minimal', 'tcmalloc')


def find_tcmalloc() -> str | None:
    """The shared library's name as the dynamic loader finds it, or None if not installed."""
    for name in _NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def reexec_env(argv: list[str], environ: Mapping[str, str],
               find: Callable[[], str | None] = find_tcmalloc) -> dict[str, str] | None:
    """The environment to re-execute `argv` (sys.orig_argv) in, or None to carry on as is.

    Only a program of this package run with `-m` is re-executed, only once (tcmalloc already in
    LD_PRELOAD ends it), and never when TRANSFORMER_TCMALLOC=0 or no tcmalloc is installed.
    """
    programs = {f'transformer.{p}' for p in PROGRAMS}
    preload = environ.get('LD_PRELOAD', '')
    if (not supervisor.is_program(argv, programs) or environ.get(OFF, '1') == '0'
            or 'tcmalloc' in preload):
        return None
    library = find()
    if library is None:
        return None
    return dict(environ, LD_PRELOAD=':'.join(p for p in (library, preload) if p))


def use_tcmalloc() -> None:
    """Re-executes the running program with tcmalloc preloaded when `reexec_env` says so."""
    env = reexec_env(sys.orig_argv, os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def in_use() -> str:
    """'tcmalloc' when it is mapped into this process, else 'system malloc'."""
    try:
        with open('/proc/self/maps') as maps:
            return 'tcmalloc' if 'tcmalloc' in maps.read() else 'system malloc'
    except OSError:
        return 'system malloc'
