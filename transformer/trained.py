"""A trained model from a work directory: its checkpoints' parameters, one step's or averaged
over the last K (section 6.1), with the config and vocabulary it was trained with.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from transformer import checkpoint, errors, run_config
from transformer import vocabulary as vocabulary_lib
from transformer import workdir as workdir_lib
from transformer.errors import FieldError, UsageError
from transformer.model import abstract_model
from transformer.workdir import CHECKPOINTS_DIR, path


def abstract_params(config):
    """(graphdef, abstract parameters on the first device) of the config's model."""
    graphdef, state = abstract_model(config)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            nnx.to_pure_dict(state))
    return graphdef, abstract


def _existing_steps(workdir: str) -> list[int]:
    steps = checkpoint.steps_in(workdir)
    if not steps:
        raise UsageError(f'no checkpoint in {path(workdir, CHECKPOINTS_DIR)}: train first '
                         '(python -m transformer.train)')
    return steps


def weights(config, raw_weights: bool = False) -> str:
    """Which weights of a checkpoint are decoded with: 'ema', the moving average that runs
    with train.ema_decay > 0 keep (Marian and fairseq users' expectation: the smoothed model
    is the model), 'raw', the parameters of such a run (--raw_weights), or 'params', those of
    a run without."""
    if config.train.ema_decay <= 0:
        return 'params'
    return 'raw' if raw_weights else 'ema'


def _state_item(which: str) -> str:
    return 'ema' if which == 'ema' else 'params'


def _as_params(tree, abstract):
    """The moving average (float32) in the parameters' dtypes, for the model."""
    return jax.tree.map(lambda x, a: x.astype(a.dtype), tree, abstract)


def _ema_abstract(abstract):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, 'float32', sharding=a.sharding),
                        abstract)


def average_last(workdir: str, last: int, config=None, abstract=None, minimum=None,
                 raw_weights: bool = False):
    """The mean parameters of the last `last` readable checkpoints (section 6.1; at least
    `minimum` of them, default all): (params, steps, infos). Of a run with a moving average,
    the mean of its checkpoints' averages, unless `raw_weights`."""
    config = config or run_config.load_config(workdir)
    if abstract is None:
        _, abstract = abstract_params(config)
    steps = _existing_steps(workdir)
    if last > len(steps):
        raise UsageError(f'asked to average the last {last} checkpoints, but '
                         f'{workdir} holds {len(steps)}: {steps}')
    found = _read(workdir, steps, last, abstract, minimum, weights(config, raw_weights))
    params = checkpoint.average_params([p for _, p, _ in found])
    return params, [s for s, _, _ in found], [i for _, _, i in found]


def _read(workdir: str, steps, count: int, abstract, minimum, which: str, pick_again=True):
    """[(step, params, info)] of the newest `count` readable checkpoints among `steps`, the
    weights `which` says, in the parameters' dtypes."""
    item = _state_item(which)
    found = checkpoint.restore_params(
        path(workdir, CHECKPOINTS_DIR), steps, count,
        _ema_abstract(abstract) if item == 'ema' else abstract, minimum, pick_again, item)
    return [(step, _as_params(p, abstract), info) for step, p, info in found]


def save_averaged(workdir: str, params, steps: list[int]) -> str:
    """Writes averaged parameters to workdir/averaged (replacing an older one)."""
    directory = os.path.abspath(path(workdir, workdir_lib.AVERAGED_DIR))
    checkpoint.save_params(os.path.join(directory, 'params'), params)
    workdir_lib.atomic_write(os.path.join(directory, 'steps.json'),
                             json.dumps({'steps': steps}).encode())
    return directory


def load_model(workdir: str, *, average: int | None = None, step: int | str | None = None,
               raw_weights: bool = False):
    """The trained model of a work directory: (model, config, tokenizer, steps used).

    Parameters come from checkpoint `step` ('best': early stopping's best, BEST_FILE), or
    are averaged over the last `average` readable checkpoints; `average=None` takes the
    config's decode.average_last, or all there are when fewer. An explicit `average` must be
    available. The vocabulary must be the one the checkpoints were trained with.

    A run with a moving average (train.ema_decay > 0) is decoded with it, unless
    `raw_weights`: with `average=None` the newest checkpoint's average alone (it is an
    average already; Marian and fairseq decode with the smoothed model as saved), with an
    explicit `average` or `step` the mean of those checkpoints' averages.
    """
    config = run_config.load_config(workdir)
    which = weights(config, raw_weights)
    if step == 'best':
        step = workdir_lib.best_step(workdir)
    if step is not None and average not in (None, 1):
        raise FieldError('step', step, f'(one checkpoint) excludes averaging {average}')
    if average is not None and average < 1:
        raise FieldError('average', average, 'must be >= 1')
    vocab = path(workdir, workdir_lib.VOCAB_MODEL)
    if not os.path.exists(vocab):
        raise UsageError(f'no vocabulary at {vocab}; the run cannot be read without the '
                         'vocabulary it was trained with')
    available = _existing_steps(workdir)
    graphdef, abstract = abstract_params(config)
    if step is not None:
        if step not in available:
            raise UsageError(f'no checkpoint of step {step} in {workdir}; have {available}')
        found = _read(workdir, [step], 1, abstract, None, which, pick_again=False)
        params, steps, infos = found[0][1], [step], [found[0][2]]
    else:
        minimum = average  # an explicit --average must be met; the default takes what reads
        default = average is None
        wanted = 1 if which == 'ema' else config.decode.average_last
        if default:
            average, minimum = max(1, min(wanted, len(available))), 1
        params, steps, infos = average_last(workdir, average, config, abstract=abstract,
                                            minimum=minimum, raw_weights=raw_weights)
        if default and len(steps) < wanted:
            errors.warn(f'averaging {len(steps)} checkpoint(s), steps {steps}, not '
                        f'decode.average_last={config.decode.average_last}: {workdir} has no '
                        'more that can be read')
    tokenizer = vocabulary_lib.load(workdir, vocabulary_lib.recorded_fingerprint(workdir, infos))
    return nnx.merge(graphdef, params), config, tokenizer, steps
