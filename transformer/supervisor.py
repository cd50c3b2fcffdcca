"""A multi-process `train` runs as the child of a small supervisor process, so that a lost peer
is one line and exit status 1 however JAX notices it.

JAX's distributed client ends the process itself when the coordination service reports a lost
process, or cannot be reached (process 0 died, a process never connected in time): it logs a
fatal C++ error with a stack dump and aborts (exit -6), whatever Python is doing, and
jax.distributed.initialize offers no way to handle that instead (its client's callback cannot
be a Python function). So, at the import of the package and before JAX is loaded,
`python -m transformer.train` in a multi-process job runs itself again as a child process and
relays the child's stderr. When the child aborts that way, the supervisor prints
`error: process I of N stopped: REASON (a lost peer process, or see its own error)` in place
of the dump and exits 1; otherwise it exits as the child did (128 + N for a signal N, with a
line). SIGTERM and SIGINT sent to the supervisor go to the child (stopping.py's supervising
phase); the child dies with the supervisor (PR_SET_PDEATHSIG), so a kill -9 of what was launched
ends the process as before. TRANSFORMER_SUPERVISE=0 runs the program directly.

This module imports nothing of JAX: the supervisor stays a small process.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from transformer.errors import EXIT_RUNTIME, EXIT_SIGNAL, lost_peer_line

OFF = 'TRANSFORMER_SUPERVISE'
CHILD = 'TRANSFORMER_SUPERVISED'  # set in the child's environment
PROGRAMS = ('transformer.train',)  # the programs that call jax.distributed.initialize

# JAX's fatal error, and the lines of its coordination client that come just before it: held
# back until it is clear whether the child aborts (then they are dropped) or carries on.
_FATAL = re.compile(rb'Terminating process because the JAX distributed service')
_COORDINATION_LOG = re.compile(rb'^[WEF]\d{4} [\d:.]+ +\d+ (preemption_sync_manager|'
                               rb'coordination_service_agent|coordination_service|client)'
                               rb'\.(cc|h):\d+\]', re.MULTILINE)
_HOLD_SECONDS = 5.0  # coordination warnings not followed by an abort are shown after this


def multi_process_job(environ: Mapping[str, str]) -> bool:
    """Whether the environment names a multi-process job (what `distributed.initialize` joins):
    JAX_COORDINATOR_ADDRESS, SLURM with several tasks, or a Cloud TPU VM."""
    return ('JAX_COORDINATOR_ADDRESS' in environ or int(environ.get('SLURM_NTASKS', '1')) > 1
            or 'TPU_WORKER_HOSTNAMES' in environ or 'TPU_PROCESS_ADDRESSES' in environ
            or on_cloud_tpu_vm())


def on_cloud_tpu_vm() -> bool:
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


def is_program(argv: list[str], programs=None) -> bool:
    """Whether `argv` (sys.orig_argv) runs one of the package's programs with -m."""
    return '-m' in argv[:-1] and (argv[argv.index('-m') + 1] in programs if programs
                                  else argv[argv.index('-m') + 1].startswith('transformer.'))


def needed(argv: list[str], environ: Mapping[str, str]) -> bool:
    """Whether `argv` (sys.orig_argv) is to run under a supervisor: a multi-process program
    of PROGRAMS run with -m, not yet supervised, not turned off."""
    return (is_program(argv, PROGRAMS) and CHILD not in environ
            and environ.get(OFF, '1') != '0' and multi_process_job(environ))


def supervise(forward_signals: Callable[[subprocess.Popen], None]) -> None:
    """Runs the program as a supervised child when `needed`, and exits as it did;
    `forward_signals(child)` (stopping.forward_to) passes SIGINT and SIGTERM on to it."""
    if not needed(sys.orig_argv, os.environ):
        return
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]],
                             env=dict(os.environ, **{CHILD: '1'}), stderr=subprocess.PIPE,
                             preexec_fn=_child_setup)
    forward_signals(child)
    fatal, said_error = relay(child, sys.stderr.buffer)
    sys.exit(exit_status(child.wait(), fatal, said_error, os.environ))


