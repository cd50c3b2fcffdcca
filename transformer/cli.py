"""What every entry point shares: the --config/--workdir flags and one-line errors.

Bad input (an unknown config row or field, a value of the wrong type, a missing file, data the
pipeline refuses) ends the program with `error: ...` on one line and exit status 2. Set
TRANSFORMER_TRACEBACK=1 to see the full traceback instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from transformer import config_defaults

EXIT_BAD_INPUT = 2
CONFIG_FILE = 'config.json'  # the resolved config, stored in the work directory by `train`


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit status 2."""


class Abort(RuntimeError):
    """A run that must stop (e.g. a non-finite loss): printed as one line, exit status 1."""


def define_config_flag():
    """Defines --config=FILE[:ARG] with --config.field=value overrides."""
    return config_flags.DEFINE_config_file(
        'config', None, 'Config file and argument, e.g. configs/wmt14_ende.py:base.',
        lock_config=True)


def fail(message: str) -> None:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('_config_probe', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _explain_flag_error(argv: list[str], exc: BaseException) -> str:
    """Turns a config_flags failure into one line that names the flag or field."""
    cause = _root_cause(exc)
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if spec is not None:
        path = spec.split(':', 1)[0]
        if not os.path.exists(path):
            return f'config file {path!r} does not exist'
        try:
            config = _load_config_file(spec)
        except Exception as e:  # the config's own message (unknown row etc.)
            return f'--config={spec}: {_root_cause(e)}'
        for a in argv:
            if not a.startswith('--config.'):
                continue
            field = a[len('--config.'):].split('=', 1)[0]
            node, parts = config, field.split('.')
            for i, part in enumerate(parts):
                if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                    where = '.'.join(parts[:i]) or 'the config'
                    valid = ', '.join(sorted(node.keys())) if isinstance(
                        node, ml_collections.ConfigDict) else '(not a group)'
                    return f'unknown config field {field!r}; valid fields of {where}: {valid}'
                node = node[part]
    text = str(exc).strip().splitlines()
    first = next((line for line in text if 'flag --' in line), text[0] if text else repr(cause))
    return first.replace('FATAL Flags parsing error: ', '')


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl prints multi-line usage; we print one line
        if os.environ.get('TRANSFORMER_TRACEBACK'):
            raise
        fail(_explain_flag_error(argv, e))


def run(main: Callable[[list[str]], None]) -> None:
    """app.run with one-line errors for bad flags, configs and data."""

    def wrapped(argv):
        try:
            main(argv)
        except (UsageError, ValueError, FileNotFoundError, UnicodeDecodeError) as e:
            if os.environ.get('TRANSFORMER_TRACEBACK'):
                raise
            fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
        except Abort as e:
            if os.environ.get('TRANSFORMER_TRACEBACK'):
                raise
            print(f'error: {e}', file=sys.stderr)
            sys.exit(1)

    # JAX logs at INFO each backend it fails to find (e.g. libtpu on a GPU or CPU machine),
    # Orbax a dozen lines per checkpoint: the console shows warnings and our own `say` lines
    # unless --verbosity asks for more.
    logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
        absl_logging.set_verbosity(absl_logging.WARNING)
    app.run(wrapped, flags_parser=_parse_flags)


def say(message: str) -> None:
    """One line of progress for the user, on stderr, from the first process only."""
    import jax
    from tqdm import tqdm
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)  # above any progress bar, never inside it


def checked_config(holder) -> ml_collections.ConfigDict:
    """The --config flag's value after overrides, validated (ValueError names the field)."""
    try:
        config = holder.value  # config_flags loads the file lazily, here
        if config is not None:
            config.keys()  # a file that failed to load raises only on first use
    except Exception as e:
        if os.environ.get('TRANSFORMER_TRACEBACK'):
            raise
        raise UsageError(_explain_flag_error(sys.argv, e)) from None
    if config is None:
        raise UsageError('--config is required, e.g. --config=configs/demo.py')
    config_defaults.validate(config)
    return config


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Stores the resolved config in the work directory (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that `train` stored in `workdir`; UsageError if there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise UsageError(f'{path} not found: is {workdir!r} a work directory made by '
                         'transformer.train?')
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def config_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields whose values differ between two configs."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb)
                  if fa.get(k) != fb.get(k) and k not in ignore)


def _flatten(d, prefix=''):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
    return out
