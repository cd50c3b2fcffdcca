"""`python -m transformer.train`: exact resume after kill -9, SIGTERM, devices, processes."""

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    REPO,
    free_port,
    program_env,
    run_train,
    tiny_config,
    train_command,
    two_process_env,
)
from flax import nnx

from transformer import (
    checkpoint,
    checkpoint_info,
    cli,
    event_file,
    metrics,
    run_config,
    saved_runs,
    sharding,
)
from transformer import train_step as train_step_lib
from transformer import workdir as workdir_lib
from transformer.schedule import learning_rate


def final_params(workdir, raw_weights=False):
    model, _, _, steps = saved_runs.load_model(str(workdir), average=1, raw_weights=raw_weights)
    return steps[-1], [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def newest_state(workdir):
    """The training state of the newest checkpoint, read back as train restores it."""
    config = run_config.load_config(str(workdir))
    setup = train_step_lib.setup(config, sharding.make_mesh(devices=jax.devices()[:1]))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract_state, setup.state_shardings)
    manager = checkpoint.make_manager(str(workdir / 'checkpoints'), keep=10, asynchronous=False)
    try:
        return checkpoint.restore_newest(manager, target, None)[1]
    finally:
        manager.close()


def losses(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


@pytest.fixture(scope='module')
def reference(repo_root, tmp_path_factory):
    """The uninterrupted run that every resumed run must reproduce bitwise."""
    workdir = tmp_path_factory.mktemp('uninterrupted')
    run_train(workdir)
    return workdir


# The training features of issue 26 at once: a moving average of the weights, float16 with
# dynamic loss scaling (doubling every 3 steps, so the scale changes within the run) and
# early stopping after 2 evaluations without a lower validation loss, evaluating every 2
# steps, keeping 1 checkpoint. The learning rate is tiny, so that the validation loss moves
# only by rounding and early stopping ends the run (at step 8 on 2026-12-03, best step 4).
FEATURES = ['--config.train.ema_decay=0.9', '--config.model.dtype=float16',
            '--config.train.loss_scale_period=3', '--config.train.early_stop_patience=2',
            '--config.train.eval_every_steps=2', '--config.train.keep_checkpoints=1',
            '--config.decode.average_last=1', '--config.train.learning_rate_scale=1e-30']


@pytest.fixture(scope='module')
def features_reference(repo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('features')
    run_train(workdir, *FEATURES)
    return workdir


def test_learning_rate_schedule_of_section_5_3():
    # Linear warm-up to the peak at step 4000, then inverse square root decay.
    peak = 512 ** -0.5 * 4000 ** -0.5
    assert float(learning_rate(4000, 512, 4000)) == pytest.approx(peak, rel=1e-6)
    assert float(learning_rate(1000, 512, 4000)) == pytest.approx(peak / 4, rel=1e-6)
    assert float(learning_rate(16000, 512, 4000)) == pytest.approx(peak / 2, rel=1e-6)


@pytest.mark.parametrize('fault', ['after-step:10', 'in-save:8'])
def test_resume_after_kill_9_equals_uninterrupted(repo_root, tmp_path, reference, fault):
    workdir = tmp_path / 'run'
    killed = run_train(workdir, env=program_env(TRANSFORMER_FAULT=fault), check=False)
    assert killed.returncode == -signal.SIGKILL
    complete = checkpoint.steps_in(str(workdir))
    entries = os.listdir(workdir / 'checkpoints')
    # Whatever the asynchronous saves had done at the kill, a step counts only when complete:
    # a step directory under its own name is complete, anything else of it is not counted.
    assert sorted(int(e) for e in entries if e.isdigit()) == complete
    assert set(complete) <= {4, 8}
    if fault == 'in-save:8' and 8 not in complete:
        assert complete == [4]  # the save of step 8 was cut short and is not taken
    resumed = run_train(workdir)
    expected = f'Resumed from step {max(complete)}' if complete else 'New run'
    assert expected in resumed.stderr
    # Each step appears once in the metrics, and the smoothed loss went on where it was.
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    train_steps = [r['step'] for r in records if 'train/loss' in r]
    assert train_steps == list(range(1, 13))
    smoothed = {r['step']: r['train/loss_smoothed'] for r in records if 'train/loss' in r}
    with open(reference / 'metrics.jsonl') as f:
        want = {r['step']: r['train/loss_smoothed'] for r in map(json.loads, f)
                if 'train/loss' in r}
    assert smoothed[12] == pytest.approx(want[12], rel=1e-6)
    step, params = final_params(workdir)
    ref_step, ref_params = final_params(reference)
    assert step == ref_step == 12
    for a, b in zip(params, ref_params):
        np.testing.assert_array_equal(a, b)  # bitwise


def test_ema_loss_scale_and_early_stopping_resume_exactly_after_kill_9(tmp_path,
                                                                        features_reference):
    """Killed between the evaluations of steps 4 and 6, after checkpoint 4 and the evaluation
    of step 4: the resumed run remembers the best loss and the evaluations since it (from
    best.json: checkpoint 4's info predates its evaluation) and stops where the uninterrupted
    run stopped, with the same moving average, loss scale and best checkpoint, bitwise."""
    workdir = tmp_path / 'run'
    killed = run_train(workdir, *FEATURES, env=program_env(TRANSFORMER_FAULT='after-step:5'),
                       check=False)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(workdir, *FEATURES)
    assert 'Resumed from step 4' in resumed.stderr
    record = json.loads((workdir / 'best.json').read_text())
    assert record == json.loads((features_reference / 'best.json').read_text())
    stopped = [line for line in resumed.stderr.splitlines() if line.startswith('Stopped at')]
    assert stopped == [f'Stopped at step {record["step"]}: validation cross-entropy has not '
                       'improved for 2 evaluation(s) (train.early_stop_patience=2); best '
                       f'{record["best_value"]:.4f} at step {record["best_step"]}; checkpoint '
                       'saved.'], resumed.stderr
    assert record['step'] < 12  # stopped early
    # The best checkpoint is kept beside the last one (train.keep_checkpoints=1).
    steps = checkpoint.steps_in(str(workdir))
    assert steps == checkpoint.steps_in(str(features_reference))
    assert steps == sorted({record['best_step'], record['step']})
    state, want = newest_state(workdir), newest_state(features_reference)
    assert set(state) == {'params', 'opt_state', 'step', 'rng', 'ema', 'loss_scale'}
    assert float(state['loss_scale']['scale']) > 2 ** 7  # doubled since the start
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    # --step=best and DIR:best read the best checkpoint; the moving average by default.
    members, _ = cli.models_to_load(None, f'{workdir}:best,{workdir}:{record["step"]}', None)
    assert [m.step for m in members] == ['best', record['step']]
    _, _, _, used = saved_runs.load_model(str(workdir), step='best')
    assert used == [record['best_step']]
    ema, raw = final_params(workdir)[1], final_params(workdir, raw_weights=True)[1]
    assert any(not np.array_equal(a, b) for a, b in zip(ema, raw))


@pytest.fixture
def float16_step(monkeypatch):
    """A tiny float16 model's jitted training step, on a loss 1e-9 times the true one: a
    model close to convergence, whose gradients underflow float16 (smallest subnormal 6e-8)
    unless the loss is scaled. Returns (step, state, batch)."""
    true_loss = train_step_lib.cross_entropy
    monkeypatch.setattr(train_step_lib, 'cross_entropy', lambda *a: (
        lambda smoothed, nll, count: (smoothed * 1e-9, nll * 1e-9, count))(*true_loss(*a)))
    config = tiny_config(dtype='float16')
    setup = train_step_lib.setup(config, sharding.make_mesh(devices=jax.devices()[:1]))
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    tokens = np.random.default_rng(0).integers(3, 40, (8, 8)).astype(np.int32)
    position = np.tile(np.arange(8, dtype=np.int32), (8, 1))
    batch = dict(inputs=tokens, targets=tokens, inputs_segmentation=np.ones_like(tokens),
                 targets_segmentation=np.ones_like(tokens), inputs_position=position,
                 targets_position=position)
    return jax.jit(setup.step_fn), state, batch


def with_scale(state, scale):
    return dict(state, loss_scale=dict(state['loss_scale'], scale=jnp.float32(scale)))


def moved(new, old):
    return [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new['params']),
                                                      jax.tree.leaves(old['params']))]


