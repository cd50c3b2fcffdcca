"""A work directory: the files of one training run, and loading what a run left there.

Every file name of a work directory is defined here, once:

  config.json             the resolved config (train writes it; the other programs read it;
                          every checkpoint holds a copy, used when the file is missing)
  vocab.model, vocab.json the shared BPE vocabulary and what it was made for
  cache/                  the training set tokenized once (token arrays per text and
                          vocabulary, memory-mapped; cache_name, CACHE_META); rebuilt when
                          deleted
  checkpoints/<step>/     Orbax steps of the training state and data position
  averaged/               the output of `python -m transformer.average`
  eval/                   evaluate's hypotheses, sources, references and scores (eval_name;
                          merge_part_name: scratch files of a multi-process evaluation)
  metrics.jsonl, tensorboard/   the training metrics
  train.lock              held by the training process while it runs (names its PID and host)
  .tmp-*                  files being written (atomic_write), removed by train at start when
                          a killed run left them (cache/.tmp-train-*: a cache being built)
  broken-checkpoints/     checkpoints train found unreadable, moved aside (never deleted)
  profile/                traces of the steps train.profile_steps names (jax.profiler)
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable

import ml_collections
from absl import logging

from transformer import checkpoint, errors
from transformer import config as config_lib
from transformer import tokenizer as tokenizer_lib
from transformer.errors import FieldError, UsageError

CONFIG_FILE = 'config.json'
VOCAB_MODEL = 'vocab.model'
VOCAB_META = 'vocab.json'
CACHE_DIR = 'cache'
CHECKPOINTS_DIR = 'checkpoints'
AVERAGED_DIR = 'averaged'
EVAL_DIR = 'eval'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# Inside CACHE_DIR: one directory per text and vocabulary, written under a temporary name.
CACHE_META = 'meta.json'
TMP_PREFIX = '.tmp-'  # a file or directory being written, renamed when complete
CACHE_TMP_PREFIX = TMP_PREFIX + 'train-'
LOCK_FILE = 'train.lock'
BROKEN_DIR = 'broken-checkpoints'
PROFILE_DIR = 'profile'
# Early stopping's record after each evaluation (train.early_stop_patience): the metric, the
# step evaluated, the best step and value, the evaluations since; `--step=best` reads it.
BEST_FILE = 'best.json'

# Fields of vocab.json that must agree with the config for a stored vocabulary to be reused.
_VOCAB_FIELDS = ('vocab_size', 'source_lang', 'target_lang')


def path(workdir: str, name: str) -> str:
    """The path of `name` (one of the names above) in `workdir`."""
    return os.path.join(workdir, name)


def cache_name(key: str) -> str:
    """The directory in CACHE_DIR of the training set tokenized for cache key `key`."""
    return f'train-{key}'


def merge_part_name(label: str, process: int) -> str:
    """The scratch file through which process `process` hands its share of a decoded split
    (evaluate's `label`) to the others, in EVAL_DIR."""
    return f'.{label}.part{process}.json'


def eval_name(split: str, members: list[dict], beam_size: int, alpha: float,
              limit: int | None = None, no_repeat_ngram_size: int = 0) -> str:
    """The name of evaluate's files (EVAL_DIR/<name>.hyp, .src, .ref, .json) for `split`
    decoded by `members` (per model: its workdir and checkpoint steps, averaged when several)
    with these settings: '<split>_<models>_beam<B>_alpha<A>[_first<N>]', <models> being
    'step<S>[_avg<K>]' for one model, 'ensemble<M>-<hash of the members>' for several (two
    ensembles never overwrite each other's files), then '_raw' when a member's raw parameters
    were asked for instead of its moving average; '_norepeat<N>' after the alpha for a search
    without repeated N-grams."""
    if len(members) == 1:
        steps = members[0]['steps']
        which = f'step{steps[0]}' if len(steps) == 1 else f'step{steps[-1]}_avg{len(steps)}'
    else:
        spec = json.dumps([[os.path.realpath(m['workdir']), m['steps']] for m in members])
        which = f'ensemble{len(members)}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}'
    # The raw parameters of a run that keeps a moving average (--raw_weights) are another model.
    which += '_raw' if any(m.get('weights') == 'raw' for m in members) else ''
    name = f'{split}_{which}_beam{beam_size}_alpha{alpha:g}'
    name += f'_norepeat{no_repeat_ngram_size}' if no_repeat_ngram_size else ''
    return name + (f'_first{limit}' if limit is not None else '')


def atomic_write(file: str, data: bytes, what: str = 'the file') -> None:
    """Writes via a temporary file (named for `file`) and os.replace, so a crash never leaves
    half a file. A failure is a one-line WriteError naming `what` (e.g. 'the config') and
    `file`, the first error being the one raised (errors.closing).

    The file gets the mode the umask gives any new file (mkstemp alone would make it 0600).
    """
    directory = os.path.dirname(file) or '.'
    with errors.writing(what, file):
        fd, tmp = tempfile.mkstemp(dir=directory,
                                   prefix=f'{TMP_PREFIX}{os.path.basename(file)}-')
    try:
        with errors.closing(os.fdopen(fd, 'wb'), what, file) as f:
            f.write(data)
        with errors.writing(what, file):
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
    file = path(workdir, CONFIG_FILE)
    atomic_write(file, config.to_json(indent=2, sort_keys=True).encode(), 'the config')


def config_record(config: ml_collections.ConfigDict) -> dict:
    """The config as stored in each checkpoint's info (JSON), to recover config.json from."""
    return json.loads(config.to_json())


def _checkpointed_config(workdir: str) -> tuple[int, dict] | None:
    """(step, stored config) of the newest checkpoint that holds the run's config, if any."""
    directory = path(workdir, CHECKPOINTS_DIR)
    for step in reversed(checkpoint_steps(workdir)):
        stored = checkpoint.read_info(directory, step).get('config')
        if stored:
            return step, stored
    return None


def check_workdir(workdir: str, must_exist: bool = True) -> None:
    """The one check of --workdir that every program makes first: given, not a file, and,
    unless `must_exist` is False (train, which makes it), existing. A FieldError names the
    flag (`--workdir=FILE is a file, not a work directory`)."""
    if not workdir:
        raise FieldError('workdir', workdir, 'is required (a work directory of transformer.train)'
                         if must_exist else 'is required')
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FieldError('workdir', workdir, 'is a file, not a work directory')
    if must_exist and not os.path.exists(workdir):
        raise FieldError('workdir', workdir, 'does not exist')


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that `train` stored in `workdir`; from its newest checkpoint (with a warning)
    when config.json is missing; UsageError if there is none or it is not JSON."""
    check_workdir(workdir)
    stored = _stored_config(workdir)
    if stored is None:
        raise UsageError(f'{path(workdir, CONFIG_FILE)} not found: is {workdir!r} a work '
                         'directory made by transformer.train?')
    return stored


def _stored_config(workdir: str) -> ml_collections.ConfigDict | None:
    """config.json, or the newest checkpoint's copy when the file is missing; None if neither."""
    file = path(workdir, CONFIG_FILE)
    if os.path.exists(file):
        try:
            with open(file) as f:
                return config_lib.from_stored(json.load(f))
        except (OSError, ValueError) as e:
            held = _checkpointed_config(workdir)
            remedy = (f'delete it to use the copy in checkpoint {held[0]}' if held
                      else 'restore it')
            # (json's own error is the message; what it chains to is an internal StopIteration)
            why = errors.reason(e) if isinstance(e, OSError) else str(e).splitlines()[0]
            raise UsageError(f'{file} cannot be read ({why}): {remedy}') from None
    held = _checkpointed_config(workdir)
    if held is None:
        return None
    errors.warn(f'{file} is missing: using the config stored in checkpoint {held[0]}')
    return config_lib.from_stored(held[1])


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a config that differs from the stored one in more than the run length.

    Only a work directory with a checkpoint holds a run; before the first checkpoint (e.g. a
    start that failed on a missing data file) the config may still be corrected. The stored
    config is config.json, or the newest checkpoint's copy when the file is missing; with
    neither (checkpoints of an older version), restoring them checks their shapes.
    """
    if not checkpoint_steps(workdir):
        return
    stored = _stored_config(workdir)
    if stored is None:
        return
    differing = config_lib.differences(stored, config, ignore=config_lib.RESUMABLE_CHANGES)
    if differing:
        raise UsageError(f'{workdir} holds a run with another config; differing fields: '
                         f'{", ".join(differing)} (use a new --workdir)')


def remove_stale_files(workdir: str) -> list[str]:
    """Removes what a killed train left half-written (TMP_PREFIX files of atomic_write, caches
    being built) in the work directory and its cache; returns their paths. Only while holding
    the lock: no other train writes there then."""
    removed = []
    for directory in (workdir, path(workdir, CACHE_DIR)):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name.startswith(TMP_PREFIX):
                stale = os.path.join(directory, name)
                if os.path.isdir(stale):
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    os.remove(stale)
                removed.append(stale)
    return removed


# -- the vocabulary ---------------------------------------------------------------------------
# The run's vocabulary is fingerprinted (sha256 of vocab.model) in vocab.json and in every
# checkpoint: a missing or changed vocabulary under existing checkpoints is refused, never
# rebuilt, since a new one would map the same ids to other pieces.

def _vocab_metadata(config) -> dict:
    return dict(vocab_size=int(config.vocab_size), source_lang=config.source_lang,
                target_lang=config.target_lang)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vocabulary_fingerprint(workdir: str) -> str:
    """The sha256 of the stored vocabulary file."""
    with open(path(workdir, VOCAB_MODEL), 'rb') as f:
        return _sha256(f.read())


def _vocab_meta(workdir: str) -> dict:
    file = path(workdir, VOCAB_META)
    if not os.path.exists(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f'{file} cannot be read: {errors.reason(e)}') from None


def recorded_fingerprint(workdir: str, infos: list[dict] = ()) -> str | None:
    """The vocabulary fingerprint the run recorded: in its newest checkpoint (`infos`, oldest
    first, as checkpoint.info gives them), else in vocab.json; None if neither has one."""
    for info in reversed(list(infos)):
        if info.get('vocab_sha256'):
            return info['vocab_sha256']
    return (_vocab_meta_or_none(workdir) or {}).get('sha256')


def load_vocabulary(workdir: str, fingerprint: str | None = None) -> tokenizer_lib.Tokenizer:
    """The vocabulary stored in `workdir`; with `fingerprint`, it must be that very file."""
    file = path(workdir, VOCAB_MODEL)
    if not os.path.exists(file):
        raise UsageError(f'no vocabulary at {file}; train a model in this workdir first')
    with open(file, 'rb') as f:
        proto = f.read()
    if fingerprint is not None and _sha256(proto) != fingerprint:
        raise UsageError(f'{file} is not the vocabulary this run was trained with (sha256 '
                         f'{_sha256(proto)[:12]}..., the run recorded {fingerprint[:12]}...): '
                         'restore the original file or use a new --workdir')
    try:
        return tokenizer_lib.Tokenizer(proto)
    except Exception as e:  # noqa: BLE001 - SentencePiece raises bare RuntimeErrors
        raise UsageError(f'{file} is not a SentencePiece model ({errors.reason(e)})') from None


def vocabulary(config, workdir: str, texts: Callable[[], Iterable[str]],
               fingerprint: str | None = None,
               steps: list[int] = ()) -> tokenizer_lib.Tokenizer:
    """The run's vocabulary: the one stored in `workdir`, or trained on `texts()` and stored.

    `steps` are the run's checkpoints and `fingerprint` what they recorded (see
    recorded_fingerprint): under checkpoints a missing or changed vocabulary is refused, and a
    missing or unreadable vocab.json is written anew from the vocabulary they recorded. A
    stored vocabulary made for another vocab_size or language pair is refused too, and so is
    a vocab_size that the training text cannot fill (SentencePiece stops short of it).
    """
    model_file, meta_file = path(workdir, VOCAB_MODEL), path(workdir, VOCAB_META)
    want = _vocab_metadata(config)
    if os.path.exists(model_file):
        have = _vocab_meta_or_none(workdir)
        if have is None and steps and fingerprint:
            tokenizer = load_vocabulary(workdir, fingerprint)  # the very file they recorded
            _write_vocab_meta(config, workdir, tokenizer, fingerprint)
            errors.warn(f'{meta_file} was missing or unreadable: wrote it anew for {model_file}, '
                        f'the vocabulary checkpoint {steps[-1]} was trained with')
            return tokenizer
        if have is None:
            raise UsageError(f'{meta_file} is missing or unreadable, so what {model_file} was '
                             f'made for is unknown; nothing was trained with it yet: delete '
                             f'{model_file} (a new one is trained)')
        bad = [f'{k}: stored {have.get(k)!r} vs config {want[k]!r}'
               for k in _VOCAB_FIELDS if have.get(k) != want[k]]
        if bad:
            remedy = (f'use a new --workdir (checkpoints {", ".join(map(str, steps))} were '
                      'trained with it)' if steps else 'use a new workdir or delete the '
                      'vocabulary')
            raise UsageError(f'vocabulary {model_file} was made for another config '
                             f'({"; ".join(bad)}); {remedy}')
        return load_vocabulary(workdir, fingerprint)
    if steps:
        raise UsageError(f'{model_file} is missing, but {workdir} holds checkpoints (steps '
                         f'{", ".join(map(str, steps))}) trained with it; a new vocabulary would '
                         'not match them: restore the file or use a new --workdir')

    sentences = iter(texts())
    first = next(sentences, None)
    if first is None:
        raise UsageError(f'no text to train the vocabulary on: the training data of '
                         f'data.source={config.data.source!r} holds only blank lines')
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    proto = tokenizer_lib.train(itertools.chain([first], sentences), config.vocab_size)
    seconds = time.time() - start
    tokenizer = tokenizer_lib.Tokenizer(proto)
    logging.info('Trained a %d-piece BPE vocabulary in %.1f s', tokenizer.vocab_size, seconds)
    if tokenizer.vocab_size < config.vocab_size:
        # The embedding would have rows no id ever uses, and label smoothing would spread
        # probability over them.
        raise FieldError('vocab_size', config.vocab_size,
                         f'is more than the training text gives: SentencePiece learned '
                         f'{tokenizer.vocab_size} pieces from data.vocab_sample_sentences='
                         f'{config.data.vocab_sample_sentences} sentences; set '
                         f'--config.vocab_size={tokenizer.vocab_size} or less (nothing was '
                         'stored)')
    # Metadata first: vocab.model is what marks the vocabulary as present.
    _write_vocab_meta(config, workdir, tokenizer, _sha256(proto), train_seconds=seconds)
    atomic_write(model_file, proto, 'the vocabulary')
    return tokenizer


def _vocab_meta_or_none(workdir: str) -> dict | None:
    """vocab.json, or None when it is missing or unreadable."""
    try:
        return _vocab_meta(workdir) or None
    except UsageError:
        return None


def _write_vocab_meta(config, workdir: str, tokenizer, sha256: str, **extra) -> None:
    meta = dict(_vocab_metadata(config), pieces=tokenizer.vocab_size, model_type='bpe',
                sha256=sha256, data_source=config.data.source,
                **{k: round(v, 2) for k, v in extra.items()})
    file = path(workdir, VOCAB_META)
    atomic_write(file, (json.dumps(meta, indent=2) + '\n').encode(), 'the vocabulary')


# -- the training process's lock --------------------------------------------------------------

def lock(workdir: str):
    """Takes the work directory for one training process; returns the open lock file (keep it).

    An exclusive flock on train.lock, which the OS releases when the process ends, however it
    ends (kill -9 included): a second `train` on the same directory is refused in one line
    naming the holder. Also the check that the directory can be written at all, before
    anything is built.
    """
    file = path(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        handle = open(file, 'a+')
    except OSError as e:
        raise UsageError(f'cannot write in the work directory {workdir}: '
                         f'{errors.reason(e)}') from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or 'another process'
        handle.close()
        raise UsageError(f'{workdir} is in use by another train ({holder}); wait for it to '
                         'end or use another --workdir') from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f'pid {os.getpid()} on host {socket.gethostname()}\n')
        handle.flush()
    except OSError as e:
        errors.discard(handle)  # its close would fail again on what the buffer kept
        if errors.is_full_disk(e):
            raise errors.WriteError(errors.write_failure('the lock file', file, e)) from None
        raise UsageError(f'cannot write in the work directory {workdir}: '
                         f'{errors.reason(e)}') from None
    return handle


# -- checkpoints ----------------------------------------------------------------------------------

def read_best(workdir: str) -> dict | None:
    """Early stopping's record (BEST_FILE), or None when the run has none."""
    file = path(workdir, BEST_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f'{file} cannot be read ({errors.reason(e)}): it names the best '
                         'checkpoint; give --step=N instead') from None


def best_step(workdir: str) -> int:
    """The step of the best checkpoint by train.early_stop_metric (`--step=best`)."""
    record = read_best(workdir)
    if record is None or record.get('best_step') is None:
        raise UsageError(f'--step=best: {workdir} has no best checkpoint ({BEST_FILE} is '
                         'written by runs with train.early_stop_patience > 0); give --step=N')
    return int(record['best_step'])


def checkpoint_steps(workdir: str) -> list[int]:
    """Complete checkpoint steps in the work directory, oldest first."""
    return checkpoint.available_steps(path(workdir, CHECKPOINTS_DIR))
