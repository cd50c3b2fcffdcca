"""A training run on disk -> what decoding needs: the model's parameters, the config and the
vocabulary it was trained with.

A run is named as the programs' flags name it: DIR (its checkpoints averaged, as
decode.average_last or --average says, or its moving average), DIR:STEP (one checkpoint; 'best':
early stopping's), or several such members, an ensemble, which `search` decodes as one, each
member with its own cache (see `search.py` for what is averaged). `checkpoint.py` reads the
trees; this module picks the checkpoints, checks them, averages them (section 6.1) and builds the
model.

Ensemble members must agree on what they translate: the same vocabulary file (its sha256
fingerprint), the same vocabulary size and the same direction (source_lang -> target_lang); a
member that differs is refused in one line naming it.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from transformer import checkpoint, errors, run_config
from transformer import tokenizer as tokenizer_lib
from transformer import vocabulary as vocabulary_lib
from transformer import workdir as workdir_lib
from transformer.errors import CheckpointError, FieldError, UsageError
from transformer.model import abstract_model
from transformer.workdir import CHECKPOINTS_DIR, path

# -- an ensemble, or one model: what a decoding program loads -----------------------------------


class Member(NamedTuple):
    workdir: str
    # None: the workdir's default (averaging over the last checkpoints, or its moving average);
    # 'best': early stopping's best checkpoint
    step: int | str | None = None


class Loaded(NamedTuple):
    models: list  # Transformers, one per member
    config: ml_collections.ConfigDict  # the home member's: data, splits, decoding defaults
    tokenizer: tokenizer_lib.Tokenizer
    home: str  # the work directory whose config is used (evaluate writes there)
    members: list[dict]  # per member: workdir and the checkpoint steps used

    @property
    def steps(self) -> list[int]:
        """The steps of a single model (for labels); an ensemble has several lists."""
        return self.members[0]['steps']


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _key(member: Member) -> tuple:
    return os.path.realpath(member.workdir), member.step


def load(members: list[Member], *, average: int | None = None,
         home: str | None = None, raw_weights: bool = False) -> Loaded:
    """Loads every member (`load_model`: its `step`, or the average of the last `average`
    checkpoints, default the config's decode.average_last) and checks that they agree. `home`
    (default the first member) must be one of the members' directories.

    A member that keeps a moving average of its weights (train.ema_decay) is decoded with it,
    each member with its own; `raw_weights` takes every member's raw parameters instead.

    The same (workdir, step) twice is loaded once and used twice.
    """
    if not members:
        raise UsageError('an ensemble needs at least one member')
    home = home or members[0].workdir
    if not any(_same(home, m.workdir) for m in members):
        raise UsageError(f'{home} is not one of the ensemble members '
                         f'({", ".join(m.workdir for m in members)})')
    loaded: dict[tuple, tuple] = {}
    models, described = [], []
    first = None
    for member in members:
        key = _key(member)
        if key not in loaded:
            loaded[key] = load_model(member.workdir, average=average, step=member.step,
                                     raw_weights=raw_weights)
        model, config, tokenizer, steps = loaded[key]
        facts = dict(workdir=member.workdir,
                     direction=f'{config.source_lang}->{config.target_lang}',
                     vocab_size=int(config.vocab_size),
                     vocab_sha256=vocabulary_lib.stored_fingerprint(member.workdir))
        if first is None:
            first = facts
        else:
            _check_agrees(facts, first)
        models.append(model)
        described.append(dict(workdir=member.workdir, steps=list(steps),
                              weights=weights(config, raw_weights)))
    _, config, tokenizer, _ = loaded[_key(next(m for m in members if _same(home, m.workdir)))]
    return Loaded(models, config, tokenizer, home, described)


def _check_agrees(facts: dict, first: dict) -> None:
    name, other = facts['workdir'], first['workdir']
    if facts['direction'] != first['direction']:
        raise UsageError(f'ensemble member {name} translates {facts["direction"]}, but {other} '
                         f'translates {first["direction"]}')
    if facts['vocab_sha256'] != first['vocab_sha256']:
        raise UsageError(f'ensemble member {name} has another vocabulary than {other} '
                         f'(vocab.model sha256 {facts["vocab_sha256"][:12]}... against '
                         f'{first["vocab_sha256"][:12]}...): members must share one')
    if facts['vocab_size'] != first['vocab_size']:
        raise UsageError(f'ensemble member {name} has vocab_size={facts["vocab_size"]}, but '
                         f'{other} has vocab_size={first["vocab_size"]}')


# -- one run: which checkpoints, which weights -------------------------------------------------

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
    directory = path(workdir, CHECKPOINTS_DIR)
    if step is not None:
        if step not in available:
            raise UsageError(f'no checkpoint of step {step} in {workdir}; have {available}')
        found = read_newest(directory, [step], 1, abstract, which=which, pick_again=False)
    else:
        minimum = average  # an explicit --average must be met; the default takes what reads
        default = average is None
        wanted = 1 if which == 'ema' else config.decode.average_last
        if default:
            average, minimum = max(1, min(wanted, len(available))), 1
        _check_enough(workdir, average, available)
        found = read_newest(directory, available, average, abstract, minimum, which=which)
        if default and len(found) < wanted:
            errors.warn(f'averaging {len(found)} checkpoint(s), steps '
                        f'{[s for s, _, _ in found]}, not decode.average_last='
                        f'{config.decode.average_last}: {workdir} has no more that can be read')
    # One checkpoint's parameters are used as read; those of the default or --average, however
    # many, are averaged (as they always were: the mean of one is that one).
    params = found[0][1] if step is not None else average_params([p for _, p, _ in found])
    infos = [i for _, _, i in found]
    tokenizer = vocabulary_lib.load(workdir, vocabulary_lib.recorded_fingerprint(workdir, infos))
    return nnx.merge(graphdef, params), config, tokenizer, [s for s, _, _ in found]


def weights(config, raw_weights: bool = False) -> str:
    """Which weights of a checkpoint are decoded with: 'ema', the moving average that runs
    with train.ema_decay > 0 keep (Marian and fairseq users' expectation: the smoothed model
    is the model), 'raw', the parameters of such a run (--raw_weights), or 'params', those of
    a run without."""
    if config.train.ema_decay <= 0:
        return 'params'
    return 'raw' if raw_weights else 'ema'


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


def _check_enough(workdir: str, last: int, steps: list[int]) -> None:
    if last > len(steps):
        raise UsageError(f'asked to average the last {last} checkpoints, but '
                         f'{workdir} holds {len(steps)}: {steps}')


# -- averaging (section 6.1) -------------------------------------------------------------------

def average_last(workdir: str, last: int, config=None, *, raw_weights: bool = False):
    """The mean parameters of the last `last` readable checkpoints (section 6.1): (params,
    steps). Of a run with a moving average, the mean of its checkpoints' averages, unless
    `raw_weights`."""
    config = config or run_config.load_config(workdir)
    _, abstract = abstract_params(config)
    steps = _existing_steps(workdir)
    _check_enough(workdir, last, steps)
    found = read_newest(path(workdir, CHECKPOINTS_DIR), steps, last, abstract,
                        which=weights(config, raw_weights))
    return average_params([p for _, p, _ in found]), [s for s, _, _ in found]


def average_params(trees: list):
    """The element-wise mean of parameter trees (section 6.1), accumulated in float32."""
    total = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), total, tree)
    return jax.tree.map(lambda t, x: (t / len(trees)).astype(x.dtype), total, trees[0])


def save_averaged(workdir: str, params, steps: list[int]) -> str:
    """Writes averaged parameters to workdir/averaged (replacing an older one)."""
    directory = os.path.abspath(path(workdir, workdir_lib.AVERAGED_DIR))
    checkpoint.save_params(os.path.join(directory, 'params'), params)
    workdir_lib.atomic_write(os.path.join(directory, 'steps.json'),
                             json.dumps({'steps': steps}).encode())
    return directory


# -- reading checkpoints beside a running train ------------------------------------------------

_PICKS = 3  # times read_newest picks checkpoints anew after some were deleted meanwhile


def read_newest(directory: str, steps: list[int], count: int, abstract,
                minimum: int | None = None, pick_again: bool = True, which: str = 'params'):
    """The parameters only (no optimizer state) of the newest `count` checkpoints among `steps`
    in the checkpoint directory `directory` that read back whole: [(step, params, info)],
    oldest first, in the dtypes of `abstract`. `which` (see `weights`): 'params' or 'raw',
    the state's parameters; 'ema', their moving average (kept in float32).

    A train running beside deletes old checkpoints (it keeps train.keep_checkpoints), maybe
    while they are read: such a step is not broken, and with `pick_again` the newest are
    picked again among the checkpoints there now (a few times at most). A broken checkpoint
    is named in a one-line warning and skipped; CheckpointError when fewer than `minimum`
    (default: `count`) can be read. Parameters that do not fit `abstract` (the config was
    changed since training) are a UsageError naming them.
    """
    item = 'ema' if which == 'ema' else 'params'
    stored = abstract if item == 'params' else jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, 'float32', sharding=a.sharding), abstract)
    loaded, broken, deleted = {}, {}, []
    with checkpoint.reader(directory) as manager:
        for _ in range(_PICKS):
            picked, gone = [], False
            for step in sorted(steps, reverse=True):
                if len(picked) == count:
                    break
                if step in broken:
                    continue
                if step not in loaded:
                    try:
                        loaded[step] = _read_step(manager, step, stored, item)
                    except UsageError:
                        raise
                    except Exception as e:  # noqa: BLE001 - broken, whatever broke it
                        if not os.path.isdir(os.path.join(directory, str(step))):
                            deleted.append(step)  # by the train beside: pick again
                            gone = True
                            break
                        broken[step] = errors.reason(e)
                        errors.warn(f'checkpoint {step} in {directory} cannot be read '
                                    f'({broken[step]}); skipping it')
                        continue
                picked.append(step)
            if not gone or not pick_again:
                break
            steps = [step for step in checkpoint.steps_now(manager) if step not in deleted]
    found = [(step, *loaded[step]) for step in sorted(picked)]
    if len(found) < (count if minimum is None else minimum):
        why = [f'step {step} ({reason})' for step, reason in sorted(broken.items())]
        why += [f'step {step} (deleted while being read: a train running beside keeps only '
                'the last train.keep_checkpoints)' for step in sorted(deleted)]
        raise CheckpointError(f'{directory} has {len(found)} readable checkpoint(s) of the '
                              f'{count} needed; unreadable: {"; ".join(why) or "none"}')
    # The moving average (float32) in the parameters' dtypes, for the model.
    return [(step, jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract), info)
            for step, params, info in found]


def _read_step(manager, step: int, stored, item: str):
    """(tree `item`, info) of checkpoint `step`; UsageError if it does not fit `stored`."""
    problem = checkpoint.mismatch(manager, step, {item: stored}, prefix=f'{item}.')
    if problem:
        raise UsageError(f'checkpoint {step} in {manager.directory} does not fit the run\'s '
                         f'config: {problem} (was config.json changed since training? restore '
                         'it)')
    return checkpoint.read_params(manager, step, stored, item), checkpoint.info(manager, step)
