"""When something goes wrong: each case gives one line naming the file, step or field, a
documented exit status, and loses nothing already written (README, "When something goes
wrong"). Failures are real where CI can make them (a deleted file, an immutable directory, a
file size limit, a killed process) and injected where it cannot."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import (
    error_line,
    free_port,
    program_env,
    run_program,
    run_train,
    tiny_config,
    train_command,
    two_process_env,
)

from transformer import checkpoint, data, errors
from transformer import tokenizer as tokenizer_lib
from transformer import workdir as workdir_lib


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished tiny run with checkpoints 4, 8 and 12."""
    workdir = tmp_path_factory.mktemp('trained') / 'run'
    run_train(workdir)
    assert workdir_lib.checkpoint_steps(str(workdir)) == [4, 8, 12]
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the finished run, to damage."""
    copy = tmp_path / 'run'
    shutil.copytree(trained, copy)
    return copy


def resume(workdir, *extra, **kwargs):
    """Training on to step 16 from what `workdir` holds."""
    return run_train(workdir, '--config.train.steps=16', *extra, check=False, **kwargs)


def decode_programs(workdir):
    """evaluate and translate on `workdir`, with the checks' exit statuses and stderr."""
    return {module: run_program(module, f'--workdir={workdir}', '--average=1',
                                '--beam_size=1', stdin=b'zofu kabemi\n', check=False)
            for module in ('evaluate', 'translate')}


# 1. A missing or changed vocabulary under checkpoints is refused, never rebuilt.
@pytest.mark.parametrize('damage', ['deleted', 'replaced'])
def test_missing_or_changed_vocabulary_is_refused(run, damage):
    vocab = run / workdir_lib.VOCAB_MODEL
    if damage == 'deleted':
        vocab.unlink()
    else:  # a valid vocabulary, but another one
        vocab.write_bytes(tokenizer_lib.train(['ein anderes Vokabular', 'another one'] * 50, 40))
    before = sorted(os.listdir(run))
    r = resume(run)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert str(vocab) in error_line(r)
    assert ('is missing' if damage == 'deleted' else 'not the vocabulary') in error_line(r)
    assert sorted(os.listdir(run)) == before  # nothing trained, nothing rebuilt
    for module, proc in decode_programs(run).items():
        assert proc.returncode == errors.EXIT_BAD_INPUT, module
        assert str(vocab) in error_line(proc), module


# 2. A vocabulary file that is not a SentencePiece model: one line naming it.
def test_garbage_vocabulary_is_one_line(run, tmp_path):
    vocab = run / workdir_lib.VOCAB_MODEL
    vocab.write_bytes(np.random.default_rng(0).bytes(3000))
    for proc in [resume(run), *decode_programs(run).values()]:
        assert proc.returncode == errors.EXIT_BAD_INPUT
        assert str(vocab) in error_line(proc)
    # Without a recorded fingerprint to compare with, the parse itself fails in one line.
    with pytest.raises(errors.UsageError, match='is not a SentencePiece model') as e:
        workdir_lib.load_vocabulary(str(run))
    assert '\n' not in str(e.value)


def truncate_newest_data(workdir, step=12):
    """Cuts every array data file of checkpoint `step` to half its size."""
    state = workdir / workdir_lib.CHECKPOINTS_DIR / str(step) / 'state'
    files = [p for p in state.rglob('*') if p.is_file() and p.parent.name == 'd']
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


