"""Traces of chosen training steps with `jax.profiler`, for TensorBoard's profile plugin or
Perfetto (ui.perfetto.dev opens the `.trace.json.gz` beside each `.xplane.pb`).

`train.profile_steps='START:STOP'` traces steps START+1 .. STOP (the steps taken after step
START, up to and including step STOP) into the work directory's `profile/`; each step is
wrapped in a `jax.profiler.StepTraceAnnotation`, so the trace shows step boundaries. Skip the
first steps: they compile.
"""

from __future__ import annotations

import contextlib
import os

import jax


class StepTracer:
    """Starts a trace before step START+1 and stops it after step STOP (waiting for the
    device first, so the trace holds those steps' work); a no-op without a range
    (`steps` as config.profile_steps parses train.profile_steps)."""

    def __init__(self, steps: tuple[int, int] | None, directory: str, enabled: bool = True,
                 apart=None):
        self.steps, self.directory = steps, directory
        self.enabled = enabled and steps is not None
        self.active = False
        # Starting and ending a trace take a second or so: clocked apart from training.
        self._apart = apart or (lambda name: contextlib.nullcontext())

    def step(self, step: int):
        """Context around the dispatch of step `step` (1-based: the step it produces)."""
        if not self.enabled:
            return contextlib.nullcontext()
        start, stop = self.steps
        if step == start + 1 and not self.active:
            os.makedirs(self.directory, exist_ok=True)
            with self._apart('profile'):
                jax.profiler.start_trace(self.directory)
            self.active = True
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation('train', step_num=step)

    def after(self, step: int, state) -> None:
        """After step `step` was dispatched: ends the trace at STOP."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            with self._apart('profile'):
                jax.profiler.stop_trace()
            self.active = False
