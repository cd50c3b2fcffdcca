"""The errors a user sees as one line, and the exit status each one gives.

Every program ends a failure with `error: <message>` on one line (`cli.run`) and:

  2    bad input: a flag, a config field, a data file, or a work directory that cannot be used
       as it is (no checkpoint, a changed vocabulary, a run with another config, a lock held);
  1    a fault during a run: a non-finite loss, a failed save, a full disk, a lost peer process;
  128+N  stopped by signal N (SIGINT 130, SIGTERM 143) where it could not save first (outside
       train's loop, which saves and exits 0).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys

# The ground floor: no project module, and JAX and tqdm only where a function needs them (the
# supervisor, which starts before JAX, imports this module for its one line).

EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2
EXIT_SIGNAL = 128  # + the signal's number, as a shell reports a process a signal ended


class Error(Exception):
    """Base of the project's errors; `exit_status` is what the program exits with.

    `exit_at_once`: the process ends right after its error line, without waiting for
    background threads that can no longer finish (a failed checkpoint save leaves some).
    """

    exit_status = EXIT_RUNTIME
    exit_at_once = False


class UsageError(Error, ValueError):
    """Bad input from the user (flags, config, files, work directory): exit status 2."""

    exit_status = EXIT_BAD_INPUT


class FieldError(UsageError):
    """A bad value of one named setting: a program's argument (e.g. 'average') or a config
    field (e.g. 'decode.beam_size'). The library names the setting; `cli` names it as the
    user gave it: `--average=0 ...` when the program has that flag."""

    def __init__(self, field: str, value, problem: str):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(self.naming(field))

    def naming(self, name: str) -> str:
        """The message with the setting called `name` (the field, or a flag like --average)."""
        if self.value is None or self.value == '':
            return f'{name} {self.problem}'
        value = self.value if isinstance(self.value, str) else repr(self.value)
        return f'{name}={value} {self.problem}'


class DataError(UsageError):
    """Bad input data; the message is one line naming the file, split or field."""


class RunError(Error, RuntimeError):
    """A run that must stop (non-finite loss, failed save, lost peer): exit status 1."""

    exit_status = EXIT_RUNTIME


class CheckpointError(UsageError):
    """No checkpoint that can be read (one line naming the steps and why): exit status 2."""


class WriteError(RunError):
    """A file of the run that could not be written (disk full, permissions): exit status 1.
    The message names what and where, and the free space when the disk is full. The process
    ends right after the line: an asynchronous save on the same full disk may never finish."""

    exit_at_once = True


class SaveError(RunError):
    """A save that failed (disk full, permissions): exit status 1; earlier steps are intact.

    Orbax's background threads of the failed save wait forever for signals that will not
    come, so the process ends at once after the error line.
    """

    exit_at_once = True


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM where the program cannot save first (the signal handler raises it,
    stopping.py; `cli.run` reports it): a KeyboardInterrupt, so that cleanup code runs and no
    `except Exception` swallows it; exit status 128 + the signal's number."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)

    @property
    def exit_status(self) -> int:
        return EXIT_SIGNAL + self.signum


def lost_peer_line(where: str, why: str) -> str:
    """The one line of a process (`where`: 'process I of N') whose peer is gone, or that failed
    itself; the supervisor's and cli.run's alike."""
    return f'{where} stopped: {why} (a lost peer process, or see its own error)'


def lost_peer(reason: str, index: int | None = None, count: int | None = None) -> str:
    """lost_peer_line for this process; `index` and `count` default to JAX's process index and
    count."""
    import jax
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return lost_peer_line(f'process {index} of {count}', reason)


# Errors of a full disk: the message then says how much room is left.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def free_space(path: str) -> str:
    """'N MiB free' on the file system of `path` (or of its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return f'{shutil.disk_usage(path).free / 2**20:.0f} MiB free'
    except OSError:
        return 'free space unknown'


def is_full_disk(exc: BaseException) -> bool:
    """Whether a full disk (or quota) is what made `exc`, anywhere in its chain."""
    return any(isinstance(e, OSError) and e.errno in _NO_ROOM for e in chain(exc)) or any(
        'No space left on device' in str(e) or 'Disk quota exceeded' in str(e)
        for e in chain(exc))


def write_failure(what: str, path: str, exc: BaseException) -> str:
    """'could not write WHAT PATH: reason' with the free space when the disk is full."""
    room = f' ({free_space(path)})' if is_full_disk(exc) else ''
    return f'could not write {what} {path}: {reason(exc)}{room}'


@contextlib.contextmanager
def writing(what: str, path: str, handle=None):
    """Turns an OSError of the block into a WriteError naming `what` is written to `path`
    (e.g. 'the vocabulary', DIR/vocab.json), with the free space when the disk is full.

    With `handle`, a file kept open across writes (the metrics), a failure closes it at once
    (`discard`): a later close would fail again on what its buffer kept.
    """
    try:
        yield
    except OSError as e:
        if handle is not None:
            discard(handle)
        raise WriteError(write_failure(what, path, e)) from e


@contextlib.contextmanager
def closing(handle, what: str, path: str):
    """Closes `handle`, a file being written as `what` (named `path`), after the block.

    A failed write leaves its data in the file's buffer, so on a full disk the close fails
    again as it flushes: when the block raised, the close's own error is dropped and the
    first error is the one raised. An OSError of the block or of the close is a WriteError
    naming `what` and `path` (see `writing`). Every file this project writes goes through
    here (`written`, workdir.atomic_write), or through `discard` for a file kept open.
    """
    try:
        with writing(what, path):
            yield handle
    except BaseException:
        discard(handle)
        raise
    with writing(what, path):
        handle.close()


@contextlib.contextmanager
def written(file: str, what: str, mode: str = 'wb'):
    """`file` opened with `mode` for writing as `what` (e.g. 'the token cache') and closed
    after the block, the first error of the open, the block or the close being raised as a
    one-line WriteError (see `closing`)."""
    with writing(what, file):
        handle = open(file, mode)  # noqa: SIM115 - closed by `closing`
    with closing(handle, what, file) as f:
        yield f


def discard(handle) -> None:
    """Closes `handle`, a file being written, after a failure, dropping the close's own error
    (a full disk fails the flush of what the buffer kept again): the first error is the one
    the user sees."""
    with contextlib.suppress(Exception):
        handle.close()


def close_all(closers, failing: bool) -> None:
    """Runs every closer. While a failure is on its way out (`failing`), their own errors
    (a full disk fails a writer's close too) are dropped: the first error is the one the user
    sees. Otherwise the first of them is raised."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - raised below unless a failure comes first
            first = first or e
    if first is not None and not failing:
        raise first


def warn(message: str) -> None:
    """One line `warning: message` on stderr, above any progress bar (process 0 only)."""
    import jax
    from tqdm import tqdm
    if jax.process_index() == 0:
        tqdm.write(f'warning: {message}', file=sys.stderr)


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first (its __cause__, else its __context__)."""
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def reason(exc: BaseException, limit: int = 200) -> str:
    """The most telling one-line reason of an exception chain: an OS error's text if there is
    one, else the first line of the innermost cause, cut to `limit` characters."""
    causes = chain(exc)
    for e in causes:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    for e in causes:
        for marker in ('No space left on device', 'Permission denied', 'Operation not permitted',
                       'File too large', 'Read-only file system'):
            if marker in str(e):
                return marker
    text = str(causes[-1]).strip()
    line = text.splitlines()[0] if text else type(causes[-1]).__name__
    return line if len(line) <= limit else line[:limit - 3] + '...'
