"""A work directory: the files of one training run, and loading what a run left there.

Every file name of a work directory is defined here, once:

  config.json             the resolved config (train writes it; the other programs read it)
  vocab.model, vocab.json the shared BPE vocabulary and what it was made for
  cache/                  what train derives from the training text (length index); rebuilt
                          when deleted
  checkpoints/<step>/     Orbax steps of the training state and data position
  averaged/               the output of `python -m transformer.average`
  eval/                   evaluate's hypotheses and scores
  metrics.jsonl, tensorboard/   the training metrics
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable

import jax
import ml_collections
from absl import logging
from flax import nnx

from transformer import checkpoint
from transformer import config as config_lib
from transformer import tokenizer as tokenizer_lib
from transformer.errors import UsageError
from transformer.model import create_model

CONFIG_FILE = 'config.json'
VOCAB_MODEL = 'vocab.model'
VOCAB_META = 'vocab.json'
CACHE_DIR = 'cache'
CHECKPOINTS_DIR = 'checkpoints'
AVERAGED_DIR = 'averaged'
EVAL_DIR = 'eval'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'

# Fields of vocab.json that must agree with the config for a stored vocabulary to be reused.
_VOCAB_FIELDS = ('vocab_size', 'source_lang', 'target_lang')


def path(workdir: str, name: str) -> str:
    """The path of `name` (one of the names above) in `workdir`."""
    return os.path.join(workdir, name)


def atomic_write(file: str, data: bytes) -> None:
    """Writes via a temporary file and os.replace, so a crash never leaves half a file.

    The file gets the mode the umask gives any new file (mkstemp alone would make it 0600).
    """
    directory = os.path.dirname(file) or '.'
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -- the config -------------------------------------------------------------------------------

def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Stores the resolved config in the work directory (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    atomic_write(path(workdir, CONFIG_FILE), config.to_json(indent=2, sort_keys=True).encode())


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that `train` stored in `workdir`; UsageError if there is none."""
    if not workdir:
        raise UsageError('--workdir is required')
    if not os.path.isdir(workdir):
        raise UsageError(f'work directory {workdir!r} does not exist')
    file = path(workdir, CONFIG_FILE)
    if not os.path.exists(file):
        raise UsageError(f'{file} not found: is {workdir!r} a work directory made by '
                         'transformer.train?')
    with open(file) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a config that differs from the stored one in more than the run length.

    Only a work directory with a checkpoint holds a run; before the first checkpoint (e.g. a
    start that failed on a missing data file) the config may still be corrected.
    """
    if not os.path.exists(path(workdir, CONFIG_FILE)) or not checkpoint_steps(workdir):
        return
    differing = config_lib.differences(load_config(workdir), config,
                                       ignore=config_lib.RESUMABLE_CHANGES)
    if differing:
        raise UsageError(f'{workdir} holds a run with another config; differing fields: '
                         f'{", ".join(differing)} (use a new --workdir)')


# -- the vocabulary ---------------------------------------------------------------------------

def _vocab_metadata(config) -> dict:
    return dict(vocab_size=int(config.vocab_size), source_lang=config.source_lang,
                target_lang=config.target_lang)


def vocabulary_fingerprint(workdir: str) -> str:
    """The sha256 of the stored vocabulary file."""
    with open(path(workdir, VOCAB_MODEL), 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_vocabulary(workdir: str) -> tokenizer_lib.Tokenizer:
    """The vocabulary stored in `workdir` (for evaluate, translate, attention)."""
    file = path(workdir, VOCAB_MODEL)
    if not os.path.exists(file):
        raise UsageError(f'no vocabulary at {file}; train a model in this workdir first')
    with open(file, 'rb') as f:
        return tokenizer_lib.Tokenizer(f.read())


def vocabulary(config, workdir: str,
               texts: Callable[[], Iterable[str]]) -> tokenizer_lib.Tokenizer:
    """The run's vocabulary: the one stored in `workdir`, or trained on `texts()` and stored.

    A stored vocabulary made for another vocab_size or language pair is refused (UsageError).
    """
    model_file, meta_file = path(workdir, VOCAB_MODEL), path(workdir, VOCAB_META)
    want = _vocab_metadata(config)
    if os.path.exists(model_file):
        have = {}
        if os.path.exists(meta_file):
            with open(meta_file) as f:
                have = json.load(f)
        bad = [f'{k}: stored {have.get(k)!r} vs config {want[k]!r}'
               for k in _VOCAB_FIELDS if have.get(k) != want[k]]
        if bad:
            raise UsageError(f'vocabulary {model_file} was made for another config '
                             f'({"; ".join(bad)}); use a new workdir or delete the vocabulary')
        return load_vocabulary(workdir)

    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    proto = tokenizer_lib.train(texts(), config.vocab_size)
    seconds = time.time() - start
    tokenizer = tokenizer_lib.Tokenizer(proto)
    logging.info('Trained a %d-piece BPE vocabulary in %.1f s', tokenizer.vocab_size, seconds)
    meta = dict(want, pieces=tokenizer.vocab_size, model_type='bpe',
                train_seconds=round(seconds, 2), data_source=config.data.source)
    # Metadata first: vocab.model is what marks the vocabulary as present.
    atomic_write(meta_file, (json.dumps(meta, indent=2) + '\n').encode())
    atomic_write(model_file, proto)
    return tokenizer


# -- checkpoints and trained models -------------------------------------------------------------

def checkpoint_steps(workdir: str) -> list[int]:
    """Complete checkpoint steps in the work directory, oldest first."""
    return checkpoint.available_steps(path(workdir, CHECKPOINTS_DIR))


def abstract_params(config):
    """(graphdef, abstract parameters on the first device) of the config's model."""
    model = nnx.eval_shape(lambda: create_model(config))
    graphdef, state = nnx.split(model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            nnx.to_pure_dict(state))
    return graphdef, abstract


