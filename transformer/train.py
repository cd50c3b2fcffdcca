"""`python -m transformer.train --config=FILE:ARG --workdir=DIR [--config.x=y ...]`.

One linear script in sections: set-up, vocabulary and data, state, restore, the loop,
shutdown. The same command runs on one CPU, a multi-GPU host, a GPU cluster or a TPU pod
slice; it resumes by itself from the latest complete checkpoint in the work directory.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from transformer import (
    allocator,
    batching,
    bleu,
    checkpoint,
    cli,
    data,
    distributed,
    early_stopping,
    errors,
    host_decode,
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


class Validation(NamedTuple):
    split: batching.EncodedSplit  # read and tokenized once per run
    batches: list  # this process's loss batches of it


def validation_data(config, tokenizer) -> Validation | None:
    """The validation split, read and tokenized once per run, and this process's batches.

    None, with a warning, when local data has no validation split configured; a configured
    split that cannot be read stops the run before any training (DataError).
    """
    if config.data.source == 'local' and not config.data.validation:
        errors.warn('config.data.validation is not set: no validation loss')
        return None
    split = batching.encode_split(config, tokenizer, 'validation')
    return Validation(split, list(batching.eval_batches(
        split, config.data, config.data.eval_batch_sentences,
        process_index=jax.process_index(), process_count=jax.process_count())))


def validation_loss(eval_fn, params, batches: list, mesh) -> dict:
    """Cross-entropy and per-token perplexity on the (unfiltered) validation split."""
    batch_sharding = sharding.batch_sharding(mesh)
    total = np.zeros(2)
    for batch in batches:
        arrays = {k: jax.make_array_from_process_local_data(batch_sharding, batch[k])
                  for k in ('inputs', 'targets')}
        total += np.asarray(eval_fn(params, arrays))
    nll = total[0] / max(total[1], 1.0)
    return {'nll': nll, 'perplexity': math.exp(min(nll, 50.0)), 'target_tokens': total[1]}


def validation_bleu(config, tokenizer, graphdef, params, split: batching.EncodedSplit,
                    sentences: int) -> float:
    """Greedy sacreBLEU on the first `sentences` validation sentences (a quick signal; the
    paper's beam search and checkpoint averaging belong to `evaluate`): only those sentences
    are batched and decoded, from the split read once per run."""
    settings = host_decode.settings(config, beam_size=1)
    batch = config.decode.batch_sentences
    decoder = host_decode.make_decoder(nnx.merge(graphdef, params), config, settings, batch)
    hypotheses, _ = host_decode.translate_split(decoder, config, tokenizer, split, batch,
                                                limit=sentences)
    ordered = [hypotheses[i] for i in sorted(hypotheses)]
    return bleu.sacrebleu_score(ordered, split.references[:len(ordered)])[0]


def validation_metrics(config, tokenizer, graphdef, params, eval_step, validation, mesh,
                       step) -> dict:
    """The validation loss (and greedy BLEU when asked) at `step`, also said on the console."""
    result = validation_loss(eval_step, params, validation.batches, mesh)
    sentences = config.train.eval_bleu_sentences
    if sentences > 0 and jax.process_count() == 1:
        result['greedy_bleu'] = validation_bleu(config, tokenizer, graphdef, params,
                                                validation.split, sentences)
        cli.say(f'step {step} greedy BLEU on {sentences} validation sentences: '
                f'{result["greedy_bleu"]:.2f}')
    cli.say(f'step {step} validation: nll {result["nll"]:.4f}, '
            f'perplexity {result["perplexity"]:.3f}')
    return result


def batch_stats(config, batch: dict) -> dict:
    """Host-side facts of a global batch: its FLOPs and its real and total token slots."""
    rows = batch['inputs'].shape[0] * jax.process_count()
    flops = model_stats.training_flops(config.model, config.vocab_size, rows,
                                       batch['inputs'].shape[1], batch['targets'].shape[1])
    real = int((batch['inputs_segmentation'] > 0).sum() + (batch['targets_segmentation'] > 0).sum())
    return dict(flops=flops, real_tokens=real, slots=batch['inputs'].size + batch['targets'].size)


def check_finite(step: int, m: dict, last_saved: int | None, workdir: str) -> None:
    """A non-finite loss or gradient stops the run (nothing more is saved), unless float16's
    loss scaling skipped that step; a loss scale halved below its floor stops it too."""
    if m.get('skipped'):
        if m['loss_scale'] / train_step_lib.LOSS_SCALE_FACTOR < train_step_lib.LOSS_SCALE_MIN:
            raise RunError(f'the float16 loss scale fell below {train_step_lib.LOSS_SCALE_MIN:g}'
                           f' at step {step} (the loss itself overflows float16); train with '
                           'model.dtype=bfloat16 or float32, or a lower learning rate')
        return
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        kept = f'step {last_saved}' if last_saved is not None else 'none yet'
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
    evaluate: bool
    stop: bool


def what_is_due(step: int, t, votes: stopping.Votes) -> Due:
    """The log, save, evaluation and stop decisions after `step`, in one place."""
    stop = votes.signalled or votes.out_of_time
    return Due(log=itstime(step, t.log_every_steps, t.steps) or stop,
               save=itstime(step, t.checkpoint_every_steps, t.steps) or votes.save_time or stop,
               # The last step is evaluated too, unless a signal asks to be quick.
               evaluate=(itstime(step, t.eval_every_steps, t.steps)
                         or (votes.out_of_time and not votes.signalled)),
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


def checked_resume(restored, workdir: str, vocab_sha256: str, data_sha256: str | None) -> None:
    """Refuses to resume checkpoints trained with another vocabulary, or on other training data
    (e.g. the local training text was changed since: the data position would point elsewhere)."""
    saved_step, _, _, run_info = restored
    if run_info.get('vocab_sha256', vocab_sha256) != vocab_sha256:
        raise UsageError(f'{workdir_lib.path(workdir, workdir_lib.VOCAB_MODEL)} is not the '
                         f'vocabulary checkpoint {saved_step} was trained with')
    recorded = run_info.get('data_sha256')
    if recorded and data_sha256 and recorded != data_sha256:
        raise UsageError(f'the training data tokenized in '
                         f'{workdir_lib.path(workdir, workdir_lib.CACHE_DIR)} (sha256 '
                         f'{data_sha256[:12]}...) is not what checkpoint {saved_step} was trained '
                         f'on (sha256 {recorded[:12]}...): the training text changed since; '
                         'restore it, or use a new --workdir')


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
    validation = validation_data(config, tokenizer)
    if t.early_stop_patience and validation is None:
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
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract_state, setup.state_shardings)
    restored = checkpoint.restore_newest(
        manager, target, workdir_lib.path(workdir, workdir_lib.BROKEN_DIR) if is_main else None)
    if restored is not None:
        checked_resume(restored, workdir, fingerprint, data_sha256)
        saved_step, state, data_state, run_info = restored
        train_iter.set_state(data_state)
        cli.say(f'Resumed from step {saved_step} of {workdir} (data position {data_state})')
        tracker = early_stopping.resumed(t.early_stop_metric, t.early_stop_patience, run_info,
                                         workdir_lib.read_best(workdir), saved_step)
        if tracker.best_step is not None:
            best_steps.add(tracker.best_step)
        # A run killed between a save's commit and Orbax's clean-up after it keeps one more.
        pruned = checkpoint.keep_newest(manager, t.keep_checkpoints, best_steps)
        if pruned:
            cli.say(f'Deleted checkpoints {pruned}: train.keep_checkpoints={t.keep_checkpoints}')
    else:
        run_info = {}
        tracker = early_stopping.Tracker(t.early_stop_metric, t.early_stop_patience)
        state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
        m = model_lib.resolved(config, mesh.devices.flat[0].platform).model
        cli.say(f'New run in {workdir}: {jax.device_count()} devices, mesh {dict(mesh.shape)}; '
                f'compute {m.dtype}, attention {m.attention_impl}, scan_layers {m.scan_layers}, '
                f'remat {m.remat}')
    if jax.default_backend() == 'cpu':
        malloc = allocator.in_use()
        hint = '' if malloc == 'tcmalloc' else (
            ' (CPU steps run about 1.3x faster with tcmalloc: apt-get install '
            'libtcmalloc-minimal4)')
        cli.say(f'Memory allocator: {malloc}{hint}')
    step = int(state['step'])

    # --- the loop ------------------------------------------------------------------------------
    # Batches are made and put on the devices by a producer thread, a few steps ahead; a step's
    # metrics are fetched one step late (metrics.LateMetrics), so the host never makes the
    # device wait; processes agree on host-side decisions every train.sync_every_steps steps
    # (Agreement), and every process saves, evaluates and stops at the same steps (`due`).
    # Compilation, evaluation and saving are clocked apart from training (metrics.Clocks).
    def place(batch):
        arrays = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
                  for k, v in batch.items()}
        return arrays, batch_stats(config, batch)

    clocks = metrics.Clocks(before=run_info.get('clocks') or
                            {'train': run_info.get('train_seconds', 0.0)})
    step_fn = train_step_lib.CompiledSteps(train_step, clocks.apart)
    batches = batching.Prefetcher(train_iter, PREFETCH_BATCHES, place)
    writer = metrics.MetricWriter(workdir, start=step, enabled=is_main)
    stop_signal = stopping.StopSignal()
    agreement = stopping.Agreement(t, stop_signal, clocks)
    peak = model_stats.peak_flops()
    window = metrics.Window(smoothed_loss=run_info.get('loss_smoothed'), clock=clocks.seconds)
    tracer = profiler.StepTracer(config_lib.profile_steps(t.profile_steps),
                                 workdir_lib.path(workdir, workdir_lib.PROFILE_DIR), is_main,
                                 clocks.apart)
    progress = progress_bar(config, step) if is_main else None
    last_saved = restored[0] if restored is not None else None
    late = metrics.LateMetrics(lambda at, m: check_finite(at, m, last_saved, workdir))

    def save(at: int, data_position: dict) -> None:
        nonlocal last_saved
        jax.block_until_ready(state)  # the steps' own time is training, not saving
        with clocks.apart('save'):
            totals = clocks.totals()
            saver.save(at, state, data_position, info={
                'vocab_sha256': fingerprint, 'data_sha256': data_sha256,
                'config': run_config.config_record(config),
                'loss_smoothed': window.smoothed_loss, 'train_seconds': totals['train'],
                'clocks': totals, 'early_stop': tracker.record()})
        agreement.saved()
        last_saved = at
        _fault_injection('in-save', at)

    def evaluate_at(at: int) -> bool:
        """Evaluates at step `at`, writes the row and tells early stopping; False when a stop
        signal cut it short."""
        jax.block_until_ready(state)
        with clocks.apart('eval'):
            try:
                with stop_signal.evaluation():
                    cli.slow_for_tests('eval')
                    _fault_injection('in-eval', at)
                    # The moving average when the run keeps one: the weights decoded later.
                    result = validation_metrics(config, tokenizer, setup.graphdef,
                                                state.get('ema', state['params']),
                                                stop_signal.checked(eval_step), validation,
                                                mesh, at)
            except stopping.EvaluationStopped:
                cli.say(f'Evaluation of step {at} stopped by the signal')
                return False
        writer.write(at, result, prefix='eval/')
        if t.early_stop_patience:
            track(at, result)
        return True

    def track(at: int, result: dict) -> None:
        """Early stopping's bookkeeping after the evaluation of step `at`: the best step kept
        (saved now if this step was not), the record in best.json."""
        if tracker.update(at, result):
            best_steps.clear()
            best_steps.add(at)
            if last_saved != at:
                window.add_metrics(late.fetch())  # never save a state whose loss was not finite
                save(at, data_state)
        # best.json names only a checkpoint that is there, and never runs ahead of the
        # checkpoints (a resumed run takes it when it is the newest one's evaluation).
        with clocks.apart('save'):
            saver.wait()
        if is_main:
            workdir_lib.atomic_write(workdir_lib.path(workdir, workdir_lib.BEST_FILE),
                                     json.dumps(tracker.record()).encode(),
                                     'the early-stopping record')

    # a time-bounded run already done, or one that early stopping ended
    stop = agreement.finished() or tracker.exhausted
    data_state = None  # the position after the newest step (a save needs it)
    failing = True
    try:
        # A run killed while evaluating a step it had saved left no row for it: evaluate now.
        if (restored is not None and validation is not None
                and itstime(step, t.eval_every_steps, t.steps)
                and distributed.agree(is_main and not writer.has_row(step, 'eval/'))[0]):
            cli.say(f'Evaluating step {step}, whose evaluation the last run did not finish')
            if not evaluate_at(step):
                agreement.signalled = stop = True
            stop = stop or tracker.exhausted
        while step < t.steps and not stop:
            wait_start = time.perf_counter()
            (batch, stats), data_state = next(batches)
            window.add_batch(stats['flops'], stats['real_tokens'], stats['slots'],
                             time.perf_counter() - wait_start)
            with tracer.step(step + 1):
                state, step_metrics = step_fn(state, batch)
            step += 1
            tracer.after(step, state)
            window.add_metrics(late.push(step, step_metrics))
            _fault_injection('after-step', step)
            if progress is not None:
                progress.update(1)
            saver.raise_if_failed()
            due = what_is_due(step, t, agreement(step))
            stop = due.stop
            if due.log or due.save:  # never save a state whose loss was not finite
                m = late.fetch()
                window.add_metrics(m)
                if due.log:
                    log_step(writer, progress, config, step, window, m, clocks, peak)
            if due.save:
                save(step, data_state)
            if due.evaluate and validation is not None and not evaluate_at(step):
                agreement.signalled = stop = True
                if not due.save:
                    save(step, data_state)
            elif tracker.exhausted and not stop:
                stop = True
                if last_saved != step:
                    window.add_metrics(late.fetch())
                    save(step, data_state)
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
