"""Stopping a program: the phases of its life, and what SIGINT and SIGTERM do in each.

A program (`python -m transformer.PROGRAM`) installs one handler for both signals at the import
of the package, before JAX loads, and keeps it to the end (`enter` puts it back as each phase
begins); the phase the program is in says what a signal does (`WHAT_A_SIGNAL_DOES`):

  loading      importing its libraries, parsing flags: `error: stopped by SIGTERM while
               starting; nothing was written`, exit 128 + N at once
  starting     in `cli.run`, outside train's loop (train's start-up, every other program's
               whole work): the program unwinds (errors.Interrupted; cleanup code runs, files
               are written atomically) and `cli.run` prints `stopped_message`, exit 128 + N
  unwinding    after that signal: later ones are ignored, so that none cuts the unwinding
  training     train's loop (`StopSignal`): the step finishes, every process saves the same
               step (`Agreement`), `Stopped at step N after a signal`, exit 0
  evaluating   an evaluation in train's loop, one process: it ends at once
               (EvaluationStopped), then as in training; with several processes the phase
               stays training and the evaluation ends at the next batch, agreed by all
  supervising  the supervisor of a multi-process train (supervisor.py): the signal goes to
               its child, which ends as its own phase says

At its top this module imports nothing of JAX, as the package's start-up and the supervisor
run before JAX loads; the loop's agreement between processes imports `distributed` in the
functions that need it.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

from transformer import errors


class Phase(enum.Enum):
    """The phases of a program's life, as the module's docstring describes them."""

    LOADING = 'loading'
    STARTING = 'starting'
    UNWINDING = 'unwinding'
    TRAINING = 'training'
    EVALUATING = 'evaluating'
    SUPERVISING = 'supervising'


class EvaluationStopped(BaseException):
    """A stop signal arrived during an evaluation: it ends there, and the loop saves and stops.
    (A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    swallows it.)"""


# The process's phase, and what the actions need: the signal it unwinds for, the loop's
# StopSignal, the supervisor's child. Signal handlers are per process, so this is too.
_now = SimpleNamespace(phase=None, unwinding_for=None, stop_signal=None, child=None,
                       evaluation_stopped=False)


def _exit_at_once(signum: int) -> None:
    """Nothing is written yet, and nothing will be: one line and 128 + N. (Python would print
    a KeyboardInterrupt traceback, or die of SIGTERM without a word.)"""
    os.write(2, f'error: stopped by {signal.Signals(signum).name} while starting; nothing '
                'was written\n'.encode())
    os._exit(errors.EXIT_SIGNAL + signum)


def _unwind(signum: int) -> None:
    """The program unwinds to `cli.run`, which says `stopped_message` and exits 128 + N."""
    _now.phase, _now.unwinding_for = Phase.UNWINDING, signum
    raise errors.Interrupted(signum)


def _ignore(signum: int) -> None:
    del signum


def _stop_after_the_step(signum: int) -> None:
    """The loop finishes its step, saves and exits 0 (a preemption's grace period)."""
    stop_signal = _now.stop_signal
    first = not stop_signal.requested
    stop_signal.requested = True
    if first:
        errors.warn(f'received signal {signum}: saving after this step and exiting')


def _end_the_evaluation(signum: int) -> None:
    """A preemption's grace period may be shorter than an evaluation: it ends at once."""
    _stop_after_the_step(signum)
    _now.phase, _now.evaluation_stopped = Phase.TRAINING, True
    raise EvaluationStopped()


def _forward(signum: int) -> None:
    _now.child.send_signal(signum)


WHAT_A_SIGNAL_DOES: dict[Phase, Callable[[int], None]] = {
    Phase.LOADING: _exit_at_once,
    Phase.STARTING: _unwind,
    Phase.UNWINDING: _ignore,
    Phase.TRAINING: _stop_after_the_step,
    Phase.EVALUATING: _end_the_evaluation,
    Phase.SUPERVISING: _forward,
}


def _handle(signum, frame) -> None:
    del frame
    WHAT_A_SIGNAL_DOES[_now.phase](signum)


def enter(phase: Phase) -> None:
    """The process is now in `phase` (from the main thread: at the package's import in a
    program, in `cli.run`, in train's loop).

    The one handler of SIGINT and SIGTERM is installed again with each phase: a library may
    take a signal over in C, where Python cannot see it (JAX's preemption service took SIGTERM
    at jax.distributed.initialize until `distributed` turned it off), and what a phase does
    must not depend on what was loaded since the last one began.
    """
    _now.phase = phase
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handle)


