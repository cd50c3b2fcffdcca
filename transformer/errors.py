"""The errors a user sees as one line, and the exit status each one gives.

Every program ends a failure with `error: <message>` on one line (`cli.run`) and:

  2  bad input: a flag, a config field, a data file, or a work directory that cannot be used
     as it is (no checkpoint, a changed vocabulary, a run with another config, a lock held);
  1  a fault during a run: a non-finite loss, a failed save, a lost peer process.
"""

from __future__ import annotations

import sys

import jax
from tqdm import tqdm

EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2


class Error(Exception):
    """Base of the project's errors; `exit_status` is what the program exits with."""

    exit_status = EXIT_RUNTIME


class UsageError(Error, ValueError):
    """Bad input from the user (flags, config, files, work directory): exit status 2."""

    exit_status = EXIT_BAD_INPUT


class RunError(Error, RuntimeError):
    """A run that must stop (non-finite loss, failed save, lost peer): exit status 1."""

    exit_status = EXIT_RUNTIME


def warn(message: str) -> None:
    """One line `warning: message` on stderr, above any progress bar (process 0 only)."""
    if jax.process_index() == 0:
        tqdm.write(f'warning: {message}', file=sys.stderr)


def reason(exc: BaseException) -> str:
    """The most telling one-line reason of an exception chain: an OS error's text, if any."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip()
    for line in text.splitlines():
        for marker in ('No space left', 'Permission denied', 'Operation not permitted',
                       'File too large', 'Read-only file system'):
            if marker in line:
                return marker if marker != 'No space left' else 'No space left on device'
    return text.splitlines()[0][:300] if text else type(exc).__name__
