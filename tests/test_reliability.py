"""When something goes wrong: each case gives one line naming the file, step or field, a
documented exit status, and loses nothing already written (README, "When something goes
wrong"). Failures are real where CI can make them (a deleted file, an immutable directory, a
file size limit, a killed process) and injected where it cannot."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
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

from transformer import (
    checkpoint,
    cli,
    data,
    errors,
    metrics,
    run_config,
    saved_runs,
    sharding,
    supervisor,
    train_step,
)
from transformer import config as config_lib
from transformer import tokenizer as tokenizer_lib
from transformer import vocabulary as vocabulary_lib
from transformer import workdir as workdir_lib


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished tiny run with checkpoints 4, 8 and 12."""
    workdir = tmp_path_factory.mktemp('trained') / 'run'
    run_train(workdir)
    assert checkpoint.steps_in(str(workdir)) == [4, 8, 12]
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the finished run, to damage."""
    copy = tmp_path / 'run'
    shutil.copytree(trained, copy)
    return copy


def resume(workdir, *extra, **kwargs):
    """Training on to step 16 from what `workdir` holds (its last evaluation without the
    greedy BLEU, which may change on resume and takes seconds)."""
    return run_train(workdir, '--config.train.steps=16', '--config.train.eval_bleu_sentences=0',
                     *extra, check=False, **kwargs)


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
        vocabulary_lib.load(str(run))
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
    assert checkpoint.steps_in(str(run)) == [4, 8, 12, 16]


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
    assert checkpoint.steps_in(str(run)) == [4, 8, 12]
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
                  f'--config.data.validation={tmp_path / "val"}', '--config.vocab_size=64',
                  config='configs/local.py:base,runlocal', check=False)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert error_line(r) == f'error: {tmp_path / "val.de"}:2: line is not valid UTF-8'
    assert checkpoint.steps_in(str(workdir)) == []


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
        tokenizer = vocabulary_lib.load_or_train(config, workdir, lambda: data.vocab_text(config))
        run_config.save_config(config, workdir)
        data.tokenized_train(config, tokenizer, cache_dir=os.path.join(workdir, 'cache'),
                             vocab_fingerprint=vocabulary_lib.stored_fingerprint(workdir))
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(workdir):
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, name
        for name in dirs:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o755, name


# 11. A config that does not fit the checkpoints is a config error: refused by name, nothing
# moved, also when config.json is gone (every checkpoint holds the config).
def test_a_changed_config_without_config_json_is_refused_not_taken_for_damage(run):
    (run / workdir_lib.CONFIG_FILE).unlink()
    r = resume(run, '--config.model.d_ff=128')
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert error_line(r) == (f'error: {run} holds a run with another config; differing fields: '
                             'model.d_ff (use a new --workdir)')
    assert f'warning: {run / workdir_lib.CONFIG_FILE} is missing: using the config stored in ' \
           'checkpoint 12' in r.stderr
    assert not (run / workdir_lib.BROKEN_DIR).exists()
    assert checkpoint.steps_in(str(run)) == [4, 8, 12]
    r = resume(run)  # the run's own config: it goes on, and config.json is back
    assert r.returncode == 0 and 'Resumed from step 12' in r.stderr, r.stderr[-2000:]
    assert run_config.load_config(str(run)).model.d_ff == 64


def test_checkpoints_of_another_shape_are_refused_by_name_in_process(trained, tmp_path):
    """Checkpoints of an older version hold no config: their arrays' shapes are checked before
    anything is read or moved (train), or skipped (evaluate, translate)."""
    config = run_config.load_config(str(trained))
    config.model.d_ff = 128
    setup = train_step.setup(config, sharding.make_mesh(devices=jax.devices()[:1]))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract_state, setup.state_shardings)
    directory = str(trained / workdir_lib.CHECKPOINTS_DIR)
    manager = checkpoint.make_manager(directory, keep=5, asynchronous=False, read_only=True)
    broken = tmp_path / 'broken'
    try:
        with pytest.raises(errors.UsageError, match=r'checkpoint 12 in .* does not fit this run: '
                           r'params\.decoder_layers\.ffn\.w1\.bias is float32\[2, 64\] there, '
                           r'float32\[2, 128\] here; params\.decoder_layers\.ffn\.w1\.kernel .* '
                           r'\(and \d+ more\)') as e:
            checkpoint.restore_newest(manager, target, str(broken))
    finally:
        manager.close()
    assert '\n' not in str(e.value) and not broken.exists()
    assert checkpoint.steps_in(str(trained)) == [4, 8, 12]
    _, abstract = saved_runs.abstract_params(config)
    with pytest.raises(errors.UsageError, match='checkpoint 12 in .* does not fit the run.s '
                       r'config: params\.decoder_layers\.ffn\.w1\.bias'):
        saved_runs.read_newest(directory, [4, 8, 12], 1, abstract)


# 12. The token cache is checked against the sizes and checksums it recorded: one that differs
# is built again with one warning (it is derived data), to the same bytes; half-written files
# of a killed run are removed at start.
def cache_files(workdir):
    (directory,) = [p for p in (workdir / workdir_lib.CACHE_DIR).iterdir()
                    if p.name.startswith('train-')]
    return directory, {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize('damage', ['same sizes, other ids', 'truncated offsets',
                                    'meta.json deleted'])
def test_a_damaged_token_cache_is_built_again(run, damage):
    directory, before = cache_files(run)
    if damage == 'same sizes, other ids':  # only the checksums tell
        target = directory / 'target_tokens.bin'
        ids = np.frombuffer(target.read_bytes(), np.uint16)
        target.write_bytes(np.random.default_rng(0).permutation(ids).tobytes())  # reordered
        source = directory / 'source_tokens.bin'
        ids = np.frombuffer(source.read_bytes(), np.uint16).copy()
        ids[::7] = 60000  # beyond the vocabulary
        source.write_bytes(ids.tobytes())
    elif damage == 'truncated offsets':
        offsets = directory / 'source_offsets.npy'
        offsets.write_bytes(offsets.read_bytes()[:-100])
    else:  # and what a run killed while building a cache, or writing a file, leaves
        (directory / workdir_lib.CACHE_META).unlink()
        stale = run / workdir_lib.CACHE_DIR / f'{workdir_lib.CACHE_TMP_PREFIX}abc'
        stale.mkdir()
        (stale / 'source_tokens.bin').write_bytes(b'\0' * 1000)
        (run / f'{workdir_lib.TMP_PREFIX}metrics.jsonl-xyz').write_text('half')
    r = resume(run)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith('warning:')]
    rebuilt = [w for w in warnings if w.startswith(f'warning: the token cache {directory} ')]
    assert len(rebuilt) == 1 and rebuilt[0].endswith('building it again (it is made from the '
                                                     'training text)'), warnings
    assert len(warnings) == (3 if damage == 'meta.json deleted' else 1), warnings
    assert 'Resumed from step 12' in r.stderr
    assert cache_files(run)[1] == before  # the same data: the resume is exact
    assert not [p for p in [*run.iterdir(), *(run / workdir_lib.CACHE_DIR).iterdir()]
                if p.name.startswith(workdir_lib.TMP_PREFIX)]


def test_other_processes_refuse_a_cache_that_differs_and_delete_nothing(run):
    config = run_config.load_config(str(run))
    tokenizer = vocabulary_lib.load(str(run))
    directory, _ = cache_files(run)
    (directory / 'source_lengths.npy').write_bytes(b'short')
    with pytest.raises(errors.DataError, match='source_lengths.npy of 5 bytes, not the '
                       r'\d+ recorded, as this process sees it \(process 0 checked it\)'):
        data.tokenized_train(config, tokenizer, cache_dir=str(run / workdir_lib.CACHE_DIR),
                             vocab_fingerprint=vocabulary_lib.stored_fingerprint(str(run)),
                             rebuild=False)
    assert (directory / 'source_lengths.npy').read_bytes() == b'short'


def test_changed_training_text_under_checkpoints_is_refused(tmp_path):
    """The data position of a checkpoint points into the data it was trained on: after the
    text changed (a new cache), the run is refused in one line, nothing trained."""
    for lang, text in (('en', 'a small house\nthe big dog\n'),
                       ('de', 'ein kleines Haus\nder grosse Hund\n')):
        (tmp_path / f'train.{lang}').write_text(text * 50)
    workdir = tmp_path / 'run'
    local = [f'--config.data.train={tmp_path / "train"}', '--config.vocab_size=64',
             '--config.train.steps=4']
    run_train(workdir, *local, config='configs/local.py:base,runlocal')
    text = (tmp_path / 'train.de').read_text()
    (tmp_path / 'train.de').write_text(text.replace('Hund', 'Hase', 1))  # one word
    r = run_train(workdir, *local, '--config.train.steps=8',
                  config='configs/local.py:base,runlocal', check=False)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert error_line(r).startswith(f'error: the training data tokenized in {workdir / "cache"} '
                                    '(sha256 ')
    recorded = checkpoint.read_info(str(workdir / 'checkpoints'), 4)['data_sha256']
    assert error_line(r).endswith(f'is not what checkpoint 4 was trained on (sha256 '
                                  f'{recorded[:12]}...): the training text changed since; '
                                  'restore it, or use a new --workdir')
    assert checkpoint.steps_in(str(workdir)) == [4]


# 13. A full disk, whatever is being written: one line naming what could not be written and
# the free space, exit 1; nothing already written is lost.
@pytest.mark.parametrize('what,pattern', [
    ('the lock file', 'train.lock'), ('the config', 'config.json'),
    ('the token cache', 'tokens.bin'), ('the vocabulary', 'vocab.json'),
    ('the metrics', 'metrics.jsonl'), ('the TensorBoard events', 'tfevents'),
    ('checkpoint', 'checkpoints')])
def test_a_full_disk_is_one_line(run, what, pattern):
    if what == 'the token cache':
        shutil.rmtree(run / workdir_lib.CACHE_DIR)
    if what == 'the vocabulary':  # rewritten from the checkpoints' fingerprint (14.)
        (run / workdir_lib.VOCAB_META).unlink()
    rows = (run / workdir_lib.METRICS_FILE).read_bytes()
    command = train_command(run, '--config.train.steps=16',
                            '--config.train.eval_bleu_sentences=0')
    r = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / 'full_disk.py'),
                        pattern, *command[1:]], cwd=pathlib.Path(__file__).parents[1],
                       env=program_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == errors.EXIT_RUNTIME, r.stderr[-3000:]
    line = error_line(r)
    if what == 'checkpoint':
        assert line == (f'error: could not save checkpoint 16 in {run / "checkpoints"}: No space '
                        'left on device (1 MiB free)')
    else:
        assert line.startswith(f'error: could not write {what} {run}/')
        assert pattern in line or what == 'the token cache'
        assert line.endswith(': No space left on device (1 MiB free)')
    assert checkpoint.steps_in(str(run)) == [4, 8, 12]
    if what != 'the metrics':
        assert (run / workdir_lib.METRICS_FILE).read_bytes().startswith(rows)
    else:
        assert (run / workdir_lib.METRICS_FILE).read_bytes() == rows
    assert not [p for p in run.rglob(f'{workdir_lib.TMP_PREFIX}*')]


def test_the_first_error_wins_over_errors_while_closing():
    calls = []

    def failing_close():
        calls.append('failing')
        raise OSError(28, 'No space left on device')

    errors.close_all([failing_close, lambda: calls.append('next')], failing=True)  # dropped
    assert calls == ['failing', 'next']
    with pytest.raises(OSError, match='No space'):
        errors.close_all([failing_close, lambda: calls.append('next')], failing=False)
    assert calls == ['failing', 'next', 'failing', 'next']  # every closer ran


class _FullDiskFile:
    """A file being written on a full disk, as a buffered file meets it: a write fails (or,
    with `fits`, seems to succeed into the buffer), and every flush and close after it fails
    again on what the buffer kept; close closes all the same."""

    def __init__(self, file, fits=False):
        self.file, self.fits, self.closed, self.name = file, fits, False, str(file)

    def _full(self, when):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), when)

    def write(self, data):
        if not self.fits:
            raise self._full('write')
        return len(data)

    def flush(self):
        raise self._full('flush')

    def fileno(self):
        return self.file.fileno()

    def close(self):
        if not self.closed:
            self.closed = True
            if hasattr(self.file, 'close'):
                self.file.close()
            raise self._full('close')


def test_a_failed_write_is_the_error_raised_not_the_close_after_it(tmp_path):
    full = _FullDiskFile(tmp_path / 'x')
    with pytest.raises(errors.WriteError) as raised, errors.closing(full, 'the x', 'X') as f:
        f.write(b'data')
    assert str(raised.value).startswith('could not write the x X: No space left on device (')
    assert full.closed and errors.chain(raised.value)[1].filename == 'write'  # the first
    full = _FullDiskFile(tmp_path / 'x', fits=True)  # the close is the first to fail
    with pytest.raises(errors.WriteError, match='could not write the x X: No space'):
        with errors.closing(full, 'the x', 'X') as f:
            f.write(b'data')
    writer = metrics.MetricWriter(str(tmp_path))  # a file kept open: closed at the failure
    writer._jsonl.close()
    full = writer._jsonl = _FullDiskFile(open(tmp_path / workdir_lib.METRICS_FILE, 'a'))
    with pytest.raises(errors.WriteError, match='could not write the metrics'):
        writer.write(1, {'loss': 2.0})
    assert full.closed
    writer.close()  # nothing raised: closed already
    with pytest.raises(errors.WriteError, match='could not write the TensorBoard events'):
        writer._events._writer = _FullDiskFile(tmp_path / 'events', fits=True)
        writer._events.write(1, {'loss': 2.0})
    assert writer._events._writer.closed


def test_atomic_write_on_a_full_disk_raises_the_first_error_and_leaves_nothing(
        tmp_path, monkeypatch):
    fdopen = os.fdopen
    monkeypatch.setattr(os, 'fdopen', lambda fd, mode: _FullDiskFile(fdopen(fd, mode)))
    file = str(tmp_path / workdir_lib.CONFIG_FILE)
    with pytest.raises(errors.WriteError, match=f'could not write the config {file}: No space '):
        workdir_lib.atomic_write(file, b'{}', 'the config')
    assert os.listdir(tmp_path) == []


# 14. Config values that would fail later (after building the vocabulary and the data, or
# silently) are refused at start, in one line naming the field.
@pytest.mark.parametrize('field,value,needle', [
    ('train.checkpoint_every_steps', 0, 'must be an integer >= 1'),
    ('train.log_every_steps', 0, 'must be an integer >= 1'),
    ('train.learning_rate_scale', float('nan'), 'must be a finite number > 0'),
    ('train.learning_rate_scale', float('inf'), 'must be a finite number > 0'),
    ('train.learning_rate_scale', -1.0, 'must be a finite number > 0'),
    ('train.adam_eps', 0.0, 'must be a finite number > 0'),
    ('train.adam_b2', 1.0, 'must be in [0, 1)'),
    ('train.checkpoint_every_minutes', -1.0, 'must be > 0'),
    ('train.peer_timeout_seconds', 0, 'must be an integer >= 1'),
    ('data.seed', -1, 'must be >= 0'),
    ('data.eval_batch_sentences', 0, 'must be >= 1'),
    ('data.vocab_sample_sentences', 0, 'must be >= 1'),
    ('data.bucket_step', 0, 'must be >= 1'),
    ('decode.batch_sentences', 0, 'must be >= 1'),
    ('decode.average_last', 0, 'must be >= 1'),
    ('train.ema_decay', 1.0, 'must be in [0, 1)'),
    ('train.early_stop_patience', -1, 'must be an integer >= 0'),
    ('train.loss_scale_init', 0.5, 'must be a finite number >= 1'),
    ('train.loss_scale_period', 0, 'must be an integer >= 1'),
])
def test_config_values_that_would_fail_later_are_refused(field, value, needle):
    config = config_lib.base_config()
    group, name = field.split('.')
    config[group][name] = value
    with pytest.raises(errors.UsageError) as e:
        config_lib.validate(config)
    assert str(e.value).startswith(f'{field}={value}') and needle in str(e.value), str(e.value)


def test_early_stopping_settings_that_cannot_work_are_refused():
    config = config_lib.base_config()
    config.train.update(early_stop_patience=3, early_stop_metric='bleu', eval_bleu_sentences=0)
    with pytest.raises(errors.UsageError, match='early_stop_metric=bleu needs '
                       'train.eval_bleu_sentences > 0'):
        config_lib.validate(config)
    config.train.early_stop_metric = 'accuracy'
    with pytest.raises(errors.UsageError, match="early_stop_metric='accuracy'; valid: loss, bleu"):
        config_lib.validate(config)
    with pytest.raises(errors.UsageError, match='--step=last must be a step number or best'):
        cli.step_value('last')


def test_a_vocab_size_the_text_cannot_fill_is_refused_at_start(tmp_path):
    r = run_train(tmp_path / 'run', '--config.vocab_size=20000',
                  '--config.train.learning_rate_scale=nan', check=False)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert error_line(r) == ('error: train.learning_rate_scale=nan must be a finite number > 0')
    r = run_train(tmp_path / 'run', '--config.vocab_size=20000', check=False)
    assert r.returncode == errors.EXIT_BAD_INPUT
    line = error_line(r)
    assert line.startswith('error: vocab_size=20000 is more than the training text gives: '
                           'SentencePiece learned ')
    assert line.endswith('or less (nothing was stored)')
    assert not (tmp_path / 'run' / workdir_lib.VOCAB_MODEL).exists()


# 15. A multi-process start-up that loses a process: each survivor says so in one line and
# exits 1, within train.peer_timeout_seconds (JAX itself would abort with a C++ stack dump, or
# wait five minutes): the supervisor of each process turns JAX's abort into that line.
def start_two(workdir, port, victim, fault=None, *extra):
    """Two processes of a tiny run; the victim dies at `fault` (None: it never starts)."""
    command = train_command(workdir, '--config.train.steps=100000',
                            '--config.train.peer_timeout_seconds=5', *extra)
    procs = {}
    for i in range(2):
        env = two_process_env(port, i)
        if i == victim and fault is None:
            continue
        if i == victim:
            env['TRANSFORMER_FAULT'] = f'{fault}:0'
        procs[i] = subprocess.Popen(command, cwd=pathlib.Path(__file__).parents[1], env=env,
                                    stderr=subprocess.PIPE, text=True)
    return procs


@pytest.mark.parametrize('victim,fault,reason', [
    (0, 'data-ready', 'the coordination service on process 0 cannot be reached (UNAVAILABLE)'),
    (1, 'data-ready', 'UNKNOWN: Gloo '),  # at the next barrier; JAX raises it as a ValueError
    (1, None, 'not every process connected within train.peer_timeout_seconds (a process did '
              'not start, or died)')])
def test_a_process_lost_at_start_up_is_one_line_for_the_others(tmp_path, victim, fault, reason):
    procs = start_two(tmp_path / 'run', free_port(), victim, fault)
    started = time.time()
    try:
        survivor = procs[1 - victim]
        _, stderr = survivor.communicate(timeout=120)
        seconds = time.time() - started
    finally:
        for p in procs.values():
            p.kill()
            p.communicate()
    assert survivor.returncode == errors.EXIT_RUNTIME, stderr[-3000:]
    lines = [line for line in stderr.replace('\r', '\n').splitlines() if line.strip()]
    assert lines[-1].startswith(f'error: process {1 - victim} of 2 stopped: {reason}')
    assert lines[-1].endswith(' (a lost peer process, or see its own error)'), stderr[-3000:]
    assert sum(line.startswith('error:') for line in lines) == 1
    assert 'Traceback' not in stderr and 'Fatal' not in stderr and 'F1' not in stderr
    assert seconds < 60


def test_the_supervisor_puts_one_line_for_an_abort_and_passes_the_rest_on(tmp_path,
                                                                          capsys):
    """A child that prints, then dies as JAX's client makes it die; and one that ends well."""
    dump = ('print("progress", flush=True, file=sys.stderr); '
            'sys.stderr.write("W1201 19:26:22.746037   17460 preemption_sync_manager.cc:147] '
            'Failed to retrieve preemption notice\\nF1201 19:26:22.746059   17460 client.h:80] '
            'Terminating process because the JAX distributed service detected fatal errors. '
            'absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending '
            'heartbeats):\\n/job:jax_worker/replica:0/task:1\\n*** Check failure stack trace'
            '\\n"); sys.stderr.flush(); os.abort()')
    env = {'JAX_PROCESS_ID': '0', 'JAX_NUM_PROCESSES': '2'}
    for code, status, relayed in ((dump, errors.EXIT_RUNTIME, b'progress\n'),
                                  ('print("done", file=sys.stderr); sys.exit(3)', 3, b'done\n')):
        child = subprocess.Popen([sys.executable, '-c', f'import os, sys; {code}'],
                                 stderr=subprocess.PIPE)
        with open(tmp_path / 'out', 'wb') as out:
            fatal, said_error = supervisor.relay(child, out)
        assert supervisor.exit_status(child.wait(), fatal, said_error, env) == status
        assert (tmp_path / 'out').read_bytes() == relayed  # before the dump, nothing of it
        assert (fatal is None) == (status == 3)
        if fatal is not None:
            assert supervisor.reason(fatal) == ('process 1 stopped sending heartbeats for '
                                                'train.peer_timeout_seconds')
    assert capsys.readouterr().err == (
        'error: process 0 of 2 stopped: process 1 stopped sending heartbeats for '
        'train.peer_timeout_seconds (a lost peer process, or see its own error)\n')


