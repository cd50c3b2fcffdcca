"""A work directory: the name of every file of one training run, defined here once; atomic
writes, the check of --workdir, the training process's lock, early stopping's record. No
project module but errors (the config store is run_config.py, the vocabulary's life cycle
vocabulary.py, the checkpoints checkpoint.py):

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
import json
import os
import shutil
import socket
import tempfile

from transformer import errors
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


# -- early stopping's record ----------------------------------------------------------------------

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
