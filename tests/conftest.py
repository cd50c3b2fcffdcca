"""Test set-up: 8 simulated CPU devices for the sharded tests, and the helpers tests share."""

import os
import pathlib

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


def hand_count(vocab, n_enc, n_dec, d, d_ff, h, d_k, d_v):
    """Parameters counted by hand: biases everywhere, no final LayerNorm (post-LN)."""
    attention = d * h * d_k * 2 + d * h * d_v + 2 * h * d_k + h * d_v + h * d_v * d + d
    ffn = d * d_ff + d_ff + d_ff * d + d
    norm = 2 * d
    return (vocab * d + n_enc * (attention + ffn + 2 * norm)
            + n_dec * (2 * attention + ffn + 3 * norm))


def shared_data(*parts: str) -> pathlib.Path:
    """A path under ../shared/data; a test that needs it fails when it is absent (CI has it)."""
    path = SHARED_DATA.joinpath(*parts)
    assert path.exists(), f'{path} not present: ../shared/data must sit beside the checkout'
    return path
