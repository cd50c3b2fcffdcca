"""`python -m transformer.train --config=FILE:ARG --workdir=DIR [--config.x=y ...]`.

One linear script in sections: set-up, data, state, restore, the loop, shutdown. The same
command runs on one CPU, a multi-GPU host, a GPU cluster or a TPU pod slice; it resumes by
itself from the latest complete checkpoint in the work directory.
"""

from __future__ import annotations

import glob
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from transformer import bleu, checkpoint, cli, data, decode, metrics, sharding
from transformer import evaluate as evaluate_lib
from transformer import tokenizer as tokenizer_lib
from transformer.model_stats import forward_flops
from transformer import train_step as train_step_lib

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory: config, vocabulary, '
                               'checkpoints, metrics. Resumed when it holds checkpoints.')

# Fields that may change between a run and its resumption: the run length, how often it logs,
# evaluates and checkpoints. Anything else would silently train a different model.
RESUMABLE_CHANGES = ('train.steps', 'train.log_every_steps', 'train.eval_every_steps',
                     'train.checkpoint_every_steps', 'train.checkpoint_every_minutes',
                     'train.eval_bleu_sentences')


def _fault_injection(point: str, step: int) -> None:
    """Test hook: TRANSFORMER_FAULT=POINT:STEP kills this process with SIGKILL there.

    POINT is 'after-step' (state in flight, nothing saved) or 'in-save' (an asynchronous save
    started but not finished). The tests use it to prove that a killed run resumes exactly.
    """
    fault = os.environ.get('TRANSFORMER_FAULT')
    if fault and fault == f'{point}:{step}':
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when the environment names a multi-process job.

    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (our launch scripts), or
    the cluster's own variables (SLURM, Cloud TPU pods), which JAX detects by itself.
    """
    # Collectives between CPU processes (tests, CPU clusters) go through gloo.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if 'JAX_COORDINATOR_ADDRESS' in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
            num_processes=int(os.environ.get('JAX_NUM_PROCESSES', '1')),
            process_id=int(os.environ.get('JAX_PROCESS_ID', '0')))
    elif (int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ
          or 'TPU_PROCESS_ADDRESSES' in os.environ or _on_cloud_tpu_vm()):
        jax.distributed.initialize()


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM has PCI devices of Google's vendor id 0x1ae0; JAX then finds the pod
    slice's other workers through the metadata server (harmless on a single host)."""
    for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
        try:
            with open(path) as f:
                if f.read().strip() == '0x1ae0':
                    return True
        except OSError:
            continue
    return False


def check_resumable(config, workdir: str) -> None:
    """Refuses a config that differs from the stored one in more than the run length.

    Only a work directory with a checkpoint holds a run; before the first checkpoint (e.g. a
    start that failed on a missing data file) the config may still be corrected.
    """
    if (not os.path.exists(os.path.join(workdir, cli.CONFIG_FILE))
            or not checkpoint.available_steps(workdir)):
        return
    stored = cli.load_workdir_config(workdir)
    differing = cli.config_differences(stored, config, ignore=RESUMABLE_CHANGES)
    if differing:
        raise cli.UsageError(f'{workdir} holds a run with another config; differing fields: '
                             f'{", ".join(differing)} (use a new --workdir)')


class StopSignal:
    """SIGTERM/SIGINT ask the loop to finish the step, save and exit 0 (preemption)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        logging.warning('Received signal %d: saving after this step and exiting.', signum)
        self.requested = True


def all_processes_agree(*conditions: bool) -> list[bool]:
    """Any-reduce of host-side decisions, so every process saves and stops together."""
    if jax.process_count() == 1:
        return list(conditions)
    votes = multihost_utils.process_allgather(np.array(conditions, np.int32))
    return [bool(v) for v in np.asarray(votes).reshape(-1, len(conditions)).max(axis=0)]


def validation_batches(config, tokenizer) -> list | None:
    """This process's validation batches, read and tokenized once per run (None if absent)."""
    try:
        return list(data.eval_batches(config, tokenizer, 'validation',
                                      config.data.eval_batch_sentences,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()))
    except data.DataError as e:
        logging.warning('No validation loss: %s', e)
        return None


