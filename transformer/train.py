"""`python -m transformer.train --config=FILE:ARG --workdir=DIR [--config.x=y ...]`.

One linear script in sections: set-up, vocabulary and data, state, restore, the loop,
shutdown. The same command runs on one CPU, a multi-GPU host, a GPU cluster or a TPU pod
slice; it resumes by itself from the latest complete checkpoint in the work directory.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from transformer import (
    allocator,
    batching,
    checkpoint,
    checkpoint_info,
    cli,
    data,
    distributed,
    early_stopping,
    errors,
    evaluators,
    metrics,
    model_stats,
    plan,
    profiler,
    run_config,
    sharding,
    stopping,
    tfds_source,
)
from transformer import config as config_lib
from transformer import model as model_lib
from transformer import train_step as train_step_lib
from transformer import vocabulary as vocabulary_lib
from transformer import workdir as workdir_lib
from transformer.errors import RunError, UsageError

_CONFIG = cli.define_config_flag()
_WORKDIR = cli.define_workdir_flag('Work directory: config, vocabulary, checkpoints, '
                                   'metrics. Resumed when it holds checkpoints.')

PREFETCH_BATCHES = 2  # global batches the producer thread keeps ready on the devices


def _fault_injection(point: str, step: int = 0) -> None:
    """Test hook: TRANSFORMER_FAULT=POINT:STEP kills this process with SIGKILL there.

    POINT is 'after-step' (state in flight, nothing saved), 'in-save' (an asynchronous save
    started but not finished) or 'in-eval' (during the evaluation of STEP), or, with STEP 0, a
    point of the start-up: 'initialized' (just connected to the other processes) or
    'data-ready' (vocabulary and training data made).
    The tests use it to prove that a killed run resumes exactly, and that the other processes
    of a multi-process run stop with one line.
    """
    fault = os.environ.get('TRANSFORMER_FAULT')
    if fault and fault == f'{point}:{step}':
        os.kill(os.getpid(), signal.SIGKILL)


def prepare_data(config) -> None:
    """A TFDS dataset prepared before anything reads it: by this process in a single-process
    run (the same code as `python -m transformer.prepare`); a multi-process run must find it
    prepared on every process (preparing takes hours: not with a pod or cluster waiting)."""
    if config.data.source != 'tfds':
        return
    if jax.process_count() == 1:
        tfds_source.prepare(config.data, say=cli.say)
        return
    missing = not tfds_source.is_prepared(config.data)
    if distributed.agree(missing)[0]:
        where = tfds_source.builder(config.data).data_dir_root
        raise UsageError(f'{config.data.tfds_name} is not prepared in {where} on '
                         f'{"this" if missing else "another"} process: run python -m '
                         'transformer.prepare with this config once, into a data directory '
                         'every process reads (--config.data.tfds_data_dir), then launch again')


def vocabulary(config, workdir: str, fingerprint: str | None, steps: list[int]):
    """The run's vocabulary: trained by process 0 when absent, then read by every process;
    under checkpoints it must be the one they recorded (`fingerprint`)."""
    def get():
        return vocabulary_lib.load_or_train(config, workdir, lambda: data.vocab_text(config),
                                            fingerprint, steps)

    if distributed.is_main():
        tokenizer = get()
    distributed.sync('vocabulary ready')
    if not distributed.is_main():
        tokenizer = get()
    return tokenizer


def training_batches(config, workdir: str, tokenizer,
                     fingerprint: str) -> tuple[batching.TrainIterator, str | None]:
    """This process's training batches, from the tokenized training set (cached by process 0
    in the work directory, checked by it, then memory-mapped by every process), and the
    cache's content fingerprint (what a checkpoint's data position refers to)."""
    t = config.train
    cache = dict(cache_dir=workdir_lib.path(workdir, workdir_lib.CACHE_DIR),
                 vocab_fingerprint=fingerprint)
    if distributed.is_main():
        split = data.tokenized_train(config, tokenizer, **cache)
    distributed.sync('training data tokenized')
    if not distributed.is_main():
        split = data.tokenized_train(config, tokenizer, **cache, rebuild=False)
    return batching.TrainIterator(
        split, config.data, process_index=jax.process_index(),
        process_count=jax.process_count(),
        rows_multiple=jax.device_count() * t.grad_accum_steps // jax.process_count()
    ), split.fingerprint


def place(batch: dict, batch_sharding, config) -> tuple[dict, dict]:
    """A global batch put on the devices (this process's rows of it), and its host-side
    facts (`batch_stats`): what the producer thread hands to the loop."""
    arrays = {k: jax.make_array_from_process_local_data(batch_sharding, v)
              for k, v in batch.items()}
    return arrays, batch_stats(config, batch)


def batch_stats(config, batch: dict) -> dict:
    """Host-side facts of a global batch: its FLOPs and its real and total token slots."""
    rows = batch['inputs'].shape[0] * jax.process_count()
    flops = model_stats.training_flops(config.model, config.vocab_size, rows,
                                       batch['inputs'].shape[1], batch['targets'].shape[1])
    real = int((batch['inputs_segmentation'] > 0).sum() + (batch['targets_segmentation'] > 0).sum())
    return dict(flops=flops, real_tokens=real, slots=batch['inputs'].size + batch['targets'].size)


def check_finite(step: int, m: dict, manager, workdir: str) -> None:
    """A non-finite loss or gradient stops the run (nothing more is saved), unless float16's
    loss scaling skipped that step; a loss scale halved below its floor stops it too. The
    error names the last good checkpoint: the newest that `manager` saved or found."""
    if m.get('skipped'):
        if m['loss_scale'] / train_step_lib.LOSS_SCALE_FACTOR < train_step_lib.LOSS_SCALE_MIN:
            raise RunError(f'the float16 loss scale fell below {train_step_lib.LOSS_SCALE_MIN:g}'
                           f' at step {step} (the loss itself overflows float16); train with '
                           'model.dtype=bfloat16 or float32, or a lower learning rate')
        return
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        saved = manager.all_steps()
        kept = f'step {max(saved)}' if saved else 'none yet'
        raise RunError(f'non-finite loss ({m["loss"]}) at step {step}; last good '
                       f'checkpoint: {kept} in {workdir}')


# -- what the loop does when -------------------------------------------------------------------


def itstime(step: int, every: int, last_step: int) -> bool:
    """Every `every` steps, and at the last step."""
    return step % every == 0 or step == last_step


class Due(NamedTuple):
    """What is due after a step."""
    log: bool
    save: bool
    evaluate: tuple  # the evaluators due (evaluators.Evaluator)
    stop: bool


def what_is_due(step: int, t, votes: stopping.Votes, evals: list) -> Due:
    """The log, save, evaluation and stop decisions after `step`, in one place."""
    stop = votes.signalled or votes.out_of_time
    # The last step is evaluated too, unless a signal asks to be quick.
    ending = votes.out_of_time and not votes.signalled
    return Due(log=itstime(step, t.log_every_steps, t.steps) or stop,
               save=itstime(step, t.checkpoint_every_steps, t.steps) or votes.save_time or stop,
               evaluate=tuple(e for e in evals if itstime(step, e.every, t.steps) or ending),
               stop=stop)


def log_step(writer, progress, config, step: int, window: metrics.Window, m: dict,
             clocks: metrics.Clocks, peak: float | None) -> None:
    """The window's scalars and the clocks to the metrics file, the loss and speed to the
    progress bar (whose total follows a time bound)."""
    scalars = window.scalars(peak * jax.device_count() if peak else None)
    scalars.update(learning_rate=float(m['learning_rate']), grad_norm=float(m['grad_norm']))
    if 'loss_scale' in m:  # float16: the scale and the steps it skipped, in all
        scalars.update(loss_scale=float(m['loss_scale']),
                       skipped_steps=int(m['skipped_steps']))
    record = {f'train/{k}': v for k, v in scalars.items()}
    record.update({f'time/{name}_seconds': v for name, v in clocks.totals().items()})
    writer.write(step, record)
    update_total(progress, config, step, clocks.seconds(), 1.0 / max(scalars['step_time'], 1e-9))
    if progress is not None:
        progress.set_postfix(loss=f'{scalars["loss"]:.3f}',
                             tok_s=f'{scalars["tokens_per_second"]:.0f}', refresh=False)


def _clock_summary(clocks: metrics.Clocks) -> str:
    totals = clocks.totals()
    return ', '.join(f'{name} {totals[name]:.1f} s' for name in ('train',) + metrics.APART)


def open_run(config, workdir: str):
    """Takes the work directory (process 0 holds its lock, returned, for the whole run, and
    removes what a killed run left half-written), checks that the config may resume what is
    there, stores the config. Returns (checkpoint steps, the lock)."""
    lock, failed = None, None
    if distributed.is_main():
        try:
            lock = workdir_lib.lock(workdir)
        except UsageError as e:
            failed = e
    if distributed.agree(failed is not None)[0]:
        raise failed or UsageError(f'process 0 could not take the work directory {workdir}')
    if distributed.is_main():
        for stale in workdir_lib.remove_stale_files(workdir):
            errors.warn(f'removed {stale}, left half-written by a run that was killed')
    steps = checkpoint.steps_in(workdir)
    run_config.check_resumable(config, workdir)
    if distributed.is_main():
        run_config.save_config(config, workdir)
    return steps, lock


def progress_bar(config, step: int):
    """The console's progress bar: its total and ETA follow whichever bound comes first,
    train.steps or train.max_minutes (see `update_total`)."""
    return tqdm(total=config.train.steps, initial=step, desc='train', unit='step',
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)


def update_total(progress, config, step: int, seconds: float, steps_per_second: float) -> None:
    """With a time bound, the steps it leaves time for, if fewer than train.steps."""
    t = config.train
    if progress is None or t.max_minutes <= 0 or steps_per_second <= 0:
        return
    by_time = step + int(max(0.0, 60 * t.max_minutes - seconds) * steps_per_second)
    progress.total = max(step, min(t.steps, by_time))


def checked_resume(step: int, info: checkpoint_info.Info, workdir: str, vocab_sha256: str,
                   data_sha256: str | None) -> None:
    """Refuses to resume checkpoint `step` (its `info`) when it was trained with another
    vocabulary, or on other training data (e.g. the local training text was changed since:
    the data position would point elsewhere)."""
    if (info.vocab_sha256 or vocab_sha256) != vocab_sha256:
        raise UsageError(f'{workdir_lib.path(workdir, workdir_lib.VOCAB_MODEL)} is not the '
                         f'vocabulary checkpoint {step} was trained with')
    recorded = info.data_sha256
    if recorded and data_sha256 and recorded != data_sha256:
        raise UsageError(f'the training data tokenized in '
                         f'{workdir_lib.path(workdir, workdir_lib.CACHE_DIR)} (sha256 '
                         f'{data_sha256[:12]}...) is not what checkpoint {step} was trained '
                         f'on (sha256 {recorded[:12]}...): the training text changed since; '
                         'restore it, or use a new --workdir')


class Start(NamedTuple):
    """Where the loop starts: a checkpoint restored, or a new state."""
    step: int
    state: dict
    info: checkpoint_info.Info  # of the checkpoint (a new run: every field None)
    resumed: bool


def restore_or_initialize(config, setup: train_step_lib.Setup, manager, workdir: str,
                          train_iter: batching.TrainIterator, vocab_sha256: str,
                          data_sha256: str | None, mesh) -> Start:
    """The newest checkpoint that reads back whole (a broken one is moved aside by process
    0), checked against this run's vocabulary and training data, its data position set in
    `train_iter`; else a new state, created already sharded."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract_state, setup.state_shardings)
    broken = workdir_lib.path(workdir, workdir_lib.BROKEN_DIR)
    restored = checkpoint.restore_newest(manager, target,
                                         broken if distributed.is_main() else None)
    if restored is None:
        state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
        m = model_lib.resolved(config, mesh.devices.flat[0].platform).model
        cli.say(f'New run in {workdir}: {jax.device_count()} devices, mesh {dict(mesh.shape)}; '
                f'compute {m.dtype}, attention {m.attention_impl}, scan_layers {m.scan_layers}, '
                f'remat {m.remat}')
        return Start(int(state['step']), state, checkpoint_info.Info(), resumed=False)
    saved_step, state, data_state, stored = restored
    info = checkpoint_info.parse(stored)
    checked_resume(saved_step, info, workdir, vocab_sha256, data_sha256)
    train_iter.set_state(data_state)
    cli.say(f'Resumed from step {saved_step} of {workdir} (data position {data_state})')
    return Start(int(state['step']), state, info, resumed=True)


def early_stopping_tracker(t, start: Start, workdir: str) -> early_stopping.Tracker:
    """Early stopping's tracker: a resumed run goes on with the best so far and the
    evaluations since (best.json's record, or the checkpoint's)."""
    if not start.resumed:
        return early_stopping.Tracker(t.early_stop_metric, t.early_stop_patience)
    return early_stopping.resumed(t.early_stop_metric, t.early_stop_patience,
                                  start.info.early_stop, workdir_lib.read_best(workdir),
                                  start.step)


def say_allocator() -> None:
    """On a CPU, the memory allocator the process runs with."""
    if jax.default_backend() != 'cpu':
        return
    malloc = allocator.in_use()
    hint = '' if malloc == 'tcmalloc' else (
        ' (CPU steps run about 1.3x faster with tcmalloc: apt-get install '
        'libtcmalloc-minimal4)')
    cli.say(f'Memory allocator: {malloc}{hint}')


def save(saver: checkpoint.Saver, at: int, state, data_position: dict,
         run: checkpoint_info.Info, *, window: metrics.Window, clocks: metrics.Clocks,
         tracker: early_stopping.Tracker, agreement: stopping.Agreement) -> int:
    """Saves step `at` (asynchronously): the state, the data position after it, and the info:
    the run's (`run`: fingerprints, config) with the smoothed loss, the clocks and early
    stopping's record as they are now. Returns `at`, the newest save."""
    jax.block_until_ready(state)  # the steps' own time is training, not saving
    with clocks.apart('save'):
        info = run._replace(loss_smoothed=window.smoothed_loss, clocks=clocks.totals(),
                            early_stop=tracker.record())
        saver.save(at, state, data_position, info=checkpoint_info.record(info))
    agreement.saved()
    _fault_injection('in-save', at)
    return at


def evaluate(evals: tuple, at: int, state, *, stop_signal: stopping.StopSignal,
             clocks: metrics.Clocks, writer: metrics.MetricWriter) -> dict | None:
    """Runs the evaluators `evals` at step `at`, on the weights decoded later (the moving
    average when the run keeps one), says each result and writes them as one row; returns
    the row (prefix + key: value), or None when a stop signal cut the evaluation short."""
    jax.block_until_ready(state)
    params = state.get('ema', state['params'])
    row = {}
    with clocks.apart('eval'):
        try:
            with stop_signal.evaluation():
                cli.slow_for_tests('eval')
                _fault_injection('in-eval', at)
                for evaluator in evals:
                    stopping.raise_if_interrupted()  # a signal whose exception was lost
                    result = evaluator.run(params)
                    cli.say(evaluator.line(at, result))
                    row.update({evaluator.prefix + k: v for k, v in result.items()})
        except stopping.EvaluationStopped:
            cli.say(f'Evaluation of step {at} stopped by the signal')
            return None
    writer.write(at, row)
    return row


def track(tracker: early_stopping.Tracker, best_steps: set[int], at: int, row: dict) -> bool:
    """Early stopping after the evaluation of step `at` (its `row`), when it holds the
    validation metric followed: True when `at` is the best step so far, then the one kept
    beyond train.keep_checkpoints (`best_steps`, the checkpoint manager's protected set)."""
    validation = {k.removeprefix('eval/'): v for k, v in row.items() if k.startswith('eval/')}
    if config_lib.EARLY_STOP_METRICS[tracker.metric] not in validation:
        return False
    if not tracker.update(at, validation):
        return False
    best_steps.clear()
    best_steps.add(at)
    return True


def write_best(tracker: early_stopping.Tracker, saver: checkpoint.Saver,
               clocks: metrics.Clocks, workdir: str) -> None:
    """best.json, early stopping's record, once the checkpoints before it are committed: it
    names only a checkpoint that is there, and never runs ahead of the checkpoints (a
    resumed run takes it when it is the newest one's evaluation)."""
    with clocks.apart('save'):
        saver.wait()
    if distributed.is_main():
        workdir_lib.atomic_write(workdir_lib.path(workdir, workdir_lib.BEST_FILE),
                                 json.dumps(tracker.record()).encode(),
                                 'the early-stopping record')


def main():
    # --- set-up --------------------------------------------------------------------------------
    config = cli.checked_config(_CONFIG)
    t = config.train
    workdir = _WORKDIR.value
    workdir_lib.check_workdir(workdir, must_exist=False)
    distributed.initialize(t.peer_timeout_seconds)
    _fault_injection('initialized')
    is_main = distributed.is_main()
    mesh = sharding.make_mesh(t.mesh_data, t.mesh_fsdp)  # a bad mesh is refused before any work
    if t.early_stop_patience and t.early_stop_metric == 'bleu' and jax.process_count() > 1:
        raise UsageError('train.early_stop_metric=bleu: the in-training greedy BLEU is computed '
                         'by single-process runs only; use train.early_stop_metric=loss')
    batch_warning = plan.batch_warning(config, mesh.size)  # e.g. on a pod: every device a row
    if batch_warning:
        errors.warn(batch_warning)
    steps, lock = open_run(config, workdir)  # the lock is released when the process ends
    checkpoints = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR)

    # --- vocabulary and data -------------------------------------------------------------------
    prepare_data(config)
    recorded = vocabulary_lib.recorded_fingerprint(
        workdir, [checkpoint.read_info(checkpoints, steps[-1])] if steps else [])
    tokenizer = vocabulary(config, workdir, recorded, steps)
    fingerprint = vocabulary_lib.stored_fingerprint(workdir)
    train_iter, data_sha256 = training_batches(config, workdir, tokenizer, fingerprint)
    cli.say(f'Training data: {train_iter.stats}; tokenizer threads: {tokenizer.threads} (the '
            'CPU cores this process may use)')
    splits = evaluators.read_splits(config, tokenizer)  # what config.evals reads
    if t.early_stop_patience and ('eval/' + config_lib.EARLY_STOP_METRICS[t.early_stop_metric]
                                  not in evaluators.rows(config, splits)):
        raise UsageError('train.early_stop_patience needs a validation split: set '
                         'config.data.validation')
    _fault_injection('data-ready')

    # --- state, created already sharded --------------------------------------------------------
    setup = train_step_lib.setup(config, mesh)
    train_step = train_step_lib.jit_sharded_step(setup)
    eval_step = jax.jit(train_step_lib.make_eval_step(setup.graphdef),
                        out_shardings=setup.replicated)

    # --- restore or initialise -----------------------------------------------------------------
    best_steps: set[int] = set()  # early stopping's best checkpoint, kept beyond keep_checkpoints
    manager = checkpoint.make_manager(checkpoints, keep=t.keep_checkpoints, protected=best_steps)
    saver = checkpoint.Saver(manager)
    start = restore_or_initialize(config, setup, manager, workdir, train_iter, fingerprint,
                                  data_sha256, mesh)
    tracker = early_stopping_tracker(t, start, workdir)
    if tracker.best_step is not None:
        best_steps.add(tracker.best_step)
    if start.resumed:
        # A run killed between a save's commit and Orbax's clean-up after it keeps one more.
        pruned = checkpoint.keep_newest(manager, t.keep_checkpoints, best_steps)
        if pruned:
            cli.say(f'Deleted checkpoints {pruned}: train.keep_checkpoints={t.keep_checkpoints}')
    say_allocator()

    # --- the loop ------------------------------------------------------------------------------
    # Batches are made and put on the devices by a producer thread, a few steps ahead; a step's
    # metrics are fetched one step late (metrics.LateMetrics), so the host never makes the
    # device wait; processes agree on host-side decisions every train.sync_every_steps steps
    # (Agreement), and every process saves, evaluates and stops at the same steps (`due`).
    # Compilation, evaluation and saving are clocked apart from training (metrics.Clocks).
    clocks = metrics.Clocks(before=start.info.clocks)
    step_fn = train_step_lib.CompiledSteps(train_step, clocks.apart)
    batches = batching.Prefetcher(train_iter, PREFETCH_BATCHES, functools.partial(
        place, batch_sharding=setup.batch_sharding, config=config))
    writer = metrics.MetricWriter(workdir, start=start.step, enabled=is_main)
    stop_signal = stopping.StopSignal()
    agreement = stopping.Agreement(t, stop_signal, clocks)
    evals = evaluators.make(config, tokenizer, splits, setup.graphdef,
                            stop_signal.checked(eval_step), mesh)
    peak = model_stats.peak_flops()
    window = metrics.Window(smoothed_loss=start.info.loss_smoothed, clock=clocks.seconds)
    tracer = profiler.StepTracer(config_lib.profile_steps(t.profile_steps),
                                 workdir_lib.path(workdir, workdir_lib.PROFILE_DIR), is_main,
                                 clocks.apart)
    progress = progress_bar(config, start.step) if is_main else None
    late = metrics.LateMetrics(functools.partial(check_finite, manager=manager,
                                                 workdir=workdir))
    run_info = checkpoint_info.Info(vocab_sha256=fingerprint, data_sha256=data_sha256,
                                    config=run_config.config_record(config))
    state, step = start.state, start.step
    last_saved = start.step if start.resumed else None
    failing = True
    try:
        # A run killed while evaluating a step it had saved left no row for it: evaluate now.
        due = tuple(e for e in evals if itstime(step, e.every, t.steps)) if start.resumed else ()
        if due and distributed.agree(
                is_main and not all(writer.has_row(step, e.prefix) for e in due))[0]:
            cli.say(f'Evaluating step {step}, whose evaluation the last run did not finish')
            row = evaluate(due, step, state, stop_signal=stop_signal, clocks=clocks, writer=writer)
            if row is None:
                agreement.signalled = True
            elif t.early_stop_patience:
                track(tracker, best_steps, step, row)  # the step is saved
                write_best(tracker, saver, clocks, workdir)
        # Nothing to train when a time-bounded run has used its time already, a signal stopped
        # the evaluation above, or early stopping ended the run.
        last = start.step if (agreement.finished() or agreement.signalled
                              or tracker.exhausted) else t.steps
        for step in range(start.step + 1, last + 1):
            wait_start = time.perf_counter()
            (batch, stats), data_state = next(batches)  # data_state: the position after it
            window.add_batch(stats['flops'], stats['real_tokens'], stats['slots'],
                             time.perf_counter() - wait_start)
            with tracer.step(step):
                state, step_metrics = step_fn(state, batch)
            tracer.after(step, state)
            window.add_metrics(late.push(step, step_metrics))
            _fault_injection('after-step', step)
            if progress is not None:
                progress.update(1)
            saver.raise_if_failed()
            due = what_is_due(step, t, agreement(step), evals)
            if due.log or due.save:  # never save a state whose loss was not finite
                m = late.fetch()
                window.add_metrics(m)
                if due.log:
                    log_step(writer, progress, config, step, window, m, clocks, peak)
            if due.save:
                last_saved = save(saver, step, state, data_state, run_info, window=window,
                                  clocks=clocks, tracker=tracker, agreement=agreement)
            row, best = None, False
            if due.evaluate:
                row = evaluate(due.evaluate, step, state, stop_signal=stop_signal, clocks=clocks,
                               writer=writer)
                if row is None:
                    agreement.signalled = True
                elif t.early_stop_patience:
                    best = track(tracker, best_steps, step, row)
            # The one place that ends the loop early: a signal, the time bound, early stopping.
            # The step it ends at, and the best step found, are saved.
            stop = due.stop or agreement.signalled or tracker.exhausted
            if (stop or best) and last_saved != step:
                window.add_metrics(late.fetch())  # never save a state whose loss was not finite
                last_saved = save(saver, step, state, data_state, run_info, window=window,
                                  clocks=clocks, tracker=tracker, agreement=agreement)
            if row is not None and t.early_stop_patience:
                write_best(tracker, saver, clocks, workdir)
            if stop:
                break
        late.fetch()
        with clocks.apart('save'):
            saver.wait()
        failing = False
    finally:
        # --- shutdown --------------------------------------------------------------------------
        closers = [tracer.stop, batches.close, writer.close]
        errors.close_all(closers + ([progress.close] if progress is not None else []), failing)
    manager.close()
    del lock
    if agreement.signalled:
        cli.say(f'Stopped at step {step} after a signal; checkpoint saved.')
    elif tracker.exhausted:
        cli.say(f'Stopped at step {step}: {tracker.reason()}; checkpoint saved.')
    elif step < t.steps:
        cli.say(f'Stopped at step {step}: train.max_minutes={t.max_minutes:g} of training '
                'reached; checkpoint saved.')
    cli.say(f'Done at step {step}; checkpoints {manager.all_steps()} in {workdir} '
            f'({_clock_summary(clocks)})')


if __name__ == '__main__':
    cli.run(main)
