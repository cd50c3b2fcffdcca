"""Training metrics: a JSONL file and TensorBoard event files in the work directory, and the
window of steps whose throughput the loop reports.

tensorboardX writes event files without TensorFlow. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time

from tensorboardX import SummaryWriter

from transformer import workdir as workdir_lib


class MetricWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    A run that starts (or resumes) at step `start` first drops what an earlier, interrupted
    process wrote for later steps, in both, so every step appears once.
    """

    def __init__(self, workdir: str, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        file = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
        if os.path.exists(file):
            with open(file, 'rb') as f:
                kept = [line for line in f.read().splitlines(keepends=True)
                        if _step_of(line) is not None and _step_of(line) <= start]
            workdir_lib.atomic_write(file, b''.join(kept))
        self._jsonl = open(file, 'a')
        # TensorBoard hides the events of steps >= purge_step written before this one.
        self._tb = SummaryWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR),
                                 purge_step=start + 1)

    def write(self, step: int, scalars: dict, prefix: str = '') -> None:
        if not self.enabled:
            return
        record = {'step': int(step), 'time': time.time()}
        record.update({f'{prefix}{k}': float(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(record) + '\n')
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(f'{prefix}{k}', float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _step_of(line: bytes) -> int | None:
    try:
        return int(json.loads(line)['step'])
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return None


class Window:
    """Sums over the steps since the last log line, turned into the logged scalars, and the
    smoothed loss (an exponential moving average over every step)."""

    SMOOTHING = 0.98

    def __init__(self, smoothed_loss: float | None = None):
        self.smoothed_loss = smoothed_loss
        self.reset()

    def reset(self) -> None:
        self.start = time.time()
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

    def add_metrics(self, m: dict) -> None:
        """What the step reported (fetched from the device)."""
        loss = float(m['loss'])
        self.smoothed_loss = loss if self.smoothed_loss is None else (
            self.SMOOTHING * self.smoothed_loss + (1 - self.SMOOTHING) * loss)
        self.loss += loss
        self.nll += float(m['nll'])
        self.tokens += float(m['target_tokens'] + m['source_tokens'])

    def scalars(self, peak_flops: float | None) -> dict:
        """The window's means and rates; starts a new window."""
        elapsed = time.time() - self.start
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
