"""Training metrics: a JSONL file and TensorBoard event files in the work directory; the clocks
that split the loop's wall time into training and what is not training; the one-step-late
fetch of a step's metrics; the window of steps whose throughput the loop reports.

The event files are written by event_file.py, without TensorFlow or tensorboardX. Only process
0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable

import jax

from transformer import errors, event_file
from transformer import workdir as workdir_lib

# What the loop's wall time goes to besides training steps, each clocked apart (profile:
# starting and ending a jax.profiler trace, about a second each).
APART = ('compile', 'eval', 'save', 'profile')


class MetricWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    A run that starts (or resumes) at step `start` first drops what an earlier, interrupted
    process wrote for later steps, in both, so every step appears once (`has_row` tells which
    rows of `start` are there). A file deleted during the run is noticed at the next write
    and made anew, with one warning (the rows written after it are kept). A write that fails
    is a WriteError naming the file (and the free space when the disk is full).
    """

    def __init__(self, workdir: str, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._kept = {}  # step -> the prefixes ('train/', 'eval/') of its rows kept
        if not enabled:
            return
        self._file = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
        if os.path.exists(self._file):
            with open(self._file, 'rb') as f:
                kept = [line for line in f.read().splitlines(keepends=True)
                        if _step_of(line) is not None and _step_of(line) <= start]
            workdir_lib.atomic_write(self._file, b''.join(kept), 'the metrics')
            for line in kept:
                self._kept.setdefault(_step_of(line), set()).update(
                    key.split('/', 1)[0] + '/' for key in json.loads(line) if '/' in key)
        self._jsonl = self._open_jsonl()
        # TensorBoard hides the events of steps >= purge_step written before this one.
        self._events = _EventFile(workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR),
                                  purge_step=start + 1)

    def has_row(self, step: int, prefix: str) -> bool:
        """Whether a row of `step` with scalars under `prefix` (e.g. 'eval/') was kept."""
        return prefix in self._kept.get(step, ())

    def _open_jsonl(self):
        with errors.writing('the metrics', self._file):
            return open(self._file, 'a')

    def write(self, step: int, scalars: dict, prefix: str = '') -> None:
        if not self.enabled:
            return
        record = {'step': int(step), 'time': time.time()}
        record.update({f'{prefix}{k}': float(v) for k, v in scalars.items()})
        if _deleted(self._file, self._jsonl):
            errors.warn(f'{self._file} was deleted during the run: writing the rows from step '
                        f'{step} on to a new one')
            errors.discard(self._jsonl)  # everything was flushed to the deleted file
            self._jsonl = self._open_jsonl()
        with errors.writing('the metrics', self._file, self._jsonl):
            self._jsonl.write(json.dumps(record) + '\n')
            self._jsonl.flush()
        self._events.write(int(step), {f'{prefix}{k}': float(v) for k, v in scalars.items()})

    def close(self) -> None:
        if self.enabled:
            errors.close_all([self._close_jsonl, self._events.close], failing=False)

    def _close_jsonl(self) -> None:
        with errors.writing('the metrics', self._file):
            self._jsonl.close()


class _EventFile:
    """A TensorBoard event file, written in the calling thread and flushed at each record (a
    kill loses none; like metrics.jsonl, not synced to the disk).

    (tensorboardX's SummaryWriter writes from a thread of its own: a write that fails there,
    a full disk, ends that thread with a traceback of its own and then blocks the loop's
    later writes once its queue fills.)
    """

    def __init__(self, directory: str, purge_step: int):
        self._directory, self._purge_step, self._opened = directory, purge_step, 0
        self._open()

    def _open(self) -> None:
        # TensorFlow's naming; a new file each time (a resumed run adds one).
        self._opened += 1
        self.file = os.path.join(self._directory, f'events.out.tfevents.{int(time.time())}.'
                                 f'{socket.gethostname()}.{os.getpid()}.{self._opened}')
        with errors.writing('the TensorBoard events', self.file):
            os.makedirs(self._directory, exist_ok=True)
            self._writer = open(self.file, 'wb')
        self._put(event_file.file_version_event(time.time()))
        self._put(event_file.session_start_event(time.time(), self._purge_step))

    def _put(self, event: bytes) -> None:
        with errors.writing('the TensorBoard events', self.file, self._writer):
            self._writer.write(event_file.record(event))
            self._writer.flush()

    def write(self, step: int, scalars: dict) -> None:
        if not os.path.exists(self.file):
            errors.warn(f'{self.file} was deleted during the run: writing the events from step '
                        f'{step} on to a new one')
            errors.discard(self._writer)  # everything was flushed to the deleted file
            self._open()
        for tag, value in scalars.items():
            self._put(event_file.scalar_event(time.time(), step, tag, value))

    def close(self) -> None:
        with errors.writing('the TensorBoard events', self.file):
            self._writer.close()