# 16. Signals outside the loop: one line, 128 + the signal's number, nothing half-written.
# In the loop, a signal during an evaluation ends the evaluation at once, and the run saves.
def signal_when(command, marker, signum, env=None, timeout=120):
    """Runs `command`, sends `signum` once `marker` is on its stderr (at once if None), and
    returns (exit status, stderr, seconds from the signal to the end)."""
    proc = subprocess.Popen(command, cwd=pathlib.Path(__file__).parents[1],
                            env=env or program_env(), stderr=subprocess.PIPE, text=True)
    seen = ''
    while marker is not None and marker not in seen:
        line = proc.stderr.readline()
        assert line, seen[-3000:]
        seen += line
    if marker is None:
        time.sleep(1.0)  # the program is importing its libraries
    proc.send_signal(signum)
    sent = time.time()
    rest = proc.communicate(timeout=timeout)[1]
    return proc.returncode, seen + rest, time.time() - sent


@pytest.mark.parametrize('signum,marker', [
    (signal.SIGINT, None), (signal.SIGTERM, 'Training data:')])
def test_a_signal_while_train_starts_is_one_line(tmp_path, signum, marker):
    workdir = tmp_path / 'run'
    status, stderr, _ = signal_when(train_command(workdir), marker, signum)
    assert status == errors.EXIT_SIGNAL + signum, stderr[-3000:]
    line = [x for x in stderr.replace('\r', '\n').splitlines() if x.strip()][-1]
    name = signal.Signals(signum).name
    assert line.startswith(f'error: stopped by {name}'), stderr[-3000:]
    assert 'Traceback' not in stderr and sum(x.startswith('error:')
                                             for x in stderr.splitlines()) == 1
    assert not [p for p in tmp_path.rglob(f'{workdir_lib.TMP_PREFIX}*')]


