"""Test set-up: 8 simulated CPU devices for the sharded tests, and the helpers tests share."""

import atexit
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
    os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

from transformer import config as config_lib  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

# One persistent XLA compilation cache for the programs the tests run: dozens of them compile
# the same tiny steps, which then load in a fraction of the time (a 12-step demo train: 14 s
# -> 7 s). It is JAX's own cache (JAX_COMPILATION_CACHE_DIR, which users may set too); what
# runs is what XLA compiled.
PROGRAM_XLA_CACHE = tempfile.mkdtemp(prefix='transformer-tests-xla-')
atexit.register(shutil.rmtree, PROGRAM_XLA_CACHE, ignore_errors=True)


# Each worker runs whole test files (--dist loadfile), handed out one at a time as a worker
# runs short of work. The files that take longest go first, so the short ones fill in at the
# end and both workers finish together (longest-first scheduling); xdist's own order, most
# tests first, left the report fixture's minute for last. Seconds of each file on the 2-core
# CPU (`pytest --durations=0`, 2026-12-03); a file not listed counts as short, and the tests
# within a file keep their order.
FILE_SECONDS = {
    'test_reliability.py': 276, 'test_train.py': 252, 'test_evaluate_cli.py': 132,
    'test_decode.py': 122, 'test_model.py': 109, 'test_prepare.py': 73, 'test_export.py': 56,
    'test_configs.py': 41, 'test_report.py': 38, 'test_preflight.py': 25,
    'test_allocator.py': 14, 'test_data.py': 3,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable within a file


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
    return REPO


def load_config(name: str, arg=None):
    """configs/NAME.py's get_config(arg), loaded by path as --config=FILE:ARG does."""
    spec = str(REPO / 'configs' / f'{name}.py') + (f':{arg}' if arg else '')
    return config_lib.load_file(spec)


def tiny_config(vocab_size=40, **model_overrides):
    """The runlocal shrink of the base config: a model that compiles in a second."""
    c = config_lib.shrink(config_lib.base_config())
    c.vocab_size = vocab_size
    c.model.dropout_rate = 0.0
    c.model.update(model_overrides)
    return c


def hand_count(vocab, n_enc, n_dec, d, d_ff, h, d_k, d_v, attention_bias=False):
    """Parameters counted by hand: the FFN's and LayerNorm's biases, the attention projections'
    only with `attention_bias` (section 3.2.2 has none), no final LayerNorm (post-LN)."""
    attention = d * h * d_k * 2 + d * h * d_v + h * d_v * d
    if attention_bias:
        attention += 2 * h * d_k + h * d_v + d
    ffn = d * d_ff + d_ff + d_ff * d + d
    norm = 2 * d
    return (vocab * d + n_enc * (attention + ffn + 2 * norm)
            + n_dec * (2 * attention + ffn + 3 * norm))


def shared_data(*parts: str) -> pathlib.Path:
    """A path under ../shared/data, skipping the test when it is absent (a fresh clone beside
    no shared folder; the project's machines and CI have it)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'{path} not present (../shared/data is only on the project machines)')
    return path


# -- running the programs -----------------------------------------------------------------------

# A tiny model on the demo task: checkpoints every 4 steps, metrics every step, the final
# evaluation without the greedy BLEU (test_evaluate_cli's run checks that one).
TINY_TRAIN = ['--config.train.steps=12', '--config.train.checkpoint_every_steps=4',
              '--config.train.log_every_steps=1', '--config.train.eval_every_steps=1000',
              '--config.data.batch_tokens=512', '--config.train.eval_bleu_sentences=0']


def program_env(devices=1, **extra) -> dict:
    """The environment of a program run: `devices` simulated CPU devices, no fault injected."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               JAX_COMPILATION_CACHE_DIR=PROGRAM_XLA_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    env.pop('TRANSFORMER_FAULT', None)
    env.update(extra)
    return env


def program_command(module, *args) -> list[str]:
    return [sys.executable, '-m', f'transformer.{module}', *args]


def run_program(module, *args, stdin=None, check=True, devices=1, env=None, text=False,
                timeout=300, **kwargs):
    """Runs `python -m transformer.MODULE ARGS` from the repository root."""
    proc = subprocess.run(program_command(module, *args), input=stdin, capture_output=True,
                          cwd=REPO, env=env or program_env(devices), timeout=timeout, text=text,
                          **kwargs)
    if check and proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode()
        raise AssertionError(f'{module} failed ({proc.returncode}):\n{err[-3000:]}')
    return proc


def train_command(workdir, *extra, config='configs/demo.py:runlocal') -> list[str]:
    return program_command('train', f'--config={config}', f'--workdir={workdir}', *TINY_TRAIN,
                           *extra)


def run_train(workdir, *extra, env=None, check=True, config='configs/demo.py:runlocal',
              **kwargs):
    """The tiny training run (TINY_TRAIN, then `extra` overrides); text output."""
    return run_program('train', f'--config={config}', f'--workdir={workdir}', *TINY_TRAIN,
                       *extra, env=env, check=check, text=True, **kwargs)


def error_line(proc) -> str:
    """The one `error:` line of a failed program: its last line, without a traceback."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    lines = [line for line in err.replace('\r', '\n').splitlines() if line.strip()]
    assert lines and lines[-1].startswith('error: '), err[-3000:]
    assert sum(line.startswith('error:') for line in lines) == 1, err[-3000:]
    assert 'Traceback' not in err, err[-3000:]
    return lines[-1]


def two_process_env(port, process_id):
    return program_env(devices=1, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                       JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(process_id))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