def _existing_steps(workdir: str) -> list[int]:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise UsageError(f'no checkpoint in {path(workdir, CHECKPOINTS_DIR)}: train first '
                         '(python -m transformer.train)')
    return steps


def average_last(workdir: str, last: int, config=None, abstract=None):
    """The mean parameters of the last `last` checkpoints (section 6.1): (params, steps)."""
    if abstract is None:
        _, abstract = abstract_params(config or load_config(workdir))
    steps = _existing_steps(workdir)
    if last > len(steps):
        raise UsageError(f'asked to average the last {last} checkpoints, but '
                         f'{workdir} holds {len(steps)}: {steps}')
    chosen = steps[-last:]
    directory = path(workdir, CHECKPOINTS_DIR)
    trees = [checkpoint.restore_params(directory, s, abstract) for s in chosen]
    return checkpoint.average_params(trees), chosen


def save_averaged(workdir: str, params, steps: list[int]) -> str:
    """Writes averaged parameters to workdir/averaged (replacing an older one)."""
    directory = os.path.abspath(path(workdir, AVERAGED_DIR))
    checkpoint.save_params(os.path.join(directory, 'params'), params)
    atomic_write(os.path.join(directory, 'steps.json'), json.dumps({'steps': steps}).encode())
    return directory


def load_model(workdir: str, *, average: int | None = None, step: int | None = None):
    """The trained model of a work directory: (model, config, tokenizer, steps used).

    Parameters come from checkpoint `step`, or are averaged over the last `average`
    checkpoints; `average=None` takes the config's decode.average_last, or all there are when
    fewer. An explicit `average` must be available.
    """
    config = load_config(workdir)
    if step is not None and average not in (None, 1):
        raise UsageError('--step and --average > 1 exclude each other')
    if average is not None and average < 1:
        raise UsageError(f'--average={average} must be >= 1')
    tokenizer = load_vocabulary(workdir)
    available = _existing_steps(workdir)
    if step is None and average is None:
        average = max(1, min(config.decode.average_last, len(available)))
    graphdef, abstract = abstract_params(config)
    if step is None and average > 1:
        params, steps = average_last(workdir, average, abstract=abstract)
    else:
        if step is not None and step not in available:
            raise UsageError(f'no checkpoint of step {step} in {workdir}; have {available}')
        steps = [step if step is not None else available[-1]]
        params = checkpoint.restore_params(path(workdir, CHECKPOINTS_DIR), steps[0], abstract)
    return nnx.merge(graphdef, params), config, tokenizer, steps