def evaluate_loss(eval_fn, params, batches: list, mesh) -> dict:
    """Cross-entropy and per-token perplexity on the (unfiltered) validation split."""
    batch_sharding = sharding.batch_sharding(mesh)
    total = np.zeros(2)
    for batch in batches:
        arrays = {k: jax.make_array_from_process_local_data(batch_sharding, batch[k])
                  for k in ('inputs', 'targets')}
        total += np.asarray(eval_fn(params, arrays))
    nll = total[0] / max(total[1], 1.0)
    return {'nll': nll, 'perplexity': math.exp(min(nll, 50.0)), 'target_tokens': total[1]}


def validation_bleu(config, tokenizer, graphdef, params, sentences: int) -> float:
    """Greedy sacreBLEU on the first `sentences` validation sentences (a quick signal; the
    paper's beam search and checkpoint averaging belong to `evaluate`)."""
    model = nnx.merge(graphdef, params)
    batch = config.decode.batch_sentences
    decoder = decode.Decoder(model, beam_size=1, alpha=config.decode.length_penalty,
                             max_extra_length=config.decode.max_extra_length, batch_size=batch,
                             mesh=sharding.make_mesh(devices=jax.local_devices()))
    hypotheses, _ = evaluate_lib.translate_split(decoder, config, tokenizer, 'validation', batch,
                                                 limit=sentences)
    _, references = data.load_text(config, 'validation')
    ordered = [hypotheses[i] for i in sorted(hypotheses)]
    return bleu.sacrebleu_score(ordered, references[:len(ordered)])[0]


