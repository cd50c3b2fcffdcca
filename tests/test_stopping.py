"""What SIGINT and SIGTERM do in each phase of a program's life (stopping.py), in this process.
tests/test_reliability.py and tests/test_train.py send them to real programs: while they load,
start, train, evaluate, and to the supervisor of two processes."""

import gc
import signal
import sys
import time
from types import SimpleNamespace

import pytest

from transformer import cli, errors, stopping


@pytest.fixture
def phases():
    """stopping's handler in this process for one test; pytest's handlers and the module's
    state are put back after it."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    state = dict(vars(stopping._now))
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    vars(stopping._now).update(state)


def test_a_signal_while_starting_unwinds_once_and_is_not_lost(phases):
    stopping.enter(stopping.Phase.STARTING)
    with pytest.raises(errors.Interrupted) as raised:
        signal.raise_signal(signal.SIGTERM)
    assert raised.value.exit_status == errors.EXIT_SIGNAL + signal.SIGTERM
    assert stopping.phase() == stopping.Phase.UNWINDING
    signal.raise_signal(signal.SIGINT)  # ignored: nothing cuts the unwinding
    # Swallowed by a library on the way: train's loop does not start.
    with pytest.raises(errors.Interrupted):
        stopping.StopSignal()
    assert stopping.stopped_message(signal.SIGTERM) == (
        'stopped by SIGTERM; nothing half-written is left (run the same command again to go on)')


def test_a_signal_inside_a_gc_callback_is_raised_again_without_a_traceback(phases, capsys,
                                                                             monkeypatch):
    """JAX runs a garbage collector callback; a signal that strikes in it raises there, and
    Python prints the exception it cannot propagate ("Exception ignored in ...", a
    traceback) and goes on. A program's hook keeps that off the console, and the program
    unwinds at its next check, as for an exception a library swallowed."""
    monkeypatch.setattr(sys, 'unraisablehook', cli._unraisablehook)
    stopping.enter(stopping.Phase.STARTING)

    def collecting(stage, info):
        if stage == 'start':
            signal.raise_signal(signal.SIGINT)

    gc.callbacks.append(collecting)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(collecting)
    assert capsys.readouterr().err == ''
    assert stopping.phase() == stopping.Phase.UNWINDING
    with pytest.raises(errors.Interrupted) as raised:
        stopping.raise_if_interrupted()
    assert raised.value.exit_status == errors.EXIT_SIGNAL + signal.SIGINT
    gc.callbacks.append(lambda stage, info: 1 / 0)  # any other exception is still printed
    try:
        gc.collect()
    finally:
        gc.callbacks.pop()
    assert 'ZeroDivisionError' in capsys.readouterr().err


def test_in_the_loop_a_signal_is_a_vote_to_save_and_stop(phases):
    stopping.enter(stopping.Phase.STARTING)
    stop = stopping.StopSignal()
    t = SimpleNamespace(sync_every_steps=1, checkpoint_every_minutes=60, max_minutes=0)
    agreement = stopping.Agreement(t, stop, SimpleNamespace(seconds=lambda: 0.0))
    assert agreement(1) == stopping.Votes(False, False, False)
    signal.raise_signal(signal.SIGTERM)  # the step goes on
    assert stop.requested and stopping.phase() == stopping.Phase.TRAINING
    assert agreement(2) == stopping.Votes(True, False, False) and agreement.signalled


def test_a_signal_ends_an_evaluation_at_once(phases):
    stopping.enter(stopping.Phase.STARTING)
    stop = stopping.StopSignal()
    step = stop.checked(lambda x: x + 1)
    with pytest.raises(stopping.EvaluationStopped), stop.evaluation():
        assert stopping.phase() == stopping.Phase.EVALUATING and step(1) == 2
        signal.raise_signal(signal.SIGINT)
    assert stop.requested and stopping.phase() == stopping.Phase.TRAINING
    with pytest.raises(stopping.EvaluationStopped):  # the next batch of another process
        step(1)
    with pytest.raises(stopping.EvaluationStopped), stop.evaluation():  # the next evaluation
        pass


def test_an_evaluation_whose_signal_a_gc_callback_dropped_ends_at_the_next_check(
        phases, capsys, monkeypatch):
    """As above, in an evaluation: the evaluation ends at its next check (between
    evaluators, before each batch of loss or decoding, in the test hook's sleep), not at its
    end (CI once waited a minute of TRANSFORMER_SLOW=eval:60 for it)."""
    monkeypatch.setattr(sys, 'unraisablehook', cli._unraisablehook)
    monkeypatch.setenv('TRANSFORMER_SLOW', 'eval:30')
    stopping.enter(stopping.Phase.STARTING)
    stop = stopping.StopSignal()

    def collecting(stage, info):
        if stage == 'start':
            signal.raise_signal(signal.SIGTERM)

    start = time.monotonic()
    with pytest.raises(stopping.EvaluationStopped), stop.evaluation():
        gc.callbacks.append(collecting)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(collecting)
        assert stop.requested and stopping.phase() == stopping.Phase.TRAINING
        cli.slow_for_tests('eval')
    assert time.monotonic() - start < 5
    assert capsys.readouterr().err == ('warning: received signal 15: saving after this step '
                                       'and exiting\nslow for tests: eval:30\n')
    stopping.raise_if_interrupted()  # the next evaluation starts afresh (and stops at once)
    with pytest.raises(stopping.EvaluationStopped), stop.evaluation():
        pass


def test_the_supervisor_passes_signals_on_to_its_child(phases):
    sent = []
    stopping.forward_to(SimpleNamespace(send_signal=sent.append))
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGTERM)
    assert sent == [signal.SIGINT, signal.SIGTERM]