def phase() -> Phase | None:
    """The phase the process is in; None before a program's first `enter`."""
    return _now.phase


def forward_to(child) -> None:
    """The supervisor's phase: SIGINT and SIGTERM go to `child` (a subprocess.Popen)."""
    _now.child = child
    enter(Phase.SUPERVISING)


def stopped_message(signum: int) -> str:
    """What a program that unwound for `signum` says on its error line (`cli.run`)."""
    return (f'stopped by {signal.Signals(signum).name}; nothing half-written is left (run the '
            'same command again to go on)')


def raise_if_interrupted() -> None:
    """Raises again a signal's exception that was lost: Interrupted, or EvaluationStopped
    during an evaluation. A handler's exception is raised in whatever code runs at that
    moment: a library's broad `except` there may swallow it (seen once in CI: a SIGTERM at
    start-up, then the whole run, exit 0), and in a garbage collector callback (JAX runs one
    at each collection) Python drops it (seen once in CI: a SIGTERM that struck as an
    evaluation began, which then ran to its end)."""
    if _now.unwinding_for is not None:
        raise errors.Interrupted(_now.unwinding_for)
    if _now.evaluation_stopped:
        raise EvaluationStopped()


def _agree(*conditions: bool) -> list[bool]:
    # JAX: imported once a loop runs, never at the package's start-up.
    from transformer import distributed
    return distributed.agree(*conditions)


def _process_count() -> int:
    import jax
    return jax.process_count()


class StopSignal:
    """SIGTERM/SIGINT ask train's loop to finish the step, save and exit 0 (preemption).

    During an evaluation a signal ends it at once (`evaluation()`; a preemption's grace period
    may be shorter than an evaluation): in a single-process run the handler raises
    EvaluationStopped wherever the evaluation is; the processes of a multi-process run must
    stop together, so they agree before each evaluation batch (`checked`).
    """

    def __init__(self):
        raise_if_interrupted()  # a signal during start-up ends the program, not the loop
        self.requested = False
        _now.stop_signal = self
        enter(Phase.TRAINING)

    @contextlib.contextmanager
    def evaluation(self):
        """The block is an evaluation: a stop signal raises EvaluationStopped (at once with
        one process, at the next batch with several)."""
        if self.agreed():
            raise EvaluationStopped()
        if _process_count() == 1:
            enter(Phase.EVALUATING)
        try:
            yield
        finally:
            _now.evaluation_stopped = False
            enter(Phase.TRAINING)

    def agreed(self) -> bool:
        """Whether any process got a stop signal (a collective in a multi-process run)."""
        return _agree(self.requested)[0]

    def checked(self, eval_step: Callable) -> Callable:
        """`eval_step` that raises EvaluationStopped first when any process got a stop signal:
        the processes of a multi-process run end an evaluation at the same batch."""
        def checked_eval_step(*args):
            if self.agreed():
                raise EvaluationStopped()
            return eval_step(*args)
        return checked_eval_step


class Votes(NamedTuple):
    """The host-side conditions the processes agreed on (Agreement)."""
    signalled: bool  # SIGTERM/SIGINT: save and stop quickly
    save_time: bool  # train.checkpoint_every_minutes since the last save
    out_of_time: bool  # train.max_minutes of training reached


class Agreement:
    """Signals and time bounds, agreed by all processes every train.sync_every_steps steps
    (every step in a single-process run): each agreement is a collective that stalls the
    device queue. `t` is the config's train group, `clocks` the run's metrics.Clocks."""

    def __init__(self, t, stop_signal: StopSignal, clocks):
        self.t, self.stop_signal, self.clocks = t, stop_signal, clocks
        self.signalled = False
        self._last_save = time.time()

    def finished(self) -> bool:
        """A time-bounded run that has used its time already (run again when done)."""
        return 0 < self.t.max_minutes <= self.clocks.seconds() / 60

    def saved(self) -> None:
        self._last_save = time.time()

    def __call__(self, step: int) -> Votes:
        t = self.t
        if step % t.sync_every_steps and _process_count() > 1:
            return Votes(False, False, False)
        signalled, save_time, out_of_time = _agree(
            self.stop_signal.requested,
            time.time() - self._last_save >= 60 * t.checkpoint_every_minutes,
            self.finished())
        self.signalled = signalled
        return Votes(signalled, save_time, out_of_time)
