"""`python -m transformer.train`: exact resume after kill -9, SIGTERM, devices, processes."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import free_port, program_env, run_train, train_command, two_process_env
from flax import nnx

from transformer import checkpoint, trained
from transformer import workdir as workdir_lib
from transformer.schedule import learning_rate


def final_params(workdir):
    model, _, _, steps = trained.load_model(str(workdir), average=1)
    return steps[-1], [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


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
    complete = workdir_lib.checkpoint_steps(str(workdir))
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
    steps = workdir_lib.checkpoint_steps(str(workdir))
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
    assert workdir_lib.checkpoint_steps(str(workdir)) == [4]


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