def test_float16_loss_scaling_keeps_small_gradients_and_skips_overflows(float16_step):
    step, state, batch = float16_step
    # Unscaled (a scale of 1), every gradient underflows to zero: nothing moves.
    unscaled, m = step(with_scale(state, 1.0), batch)
    assert not any(moved(unscaled, state)) and float(m['grad_norm']) == 0.0
    # Scaled by 2**15, every parameter moves; the gradient is the true one (whose norm is
    # 2.13 on the unscaled loss) times 1e-9.
    scaled, m = step(with_scale(state, 2.0 ** 15), batch)
    assert all(moved(scaled, state)) and float(m['skipped']) == 0
    assert float(m['grad_norm']) == pytest.approx(2.13e-9, rel=0.02)
    assert float(scaled['loss_scale']['scale']) == 2.0 ** 15  # grows after 2000 such steps
    assert int(scaled['loss_scale']['good_steps']) == 1
    # An overflow skips the step and halves the scale (the same compiled step).
    huge = 2.0 ** 126  # the scaled gradients overflow float16 (largest finite 65504)
    skipped, m = step(with_scale(state, huge), batch)
    assert float(m['skipped']) == 1 and int(m['skipped_steps']) == 1
    assert float(skipped['loss_scale']['scale']) == huge / 2
    for a, b in zip(jax.tree.leaves((skipped['params'], skipped['opt_state'])),
                    jax.tree.leaves((state['params'], state['opt_state']))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(skipped['step']) == 1  # a step taken (its batch consumed), not an update
    # Doubling after train.loss_scale_period finite steps in a row.
    scale = {'scale': jnp.float32(8.0), 'good_steps': jnp.int32(1),
             'skipped': jnp.int32(0)}
    assert float(train_step_lib.next_loss_scale(scale, jnp.bool_(True), 2)['scale']) == 16.0
    assert float(train_step_lib.next_loss_scale(scale, jnp.bool_(True), 3)['scale']) == 8.0


@pytest.mark.parametrize('processes', [1, 2])
def test_sigterm_saves_and_exits_cleanly(repo_root, tmp_path, processes):
    """With two processes only the second gets the signal: agreeing every
    train.sync_every_steps steps, both save the same step and exit 0."""
    workdir, port = tmp_path / 'run', free_port()
    cmd = train_command(workdir, '--config.train.steps=100000',
                        '--config.train.checkpoint_every_steps=100000',
                        '--config.train.sync_every_steps=3')
    envs = [program_env()] if processes == 1 else [two_process_env(port, i) for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=repo_root, env=env, stderr=subprocess.PIPE, text=True)
             for env in envs]
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training runs
        if os.path.exists(workdir / 'metrics.jsonl') and len(losses(workdir)) >= 3:
            break
        time.sleep(0.2)
    procs[-1].send_signal(signal.SIGTERM)
    stopped = set()
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        stopped |= {line for line in stderr.replace('\r', '\n').splitlines()
                    if line.startswith('Stopped at step')}
    steps = checkpoint.steps_in(str(workdir))
    assert len(steps) == 1 and steps[0] >= 3
    assert stopped == {f'Stopped at step {steps[0]} after a signal; checkpoint saved.'}
    if processes == 2:
        assert steps[0] % 3 == 0  # the processes agree every third step