def main(argv):
    del argv
    # --- set-up -------------------------------------------------------------------------------
    config = cli.checked_config(_CONFIG)
    workdir = _WORKDIR.value
    if not workdir:
        raise cli.UsageError('--workdir is required')
    maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    check_resumable(config, workdir)
    if is_main:
        cli.save_config(config, workdir)
    t = config.train

    # --- vocabulary and data ------------------------------------------------------------------
    if is_main:
        tokenizer = tokenizer_lib.load_or_train(config, workdir)
    multihost_utils.sync_global_devices('vocabulary ready')
    if not is_main:
        tokenizer = tokenizer_lib.load_or_train(config, workdir)
    mesh = sharding.make_mesh(t.mesh_data, t.mesh_fsdp)
    rows_multiple = jax.device_count() * t.grad_accum_steps // jax.process_count()
    train_iter = data.make_train_iterator(
        config, tokenizer, process_index=jax.process_index(),
        process_count=jax.process_count(), rows_multiple=rows_multiple)

    cli.say(f'Training data: {train_iter.stats}')
    validation = validation_batches(config, tokenizer)

    # --- state, created already sharded --------------------------------------------------------
    setup = train_step_lib.setup(config, mesh)
    graphdef, state_shardings = setup.graphdef, setup.state_shardings
    batch_sharding, replicated = setup.batch_sharding, setup.replicated
    train_step = train_step_lib.jit_sharded_step(setup)
    eval_step = jax.jit(train_step_lib.make_eval_step(graphdef), out_shardings=replicated)

    # --- restore or initialise ---------------------------------------------------------------
    manager = checkpoint.make_manager(workdir, keep=t.keep_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              setup.abstract_state, state_shardings)
        state, data_state = checkpoint.restore(manager, latest, target)
        train_iter.set_state(data_state)
        cli.say(f'Resumed from step {latest} of {workdir} (data position {data_state})')
    else:
        state = jax.jit(setup.init_state, out_shardings=state_shardings)()
        cli.say(f'New run in {workdir}: {jax.device_count()} devices, mesh {dict(mesh.shape)}')
    start = int(state['step'])

    # --- the loop ------------------------------------------------------------------------------
    writer = metrics.MetricWriter(workdir, enabled=is_main)
    stop = StopSignal()
    peak = metrics.peak_flops()
    step_flops = lambda b: 3 * b['inputs'].shape[0] * jax.process_count() * forward_flops(
        config.model, config.vocab_size, b['inputs'].shape[1], b['targets'].shape[1])['total']
    progress = None
    if is_main:
        from tqdm import tqdm
        progress = tqdm(total=t.steps, initial=start, desc='train', unit='step',
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    window = {'time': time.time(), 'steps': 0, 'flops': 0.0, 'tokens': 0.0, 'real': 0.0,
              'slots': 0.0, 'loss': 0.0, 'nll': 0.0}
    smoothed_loss = None
    last_save_time = time.time()
    last_saved = latest
    pending = None  # (step, metrics) fetched one step late, so the host never stalls the device

    def check(step, m):
        nonlocal smoothed_loss
        m = jax.device_get(m)
        if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
            if progress is not None:
                progress.close()  # so that the error starts a line of its own
            kept = f'step {last_saved}' if last_saved is not None else 'none yet'
            raise cli.Abort(f'non-finite loss ({m["loss"]}) at step {step}; last good '
                            f'checkpoint: {kept} in {workdir}')
        smoothed_loss = m['loss'] if smoothed_loss is None else 0.98 * smoothed_loss + 0.02 * m['loss']
        for k in ('loss', 'nll'):
            window[k] += float(m[k])
        window['tokens'] += float(m['target_tokens'] + m['source_tokens'])
        return m

    def log(step, m):
        elapsed = time.time() - window['time']
        n = max(window['steps'], 1)
        scalars = {'loss': window['loss'] / n, 'loss_smoothed': smoothed_loss,
                   'nll': window['nll'] / n, 'perplexity': math.exp(min(window['nll'] / n, 50)),
                   'learning_rate': float(m['learning_rate']), 'grad_norm': float(m['grad_norm']),
                   'tokens_per_step': window['tokens'] / n,
                   'tokens_per_second': window['tokens'] / elapsed,
                   'step_time': elapsed / n,
                   'real_token_fraction': window['real'] / max(window['slots'], 1)}
        if peak:
            scalars['mfu'] = window['flops'] / elapsed / (peak * jax.device_count())
        writer.write(step, scalars, prefix='train/')
        if progress is not None:
            progress.set_postfix(loss=f'{scalars["loss"]:.3f}',
                                 tok_s=f'{scalars["tokens_per_second"]:.0f}', refresh=False)
        window.update(time=time.time(), steps=0, flops=0.0, tokens=0.0, real=0.0, slots=0.0,
                      loss=0.0, nll=0.0)

    def save(step):
        nonlocal last_save_time, last_saved
        checkpoint.save(manager, step, state, train_iter_state)
        last_save_time, last_saved = time.time(), step

    step = start
    train_iter_state = train_iter.get_state()
    while step < t.steps:
        batch = next(train_iter)
        train_iter_state = train_iter.get_state()  # the position after this batch
        window['flops'] += step_flops(batch)
        window['real'] += (batch['inputs_segmentation'] > 0).sum() + (batch['targets_segmentation'] > 0).sum()
        window['slots'] += batch['inputs'].size + batch['targets'].size
        global_batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                        for k, v in batch.items()}
        state, step_metrics = train_step(state, global_batch)
        if pending is not None:
            check(*pending)
        step += 1
        _fault_injection('after-step', step)
        window['steps'] += 1
        pending = (step, step_metrics)
        if progress is not None:
            progress.update(1)
        time_due = time.time() - last_save_time >= 60 * t.checkpoint_every_minutes
        stop_now, time_due = all_processes_agree(stop.requested, time_due)
        save_due = step % t.checkpoint_every_steps == 0 or time_due or step == t.steps or stop_now
        log_due = step % t.log_every_steps == 0 or step == t.steps
        if save_due or log_due:
            m = check(*pending)  # never save a state whose loss was not finite
            pending = None
            if log_due:
                log(step, m)
        if save_due:
            save(step)
            _fault_injection('in-save', step)
        if validation is not None and (step % t.eval_every_steps == 0 or step == t.steps):
            result = evaluate_loss(eval_step, state['params'], validation, mesh)
            if t.eval_bleu_sentences > 0 and jax.process_count() == 1:
                result['greedy_bleu'] = validation_bleu(config, tokenizer, graphdef,
                                                        state['params'], t.eval_bleu_sentences)
                cli.say(f'step {step} greedy BLEU on {t.eval_bleu_sentences} validation '
                        f'sentences: {result["greedy_bleu"]:.2f}')
            writer.write(step, result, prefix='eval/')
            cli.say(f'step {step} validation: nll {result["nll"]:.4f}, '
                    f'perplexity {result["perplexity"]:.3f}')
        if stop_now:
            cli.say(f'Stopped at step {step} after a signal; checkpoint saved.')
            break

    # --- shutdown -----------------------------------------------------------------------------
    if pending is not None:
        check(*pending)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if progress is not None:
        progress.close()
    cli.say(f'Done at step {step}; checkpoints {manager.all_steps()} in {workdir}')


if __name__ == '__main__':
    cli.run(main)
