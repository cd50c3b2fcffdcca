"""Where training metrics go: a JSONL file and TensorBoard event files in the work directory.

tensorboardX writes event files without TensorFlow. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import time

import jax

# Dense bfloat16 peak FLOP/s per chip, for model FLOPs utilisation (vendors' data sheets).
PEAK_BF16_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'V100': 125e12, 'L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def peak_flops(device=None) -> float | None:
    """The bfloat16 peak of `device` (default: the first), None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


class MetricWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

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