def test_sigint_during_evaluate_is_one_line(trained):
    """Any program: cli.run turns the signal into one line, wherever its main is."""
    command = [sys.executable, '-m', 'transformer.evaluate', f'--workdir={trained}',
               '--average=1', '--beam_size=1']
    status, stderr, _ = signal_when(command, 'slow for tests', signal.SIGINT,
                                    env=program_env(TRANSFORMER_SLOW='start:30'))
    assert status == errors.EXIT_SIGNAL + signal.SIGINT, stderr[-3000:]
    assert error_line(subprocess.CompletedProcess([], status, stderr=stderr)) == (
        'error: stopped by SIGINT; nothing half-written is left (run the same command again to '
        'go on)')


def test_sigterm_during_an_evaluation_stops_it_and_saves(run):
    """The evaluation at step 14 (no checkpoint due) would take a minute: SIGTERM ends it at
    once, the run saves step 14 and exits 0; the evaluation is done on resume."""
    command = train_command(run, '--config.train.steps=16', '--config.train.eval_every_steps=14',
                            '--config.train.eval_bleu_sentences=0')
    status, stderr, seconds = signal_when(command, 'slow for tests: eval', signal.SIGTERM,
                                          env=program_env(TRANSFORMER_SLOW='eval:60'))
    assert status == 0, stderr[-3000:]
    assert seconds < 15
    assert 'Evaluation of step 14 stopped by the signal' in stderr
    assert 'Stopped at step 14 after a signal; checkpoint saved.' in stderr
    assert checkpoint.steps_in(str(run)) == [4, 8, 12, 14]
    rows = [json.loads(x) for x in (run / workdir_lib.METRICS_FILE).read_text().splitlines()]
    assert not [r for r in rows if r['step'] == 14 and 'eval/nll' in r]
    r = resume(run, '--config.train.eval_every_steps=14')
    assert 'Evaluating step 14, whose evaluation the last run did not finish' in r.stderr
    rows = [json.loads(x) for x in (run / workdir_lib.METRICS_FILE).read_text().splitlines()]
    assert [r['step'] for r in rows if 'eval/nll' in r] == [12, 14, 16]


