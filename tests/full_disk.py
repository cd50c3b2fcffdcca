"""`python tests/full_disk.py PATTERN -m transformer.PROGRAM ARGS`: the program on a full disk.

Every file whose path contains PATTERN is written as on a full disk (ENOSPC), buffers and
all (a write beyond the buffer fails, and so does each flush and close after it), and the
disk reports 1 MiB free: the program's own code (token cache, vocabulary, metrics, TensorBoard
events, the check before a checkpoint is saved) meets the operating system's answer; nothing of
the program is changed. (Checkpoint arrays are written by TensorStore, in C++, which this does
not reach: the check before each save is what refuses them.)
"""

import builtins
import errno
import io
import os
import runpy
import shutil
import sys

PATTERN = sys.argv[1]
FREE = 1 << 20
_open = builtins.open


class _FullFile:
    """A file open for writing on a full disk, as a buffered file meets it: writes that fit in
    the buffer (io.DEFAULT_BUFFER_SIZE) seem to succeed; a write beyond it, and every flush and
    close while anything is buffered, fail with ENOSPC, since the buffer keeps what it could
    not write (close closes the file all the same)."""

    def __init__(self, file):
        self._file, self._buffered = file, 0

    def _full(self):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._file.name)

    def write(self, data):
        if self._buffered + len(data) > io.DEFAULT_BUFFER_SIZE:
            self._buffered = max(self._buffered, 1)
            raise self._full()
        self._buffered += len(data)
        return len(data)

    def flush(self):
        if self._buffered:
            raise self._full()

    def close(self):
        if self._file.closed:
            return
        self._file.close()
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _full_open(file, mode='r', *args, **kwargs):
    handle = _open(file, mode, *args, **kwargs)
    name = file if not isinstance(file, int) else os.readlink(f'/proc/self/fd/{file}')
    if any(c in mode for c in 'wax+') and PATTERN in os.fspath(name):
        return _FullFile(handle)
    return handle


def _disk_usage(path):
    usage = _disk_usage_of(path)
    return usage._replace(free=FREE, used=usage.total - FREE)


_disk_usage_of = shutil.disk_usage
builtins.open = io.open = _full_open
shutil.disk_usage = _disk_usage

if __name__ == '__main__':
    assert sys.argv[2] == '-m', 'usage: full_disk.py PATTERN -m MODULE ARGS'
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name='__main__', alter_sys=True)