def _child_setup() -> None:
    """In the child before it runs: its own process group (a Ctrl-C in the terminal reaches
    the supervisor, which passes it on once), and death with the supervisor."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed supervisor leaves the child be
        pass


def relay(child: subprocess.Popen, out) -> tuple[bytes | None, bool]:
    """Copies the child's stderr to `out` as it comes, until the child ends. Returns JAX's
    fatal error text if the child printed one (it and the lines of the coordination client
    before it are not copied), and whether the child printed an `error:` line itself."""
    fd, held, held_since, fatal, said = child.stderr.fileno(), b'', 0.0, None, False
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        chunk = os.read(fd, 1 << 16) if ready else b''
        if ready and not chunk:  # the child closed its stderr: it has ended
            break
        if fatal is not None:
            fatal += chunk  # the dump: kept for the reason, never shown
            continue
        text = held + chunk
        start = _COORDINATION_LOG.search(text)
        if start is None and not held:
            said |= _write(out, text)
            continue
        if not held:
            said |= _write(out, text[:start.start()])
            text, held_since = text[start.start():], time.monotonic()
        if _FATAL.search(text) is not None:
            fatal, held = text, b''
        elif time.monotonic() - held_since > _HOLD_SECONDS:  # warnings only: show them
            said |= _write(out, text)
            held = b''
        else:
            held = text
    said |= _write(out, held)
    return fatal, said


def _write(out, data: bytes) -> bool:
    """Writes `data` to `out`; whether it holds an `error:` line."""
    if not data:
        return False
    try:
        out.write(data)
        out.flush()
    except OSError:  # the terminal or log is gone: keep draining, the child carries on
        pass
    return re.search(rb'(^|[\r\n])error: ', data) is not None


def exit_status(returncode: int, fatal: bytes | None, said_error: bool,
                environ: Mapping[str, str]) -> int:
    """The supervisor's exit status for the child's, printing the child's last line when it
    could not print one itself (JAX aborted it, or a signal killed it)."""
    if returncode >= 0 and fatal is None:
        return returncode
    if said_error:  # its own line came first (e.g. a failed collective), then JAX's abort
        return EXIT_RUNTIME if fatal is not None else EXIT_SIGNAL - returncode
    where = _process(environ)
    if fatal is not None:
        line = lost_peer_line(where, reason(fatal))
        status = EXIT_RUNTIME
    else:
        name = signal.Signals(-returncode).name
        line = f'{where} was killed by {name}'
        status = EXIT_SIGNAL - returncode
    sys.stderr.write(f'error: {line}\n')
    sys.stderr.flush()
    return status


def _process(environ: Mapping[str, str]) -> str:
    index = environ.get('JAX_PROCESS_ID', environ.get('SLURM_PROCID'))
    count = environ.get('JAX_NUM_PROCESSES', environ.get('SLURM_NTASKS'))
    return f'process {index} of {count}' if index is not None and count else 'this process'


def reason(fatal: bytes) -> str:
    """What JAX's fatal error says went wrong, in a few words."""
    text = fatal.decode('utf-8', 'replace')
    status = text.split('absl::Status: ', 1)[-1].strip()
    tasks = re.findall(r'/job:jax_worker/replica:\d+/task:(\d+)', status)
    if 'stopped sending heartbeats' in status:
        which = (f'process {", ".join(sorted(set(tasks), key=int))}' if tasks
                 else 'another process')
        return f'{which} stopped sending heartbeats for train.peer_timeout_seconds'
    if 'RegisterTask' in text or 'Deadline Exceeded' in status:
        return ('not every process connected within train.peer_timeout_seconds (a process did '
                'not start, or died)')
    if 'coordination service' in status and 'UNAVAILABLE' in status:
        return 'the coordination service on process 0 cannot be reached (UNAVAILABLE)'
    first = status.splitlines()[0] if status else 'JAX distributed service error'
    return first if len(first) <= 200 else first[:197] + '...'