def test_8_devices_equal_1_device_with_gradient_accumulation(repo_root, tmp_path):
    # The same global batches: 8 devices, or 1 device accumulating 8 micro-batches.
    common = ['--config.model.dropout_rate=0.0', '--config.train.steps=6']
    run_train(tmp_path / 'eight', *common, env=program_env(devices=8))
    run_train(tmp_path / 'one', *common, '--config.train.grad_accum_steps=8',
              env=program_env(devices=1))
    eight, one = losses(tmp_path / 'eight'), losses(tmp_path / 'one')
    assert sorted(eight) == sorted(one) == list(range(1, 7))
    # Adam (eps 1e-9) amplifies float rounding.
    np.testing.assert_allclose([eight[s] for s in eight], [one[s] for s in eight], rtol=1e-4)


def test_two_processes_agree_with_one(repo_root, tmp_path):
    common = ['--config.model.dropout_rate=0.0', '--config.train.steps=5']
    port = free_port()
    workdir = tmp_path / 'two'
    cmd = train_command(workdir, *common)
    procs = [subprocess.Popen(cmd, cwd=repo_root, stderr=subprocess.PIPE, text=True,
                              env=two_process_env(port, i)) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    run_train(tmp_path / 'one', *common, env=program_env(devices=2))
    two, one = losses(workdir), losses(tmp_path / 'one')
    assert sorted(two) == sorted(one) == list(range(1, 6))
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in two], rtol=1e-4)