# 17. Metrics: an evaluation killed after its step's checkpoint was committed is done on
# resume; a metrics file deleted during the run is noticed and made anew.
def test_an_evaluation_killed_after_its_checkpoint_is_done_on_resume(run):
    # The evaluation of step 16 sleeps 3 s first (the save of step 16 commits meanwhile), then
    # the process is killed.
    killed = resume(run, env=program_env(TRANSFORMER_FAULT='in-eval:16',
                                         TRANSFORMER_SLOW='eval:3'))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint.steps_in(str(run)) == [4, 8, 12, 16]
    r = resume(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Evaluating step 16, whose evaluation the last run did not finish' in r.stderr
    rows = [json.loads(x) for x in (run / workdir_lib.METRICS_FILE).read_text().splitlines()]
    assert [r['step'] for r in rows if 'eval/nll' in r] == [12, 16]
    assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, 17))


def test_a_metrics_file_deleted_during_the_run_is_made_anew(tmp_path, capsys):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(1, {'loss': 2.0}, prefix='train/')
    (tmp_path / workdir_lib.METRICS_FILE).unlink()
    events = list((tmp_path / workdir_lib.TENSORBOARD_DIR).iterdir())
    events[0].unlink()
    writer.write(2, {'loss': 1.0}, prefix='train/')
    writer.close()
    rows = [json.loads(x) for x in (tmp_path / workdir_lib.METRICS_FILE).read_text().splitlines()]
    assert [(r['step'], r['train/loss']) for r in rows] == [(2, 1.0)]
    assert len(list((tmp_path / workdir_lib.TENSORBOARD_DIR).iterdir())) == 1
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        f'warning: {tmp_path / workdir_lib.METRICS_FILE} was deleted during the run: writing '
        'the rows from step 2 on to a new one',
        f'warning: {events[0]} was deleted during the run: writing the events from step 2 on '
        'to a new one']
    assert metrics.MetricWriter(str(tmp_path), start=2).has_row(2, 'train/')


