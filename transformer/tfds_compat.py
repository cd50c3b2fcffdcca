"""TFDS's archive extractor and shuffler without TensorFlow.

`tensorflow_datasets` prepares datasets without TensorFlow except in two places that still
call it through its lazy `tf` module: the extractor (`core/download/extractor.py`:
`tf.compat.as_text` on member names, `tf.io.gfile.GFile` to read archives and write members)
and the shuffler's on-disk buckets (`core/shuffle.py`: `tf.io.gfile` and
`tf.errors.ResourceExhaustedError`, used once a split exceeds 1 GB of examples, as WMT14's
training splits do). Without TensorFlow the first archive fails with "No module named
'tensorflow'" (tensorflow/datasets#11058, open upstream).

`install()` gives exactly those two modules a plain-Python stand-in for their `tf` name, and
only when TensorFlow is not installed; everything else in TFDS (download, checksums, example
generation, serialization, ArrayRecord writing) runs unchanged, so the prepared files are the
ones TFDS writes with TensorFlow (tests/test_prepare.py checks them byte for byte against
files prepared with TensorFlow installed). When TFDS stops needing it, delete this module and
its one call in `tfds_source.py`; the test fails first if an upgrade breaks it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import types

# The TFDS modules whose `tf` name gets the stand-in.
PATCHED_MODULES = ('tensorflow_datasets.core.download.extractor',
                   'tensorflow_datasets.core.shuffle')


class ResourceExhaustedError(OSError):
    """tf.errors.ResourceExhaustedError as the shuffler uses it: `message` ends with
    'Too many open files' when the process is out of file descriptors."""

    @property
    def message(self) -> str:
        return str(self)


class GFile:
    """The subset of tf.io.gfile.GFile that TFDS's extractor and shuffler use, on local files.

    Like TensorFlow's, the file opens on first use, so that creating one per shuffle bucket
    does not hold a descriptor until the bucket is written.
    """

    def __init__(self, path, mode: str = 'r'):
        self._path, self._mode, self._file = os.fspath(path), mode, None

    def _open(self):
        if self._file is None:
            try:
                self._file = open(self._path, self._mode)  # noqa: SIM115 - closed in close()
            except OSError as e:
                if e.errno == errno.EMFILE:
                    raise ResourceExhaustedError(e.errno, 'Too many open files') from e
                raise
        return self._file

    def read(self, n: int = -1):
        return self._open().read(n)

    def write(self, data) -> None:
        self._open().write(data)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self._open()  # the file itself: tarfile seeks and tells on it

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self._file is not None:
            # a failed write: closing flushes again and would raise over the first error
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        self.close()


def _as_text(value, encoding: str = 'utf-8') -> str:
    return value.decode(encoding) if isinstance(value, bytes) else str(value)


def stand_in() -> types.SimpleNamespace:
    """A module-like object with tf.compat.as_text, tf.io.gfile and tf.errors, as used there."""
    gfile = types.SimpleNamespace(GFile=GFile, exists=os.path.exists, remove=os.remove)
    return types.SimpleNamespace(
        compat=types.SimpleNamespace(as_text=_as_text),
        io=types.SimpleNamespace(gfile=gfile),
        errors=types.SimpleNamespace(ResourceExhaustedError=ResourceExhaustedError))


def tensorflow_installed() -> bool:
    return importlib.util.find_spec('tensorflow') is not None


def install() -> bool:
    """Gives TFDS's extractor and shuffler the stand-in when TensorFlow is not installed;
    returns whether it did. Idempotent."""
    if tensorflow_installed():
        return False
    import importlib
    tf = stand_in()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, 'tf'):
            raise ImportError(f'{name} has no `tf` any more: TFDS changed; see '
                              'transformer/tfds_compat.py')
        if not isinstance(module.tf, types.SimpleNamespace):
            module.tf = tf
    return True