# 3. A broken newest checkpoint: one warning naming it, the newest intact one is used.
@pytest.mark.parametrize('damage', ['truncated data', 'metadata deleted'])
def test_broken_newest_checkpoint_falls_back(run, damage):
    if damage == 'truncated data':
        truncate_newest_data(run)
        procs = decode_programs(run)
        for module, proc in procs.items():
            assert proc.returncode == 0, (module, proc.stderr.decode()[-2000:])
            lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
            assert [line[:len('warning: checkpoint 12')] for line in lines
                    if not line.startswith('translate:')] == ['warning: checkpoint 12'], lines
        assert json.loads(procs['evaluate'].stdout)['steps'] == [8]
    else:  # the parameters alone still read back; the training state does not
        (run / workdir_lib.CHECKPOINTS_DIR / '12' / 'state' / '_METADATA').unlink()
    r = resume(run)
    warnings = [line for line in r.stderr.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1 and warnings[0].startswith('warning: checkpoint 12 in '), warnings
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Resumed from step 8' in r.stderr
    moved = os.listdir(run / workdir_lib.BROKEN_DIR)
    assert len(moved) == 1 and moved[0].startswith('12-')  # set aside, never deleted
    assert workdir_lib.checkpoint_steps(str(run)) == [4, 8, 12, 16]


def test_no_readable_checkpoint_is_one_line(run):
    for step in (4, 8, 12):
        truncate_newest_data(run, step)
    proc = run_program('evaluate', f'--workdir={run}', '--average=1', check=False)
    assert proc.returncode == errors.EXIT_BAD_INPUT
    assert 'readable checkpoint' in error_line(proc)


def make_immutable(path: pathlib.Path):
    """Makes `path` refuse new entries, for root too (chattr +i), or by mode when not root."""
    if os.geteuid() == 0:
        subprocess.run(['chattr', '+i', str(path)], check=True)
    else:
        path.chmod(0o555)
    try:
        (path / '.probe').touch()
    except OSError:
        return
    raise AssertionError(f'could not make {path} unwritable on this machine')


def make_mutable(path: pathlib.Path):
    if os.geteuid() == 0:
        subprocess.run(['chattr', '-i', str(path)], check=True)
    else:
        path.chmod(0o755)


# 4. A failed save stops training at once, with one line; earlier checkpoints stay intact.
@pytest.mark.parametrize('fault', ['checkpoints not writable', 'writes fail'])
def test_failed_save_stops_at_once(run, fault):
    checkpoints = run / workdir_lib.CHECKPOINTS_DIR
    if fault == 'checkpoints not writable':
        make_immutable(checkpoints)
        try:
            r = resume(run, '--config.train.steps=40')
        finally:
            make_mutable(checkpoints)
    else:  # a real write error from the writer itself (like a disk that fills up mid-save):
        # files may not grow past 64 KiB; the next checkpoint's do, the metrics file does not.
        command = train_command(run, '--config.train.steps=40')
        r = subprocess.run(['bash', '-c', 'ulimit -f 64 && exec "$@"', 'bash', *command],
                           cwd=pathlib.Path(__file__).parents[1], env=program_env(),
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == errors.EXIT_RUNTIME
    line = error_line(r)
    assert line.startswith(f'error: could not save checkpoint 16 in {checkpoints}: ')
    assert line.endswith('Operation not permitted' if fault == 'checkpoints not writable'
                         else 'File too large')
    logged = [json.loads(x)['step'] for x in (run / 'metrics.jsonl').read_text().splitlines()]
    # Stopped as soon as the watcher saw the failure: here steps take milliseconds, the failed
    # write a few of them; at the latest when the next save is due.
    assert max(logged) <= 20
    assert workdir_lib.checkpoint_steps(str(run)) == [4, 8, 12]
    proc = run_program('evaluate', f'--workdir={run}', '--step=12', '--beam_size=1')
    assert json.loads(proc.stdout)['steps'] == [12]


def test_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    manager = checkpoint.make_manager(str(tmp_path / 'checkpoints'), keep=2)
    saver = checkpoint.Saver(manager)
    state = {'w': jax.random.normal(jax.random.key(0), (256, 256))}  # incompressible
    saver.save(1, state, {'epoch': 0})
    saver.wait()
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: free._replace(free=100_000))
    with pytest.raises(checkpoint.SaveError, match=r'could not save checkpoint 2 in .*: No space '
                       r'left on device \(0 MiB free, about 0 MiB needed\)'):
        saver.save(2, state, {'epoch': 0})
    manager.close()
    assert checkpoint.available_steps(str(tmp_path / 'checkpoints')) == [1]


def test_unwritable_work_directory_is_refused_before_anything_is_built(tmp_path):
    readonly = tmp_path / 'readonly'
    readonly.mkdir()
    make_immutable(readonly)
    try:
        r = run_train(readonly / 'run', check=False)
    finally:
        make_mutable(readonly)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert error_line(r) == (f'error: cannot write in the work directory {readonly / "run"}: '
                             'Operation not permitted')
    assert 'Training data' not in r.stderr


# 5. One training process per work directory; a killed one leaves no stale lock.
def test_second_train_is_refused_while_the_first_runs(tmp_path):
    workdir = tmp_path / 'run'
    first = subprocess.Popen(train_command(workdir, '--config.train.steps=100000',
                                           '--config.train.checkpoint_every_steps=100000'),
                             cwd=pathlib.Path(__file__).parents[1], env=program_env(),
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (workdir / 'metrics.jsonl').exists() and time.time() < deadline:
            time.sleep(0.2)
        second = run_train(workdir, check=False)
        assert second.returncode == errors.EXIT_BAD_INPUT
        assert f'in use by another train (pid {first.pid} on host ' in error_line(second)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_train(workdir, '--config.train.steps=4')  # the OS released the lock
    assert 'Done at step 4' in third.stderr


# 6. Training text of blank lines only: one line.
def test_blank_training_text_is_one_line(tmp_path):
    for lang in ('en', 'de'):
        (tmp_path / f'train.{lang}').write_text('\n  \n\n')
    r = run_train(tmp_path / 'run', f'--config.data.train={tmp_path / "train"}',
                  config='configs/local.py:base,runlocal', check=False)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert 'holds only blank lines' in error_line(r)


# 7. A configured validation split that cannot be read stops the run before training.
def test_unreadable_validation_split_stops_before_training(tmp_path):
    for lang, text in (('en', 'a small house\nthe big dog\n'), ('de', 'ein kleines Haus\nder gro'
                                                                       'sse Hund\n')):
        (tmp_path / f'train.{lang}').write_text(text * 50)
        (tmp_path / f'val.{lang}').write_text(text)
    (tmp_path / 'val.de').write_bytes(b'ein Haus\nkaputt \xff\xfe\n')
    workdir = tmp_path / 'run'
    r = run_train(workdir, f'--config.data.train={tmp_path / "train"}',
                  f'--config.data.validation={tmp_path / "val"}',
                  config='configs/local.py:base,runlocal', check=False)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert error_line(r) == f'error: {tmp_path / "val.de"}:2: line is not valid UTF-8'
    assert workdir_lib.checkpoint_steps(str(workdir)) == []


# 9. A lost peer process: the survivor says so in one line and exits non-zero, at once.
@pytest.mark.parametrize('victim', [1, 0])  # 0 is the coordinator
def test_survivor_of_a_killed_peer_exits_with_one_line(tmp_path, victim):
    workdir, port = tmp_path / 'run', free_port()
    command = train_command(workdir, '--config.train.steps=100000',
                            '--config.train.checkpoint_every_steps=100000')
    procs = [subprocess.Popen(command, cwd=pathlib.Path(__file__).parents[1],
                              env=two_process_env(port, i), stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = workdir / 'metrics.jsonl'
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.time()
        survivor = procs[1 - victim]
        _, stderr = survivor.communicate(timeout=60)
        seconds = time.time() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert survivor.returncode == errors.EXIT_RUNTIME, stderr[-3000:]  # not an abort (-6)
    assert seconds < 30
    errors_printed = [line for line in stderr.replace('\r', '\n').splitlines()
                      if line.startswith('error:')]
    assert len(errors_printed) == 1 and 'stopped' in errors_printed[0], stderr[-3000:]
    assert 'Traceback' not in stderr and 'Fatal Python error' not in stderr


# 10. Files of the work directory follow the umask, like any other file.
def test_work_directory_files_follow_the_umask(tmp_path):
    config = tiny_config()
    config.data.source = 'synthetic'
    config.vocab_size = 64
    old = os.umask(0o022)
    try:
        workdir = str(tmp_path / 'run')
        tokenizer = workdir_lib.vocabulary(config, workdir, lambda: data.vocab_text(config))
        workdir_lib.save_config(config, workdir)
        data.tokenized_train(config, tokenizer, cache_dir=os.path.join(workdir, 'cache'),
                             vocab_fingerprint=workdir_lib.vocabulary_fingerprint(workdir))
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(workdir):
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, name
        for name in dirs:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o755, name