def test_non_finite_loss_stops_with_the_step(repo_root, tmp_path):
    r = run_train(tmp_path / 'run', '--config.train.learning_rate_scale=1e30',
                  check=False)
    assert r.returncode == 1
    error = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert len(error) == 1 and 'non-finite loss' in error[0] and 'at step' in error[0], r.stderr


def test_changed_config_is_refused_with_the_fields(repo_root, tmp_path, reference):
    r = run_train(reference, '--config.model.d_ff=48', '--config.train.seed=7',
                  check=False)
    assert r.returncode == 2
    assert 'differing fields: model.d_ff, train.seed' in r.stderr


def test_demo_task_reaches_a_low_loss(repo_root, tmp_path):
    workdir = tmp_path / 'demo'
    run_train(workdir, '--config.train.steps=300',
              '--config.train.log_every_steps=50', '--config.train.checkpoint_every_steps=300',
              '--config.train.eval_every_steps=300', '--config.data.batch_tokens=2048',
              '--config.train.eval_bleu_sentences=0', config='configs/demo.py')
    with open(workdir / 'metrics.jsonl') as f:
        evals = [json.loads(line) for line in f if 'eval/nll' in line]
    # Uniform guessing over the 256-piece vocabulary would be ln 256 = 5.5 nats.
    assert evals[-1]['eval/nll'] < 1.5, evals  # measured: 1.19 at step 300 (0.09 at 1500)


def test_a_start_that_failed_on_bad_data_can_be_corrected(repo_root, tmp_path):
    workdir = tmp_path / 'run'
    missing = tmp_path / 'nowhere' / 'train'
    r = run_train(workdir, f'--config.data.train={missing}',
                  config='configs/local.py:base,runlocal', check=False)
    assert r.returncode == 2
    error = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert error == [f'error: missing file {missing}.en'], r.stderr
    # Nothing was trained, so the work directory takes the corrected command.
    run_train(workdir, '--config.train.steps=4')
    assert checkpoint.steps_in(str(workdir)) == [4]


def test_clocks_leave_evaluation_out_and_a_trace_is_written(repo_root, tmp_path):
    """Evaluation made 2 s slower, six times: training time, step time and the time bound
    count training steps only; evaluation, saving and compilation have clocks of their own.
    The same run traces steps 3 to 5 with jax.profiler."""
    workdir = tmp_path / 'run'
    run_train(workdir, '--config.train.eval_every_steps=2', '--config.train.profile_steps=2:5',
              env=program_env(TRANSFORMER_SLOW='eval:2'))
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    last = [r for r in records if 'train/loss' in r][-1]
    # Five of the six come before the last row (the sixth follows step 12's).
    assert last['step'] == 12 and last['time/eval_seconds'] >= 10
    assert last['time/train_seconds'] < last['time/eval_seconds'] / 2
    assert last['time/compile_seconds'] > 0 and last['time/save_seconds'] > 0
    # No window's step time holds an evaluation (each is 2 s; a tiny step takes milliseconds).
    assert max(r['train/step_time'] for r in records if 'train/step_time' in r) < 1.0
    # The checkpoint carries the clocks a time-bounded resume goes on from.
    info = checkpoint.read_info(str(workdir / 'checkpoints'), 12)
    assert info['train_seconds'] == pytest.approx(info['clocks']['train'])
    assert info['clocks']['eval'] >= 10  # the last evaluation comes after the last save
    traces = list((workdir / 'profile').rglob('*.xplane.pb'))
    assert traces and traces[0].stat().st_size > 0