# 18. Readers beside a running train: a checkpoint deleted by train's clean-up while it is
# read is not broken; the newest are picked again. With the default averaging, a reader says
# when it averages fewer than decode.average_last.
def test_a_checkpoint_deleted_while_read_is_picked_again(run, monkeypatch, capsys):
    directory = str(run / workdir_lib.CHECKPOINTS_DIR)
    shutil.copytree(run / workdir_lib.CHECKPOINTS_DIR / '12',
                    run / workdir_lib.CHECKPOINTS_DIR / '16')  # "train" saves step 16 ...
    read = checkpoint.read_params

    def deleted_first(manager, step, *args):
        if step == 4:  # ... and deletes step 4 (keep_checkpoints) while it is being read
            shutil.rmtree(os.path.join(directory, '4'))
        return read(manager, step, *args)

    monkeypatch.setattr(checkpoint, 'read_params', deleted_first)
    config = run_config.load_config(str(run))
    _, abstract = saved_runs.abstract_params(config)
    found = saved_runs.read_newest(directory, [4, 8, 12], 3, abstract)
    assert [step for step, _, _ in found] == [8, 12, 16]
    assert 'warning' not in capsys.readouterr().err
    shutil.rmtree(os.path.join(directory, '16'))
    shutil.rmtree(os.path.join(directory, '8'))
    _, _, _, steps = saved_runs.load_model(str(run))
    assert steps == [12]
    assert capsys.readouterr().err.splitlines() == [
        f'warning: averaging 1 checkpoint(s), steps [12], not decode.average_last=3: {run} has '
        'no more that can be read']


