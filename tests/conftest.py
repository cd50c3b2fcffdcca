"""Test set-up: 8 simulated CPU devices for the sharded tests, and shared helpers."""

import os
import pathlib

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
    os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
    return REPO


def load_config(name: str, arg=None):
    """configs/NAME.py's get_config(arg), loaded by path as config_flags does."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'configs_{name}', REPO / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def shared_data(*parts: str) -> pathlib.Path:
    """A path under ../shared/data, skipping the test when it is absent (a fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'{path} not present (../shared/data is only on the project machines)')
    return path