def test_evaluators_are_config_entries(tmp_path):
    """A beam-4 BLEU every 2 steps (the default BLEU entry, changed on the command line), a
    loss on the test split and a loss on other parallel text, a second validation set (entries
    added by a config file): their rows and lines."""
    (tmp_path / 'second.src').write_text('a b c\nd e\n')
    (tmp_path / 'second.tgt').write_text('c b a\ne d\n')
    config_file = tmp_path / 'evals.py'
    config_file.write_text(
        'from transformer import config as config_lib\n\n\n'
        'def get_config(arg=None):\n'
        f'    c = config_lib.load_file({str(REPO / "configs" / "demo.py")!r} + ":runlocal")\n'
        "    c.evals.news = dict(type='loss', split='test')\n"
        f"    c.evals.second = dict(type='loss', files={str(tmp_path / 'second')!r})\n"
        '    return c\n')
    workdir = tmp_path / 'run'
    r = run_train(workdir, '--config.train.steps=4', '--config.evals.bleu.beam_size=4',
                  '--config.evals.bleu.sentences=4', '--config.evals.bleu.every=2',
                  config=str(config_file))
    rows = {r['step']: set(r) - {'step', 'time'} for r in map(
        json.loads, (workdir / 'metrics.jsonl').read_text().splitlines()) if 'train/loss' not in r}
    assert rows == {2: {'eval/beam4_bleu'},
                    4: {'eval/beam4_bleu', 'eval/nll', 'eval/perplexity', 'eval/target_tokens',
                        'test/nll', 'test/perplexity', 'test/target_tokens',
                        'second/nll', 'second/perplexity', 'second/target_tokens'}}
    lines = [x for x in r.stderr.replace('\r', '\n').splitlines() if x.startswith('step ')]
    assert [x.split(':')[0] for x in lines] == [
        'step 2 beam-4 BLEU on 4 validation sentences', 'step 4 beam-4 BLEU on 4 validation '
        'sentences', 'step 4 validation', 'step 4 test', 'step 4 second'], r.stderr


def test_a_checkpoint_info_of_an_earlier_version_reads_back():
    """Before the clocks, a checkpoint held the training time alone; fields it lacks are None."""
    info = checkpoint_info.parse({'vocab_sha256': 'abc', 'train_seconds': 12.5})
    assert info.vocab_sha256 == 'abc' and info.clocks == {'train': 12.5}
    assert info.train_seconds == 12.5 and info.early_stop is None and info.config is None
    stored = checkpoint_info.record(info._replace(clocks={'train': 3.0, 'eval': 1.0}))
    assert stored['train_seconds'] == 3.0 and checkpoint_info.parse(stored).clocks['eval'] == 1.0
    assert checkpoint_info.parse({}) == checkpoint_info.Info()


def test_tensorboard_events_are_what_tensorboardx_wrote(tmp_path):
    """event_file.py writes the bytes tensorboardX's record writer and protocol buffers wrote
    before it; the frames' checksums agree with tensorboardX's own CRC-32C."""
    from tensorboardX.crc32c import crc32c as their_crc32c
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar

    def masked(crc):
        return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    assert event_file.crc32c(b'123456789') == 0xE3069283  # CRC-32C's published check value
    writer = metrics.MetricWriter(str(tmp_path), start=3)
    writer.write(4, {'loss': 2.5, 'zero': 0.0, 'tiny': -1e-30, 'huge': 1e39}, prefix='train/')
    writer.write(2**40, {'bleu': 27.3}, prefix='eval/')
    writer.close()
    [path] = (tmp_path / workdir_lib.TENSORBOARD_DIR).iterdir()
    data = written = path.read_bytes()
    events = []
    while data:
        length = int.from_bytes(data[:8], 'little')
        header, body = data[:8], data[12:12 + length]
        assert int.from_bytes(data[8:12], 'little') == masked(their_crc32c(header))
        assert int.from_bytes(data[12 + length:16 + length], 'little') == masked(
            their_crc32c(body))
        events.append(Event.FromString(body))
        data = data[16 + length:]
    t = [e.wall_time for e in events]
    expected = [Event(wall_time=t[0], file_version='brain.Event:2'),
                Event(wall_time=t[1], step=4, session_log=SessionLog(status=SessionLog.START)),
                Event(wall_time=t[2], step=4, summary=scalar('train/loss', 2.5)),
                Event(wall_time=t[3], step=4, summary=scalar('train/zero', 0.0)),
                Event(wall_time=t[4], step=4, summary=scalar('train/tiny', -1e-30)),
                Event(wall_time=t[5], step=4, summary=scalar('train/huge', 1e39)),
                Event(wall_time=t[6], step=2**40, summary=scalar('eval/bleu', 27.3))]
    assert events == expected
    assert written == b''.join(event_file.record(e.SerializeToString()) for e in expected)