def _deleted(file: str, handle) -> bool:
    """Whether the open `handle` no longer is `file` (deleted, or replaced by another)."""
    try:
        return os.stat(file).st_ino != os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return True


def _step_of(line: bytes) -> int | None:
    try:
        return int(json.loads(line)['step'])
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return None


class Clocks:
    """The loop's wall time, split: training (steps, and waiting for their batches: the
    paper's training time, which train.max_minutes bounds) and, apart from it, compilation,
    evaluation, saving and profiling (`with clocks.apart('eval'):`), as big_vision pauses its
    chronometer.

    `before` carries the seconds of earlier runs of the same training (from the checkpoint),
    so the totals count across restarts.
    """

    def __init__(self, before: dict | None = None, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._start = now()
        self._before = {name: float((before or {}).get(name, 0.0)) for name in ('train',) + APART}
        self._apart = dict.fromkeys(APART, 0.0)
        self._open = None

    @contextlib.contextmanager
    def apart(self, name: str):
        """Time spent in the block counts as `name`, not as training (nested blocks count
        once, as the outermost)."""
        if self._open is not None:
            yield
            return
        self._open, start = name, self._now()
        try:
            yield
        finally:
            self._apart[name] += self._now() - start
            self._open = None

    def seconds(self, name: str = 'train') -> float:
        """Total seconds of `name` ('train' or one of APART), earlier runs included."""
        if name == 'train':
            spent = self._now() - self._start - sum(self._apart.values())
        else:
            spent = self._apart[name]
        return self._before[name] + spent

    def totals(self) -> dict:
        """Every clock's total, as stored in a checkpoint and logged under time/."""
        return {name: self.seconds(name) for name in ('train',) + APART}


class LateMetrics:
    """A step's metrics, fetched from the device one step late: `push` hands over a step's
    metrics (still on the device) and returns the previous step's on the host, after the next
    step was dispatched, so fetching never makes the device wait; `fetch` takes the newest now
    (before a log line or a save). `check(step, metrics)` sees every step's metrics once."""

    def __init__(self, check: Callable[[int, dict], None]):
        self._check, self._pending = check, None

    def push(self, step: int, device_metrics) -> dict | None:
        previous = self.fetch()
        self._pending = (step, device_metrics)
        return previous

    def fetch(self) -> dict | None:
        if self._pending is None:
            return None
        step, device_metrics = self._pending
        self._pending = None
        m = jax.device_get(device_metrics)
        self._check(step, m)
        return m


class Window:
    """Sums over the steps since the last log line, turned into the logged scalars, and the
    smoothed loss (an exponential moving average over every step). Rates are per second of
    training time (`clock`: Clocks.seconds), so evaluation, saving and compilation never
    slow the step time, tokens/s, MFU or ETA that follow them."""

    SMOOTHING = 0.98

    def __init__(self, smoothed_loss: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.smoothed_loss = smoothed_loss
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.start = self.clock()
        self.steps = 0
        self.flops = self.tokens = self.real = self.slots = self.loss = self.nll = 0.0
        self.input_wait = 0.0

    def add_batch(self, flops: float, real_tokens: int, slots: int, wait: float) -> None:
        """What the host knows of a batch before the step: FLOPs, (real) token slots, and how
        long the loop waited for it."""
        self.steps += 1
        self.input_wait += wait
        self.flops += flops
        self.real += real_tokens
        self.slots += slots

    def add_metrics(self, m: dict | None) -> None:
        """What the step reported (fetched from the device); None: nothing fetched."""
        if m is None:
            return
        loss = float(m['loss'])
        if m.get('skipped') and not math.isfinite(loss):
            return  # a float16 step skipped for its overflow: its loss would stay in the mean
        self.smoothed_loss = loss if self.smoothed_loss is None else (
            self.SMOOTHING * self.smoothed_loss + (1 - self.SMOOTHING) * loss)
        self.loss += loss
        self.nll += float(m['nll'])
        self.tokens += float(m['target_tokens'] + m['source_tokens'])

    def scalars(self, peak_flops: float | None) -> dict:
        """The window's means and rates; starts a new window."""
        elapsed = max(self.clock() - self.start, 1e-9)
        n = max(self.steps, 1)
        out = {'loss': self.loss / n, 'nll': self.nll / n,
               'perplexity': math.exp(min(self.nll / n, 50)),
               'tokens_per_step': self.tokens / n, 'tokens_per_second': self.tokens / elapsed,
               'step_time': elapsed / n, 'real_token_fraction': self.real / max(self.slots, 1),
               'loss_smoothed': self.smoothed_loss,
               'input_wait_fraction': self.input_wait / elapsed}
        if peak_flops:
            out['mfu'] = self.flops / elapsed / peak_flops
        self.reset()
        return out