# 19. The smaller ones.
def test_a_finished_run_run_again_keeps_only_keep_checkpoints(run):
    """A kill right after the final commit, before Orbax's clean-up, leaves one checkpoint
    too many: running the finished run again deletes it (here: keep lowered by hand)."""
    stored = json.loads((run / workdir_lib.CONFIG_FILE).read_text())
    stored['train']['keep_checkpoints'] = stored['decode']['average_last'] = 2
    (run / workdir_lib.CONFIG_FILE).write_text(json.dumps(stored))
    r = run_train(run, '--config.train.keep_checkpoints=2', '--config.decode.average_last=2',
                  check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Deleted checkpoints [4]: train.keep_checkpoints=2' in r.stderr
    assert checkpoint.steps_in(str(run)) == [8, 12]


def test_a_corrupt_config_json_is_named(run):
    config_file = run / workdir_lib.CONFIG_FILE
    config_file.write_text('{"model": ')
    for proc in [resume(run), *decode_programs(run).values()]:
        assert proc.returncode == errors.EXIT_BAD_INPUT
        assert error_line(proc) == (f'error: {config_file} cannot be read (Expecting value: line '
                                    '1 column 11 (char 10)): delete it to use the copy in '
                                    'checkpoint 12')


def test_a_deleted_vocab_json_under_checkpoints_is_written_anew(run):
    meta = run / workdir_lib.VOCAB_META
    before = json.loads(meta.read_text())
    meta.unlink()
    r = resume(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f'warning: {meta} was missing or unreadable: wrote it anew for '
            f'{run / workdir_lib.VOCAB_MODEL}, the vocabulary checkpoint 12 was trained with'
            in r.stderr)
    after = json.loads(meta.read_text())
    assert {k: after[k] for k in before if k != 'train_seconds'} == {
        k: v for k, v in before.items() if k != 'train_seconds'}


def test_a_work_directory_that_is_a_file_is_named(tmp_path):
    file = tmp_path / 'run'
    file.write_text('not a directory')
    # One check for every program (workdir.check_workdir): train, and one that reads a run.
    for proc in (run_train(file, check=False),
                 run_program('evaluate', f'--workdir={file}', check=False)):
        assert proc.returncode == errors.EXIT_BAD_INPUT
        assert error_line(proc) == f'error: --workdir={file} is a file, not a work directory'
    assert file.read_text() == 'not a directory'
